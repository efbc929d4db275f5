"""The planted artifacts: exact masks, the rate counted, blur against scipy, the mass ratio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sanity_cli.artifacts import (
    Artifact,
    chosen_for_artifact,
    gaussian_blur,
    mask_mass_ratio,
    plant,
)
from sanity_cli.errors import SanityError


def test_corner_tag_mask_is_the_top_left_square():
    artifact = Artifact(kind="tag", tag_size=0.25)
    mask = artifact.mask((3, 1, 28, 28), torch.arange(3))
    expected = torch.zeros(3, 1, 28, 28)
    expected[:, :, :7, :7] = 1
    assert torch.equal(mask, expected)


def test_tag_is_painted_exactly_on_its_mask_and_nowhere_else():
    images = torch.rand(4, 3, 20, 20) * 0.5
    ids = torch.tensor([5, 9, 11, 30])
    artifact = Artifact(kind="tag", tag_size=0.2, tag_position="random", tag_value=0.9, seed=3)
    out, mask = artifact.apply(images, ids), artifact.mask(images.shape, ids)
    inside = mask.expand_as(images).bool()
    assert torch.all(out[inside] == 0.9)
    assert torch.equal(out[~inside], images[~inside])
    assert torch.all(mask.flatten(1).sum(1) == 16)  # a 4 x 4 square each


def test_random_tag_positions_follow_the_image_and_the_seed():
    artifact = Artifact(kind="tag", tag_position="random", seed=1)
    once = artifact.tag_corners(28, torch.tensor([1, 2, 3, 4, 5, 6]))
    again = artifact.tag_corners(28, torch.tensor([4, 5, 6]))
    assert torch.equal(once[3:], again)  # an image's tag does not depend on its batch
    other_seed = Artifact(kind="tag", tag_position="random", seed=2).tag_corners(28, torch.tensor([1, 2, 3, 4, 5, 6]))
    assert not torch.equal(once, other_seed)
    assert len({tuple(c) for c in once.tolist()}) > 1
    assert once.min() >= 0 and once.max() <= 28 - 7


def test_stripes_raise_every_kth_row():
    images = torch.full((2, 1, 8, 6), 0.5)
    artifact = Artifact(kind="stripes", stripes_period=3, stripes_strength=0.25)
    out = artifact.apply(images, torch.arange(2))
    rows = out[0, 0, :, 0]
    assert torch.allclose(rows, torch.tensor([0.75, 0.5, 0.5, 0.75, 0.5, 0.5, 0.75, 0.5]))
    assert torch.equal(artifact.mask(images.shape, torch.arange(2))[0, 0, :, 0].bool(), rows > 0.6)
    assert artifact.apply(torch.ones(1, 1, 4, 4), torch.arange(1)).max() == 1  # clipped to [0, 1]


def test_blur_matches_scipy_and_has_no_mask():
    ndimage = pytest.importorskip("scipy.ndimage", reason="scipy is the reference for the Gaussian blur")
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    ours = gaussian_blur(images, 1.3).numpy()
    theirs = np.stack([np.stack([ndimage.gaussian_filter(c, 1.3, mode="mirror", truncate=4 / 1.3 * 1.0)
                                 for c in image]) for image in images.numpy()])
    # scipy's radius is int(truncate * sigma + 0.5) = 4 = ceil(3 * 1.3), and "mirror" is torch's "reflect"
    assert np.allclose(ours, theirs, atol=1e-12)
    with pytest.raises(SanityError, match="no location"):
        Artifact(kind="blur").mask((1, 1, 8, 8), torch.arange(1))


@pytest.mark.parametrize("rate", [0.3, 0.75, 1.0])
def test_the_artifact_goes_to_the_aligned_class_at_the_rate(rate):
    labels = torch.arange(10).repeat(400)  # 400 images of each class
    images = torch.zeros(len(labels), 1, 8, 8)
    out = plant(images, labels, Artifact(kind="tag", tag_size=0.25, seed=7), aligned_class=3, rate=rate)
    tagged = out.flatten(1).amax(dim=1) > 0
    assert not tagged[labels != 3].any()
    count = int(tagged[labels == 3].sum())
    assert count == int(chosen_for_artifact(labels, 3, rate, 7).sum())
    assert abs(count / 400 - rate) < 3 * np.sqrt(rate * (1 - rate) / 400) + 1e-9  # binomial, 3 sigma
    assert torch.equal(plant(images, labels, Artifact(seed=7), 3, rate), out)  # seeded


def test_mass_ratio_closed_forms():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1  # a quarter of the image
    inside = mask.clone() * torch.rand(1, 1, 4, 4).add(0.1)
    assert torch.allclose(mask_mass_ratio(inside.expand(1, 3, 4, 4), mask), torch.tensor([4.0], dtype=torch.float64))
    assert torch.allclose(mask_mass_ratio(torch.ones(1, 1, 4, 4), mask), torch.tensor([1.0], dtype=torch.float64))
    assert mask_mass_ratio(1 - mask, mask).item() == 0
    assert torch.isnan(mask_mass_ratio(torch.zeros(1, 1, 4, 4), mask)).all()


def test_bad_artifact_choices_are_one_line():
    with pytest.raises(SanityError, match="unknown test.artifact 'sideways'; choose one of: tag, stripes, blur"):
        Artifact.from_settings({"artifact": "sideways"})
    with pytest.raises(SanityError, match="test.tag_position"):
        Artifact.from_settings({"artifact": "tag", "tag_position": "middle"})
