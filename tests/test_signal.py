"""The signal check: figures of a map against its image, the random reference, the rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from skimage.filters import sobel
from torch import nn

from sanity_cli.errors import SanityError
from sanity_cli.methods import explain_all
from sanity_cli.signal import REFERENCE, lower_bound, signal_figures, signal_table, uninformative


def _blobs(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) images in [0, 1]: a bright disc on black, random centre and radius."""
    rng = np.random.default_rng(seed)
    grid = np.mgrid[:size, :size]
    images = []
    for _ in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        radius = rng.uniform(size * 0.15, size * 0.3)
        distance = np.hypot(grid[0] - cy, grid[1] - cx)
        images.append(np.clip(1.5 - distance / radius, 0, 1))
    return torch.tensor(np.stack(images)[:, None], dtype=torch.float32)


class NoiseModel(nn.Module):
    """Linear logits with one random weight per pixel: the gradient is that weight
    image, the same noise for every input."""

    def __init__(self, size: int, classes: int = 3):
        super().__init__()
        self.linear = nn.Linear(size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class EnergyModel(nn.Module):
    """Logit k = (k + 1) * sum(x^2) / 2: the gradient of any class is (k + 1) * x,
    a map that is the image itself."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.register_buffer("scale", torch.arange(1.0, classes + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x**2).flatten(1).sum(1, keepdim=True) * self.scale


def test_a_map_equal_to_the_image_or_its_edges_correlates_one():
    images = _blobs()
    edges = torch.tensor(np.stack([sobel(i[0].double().numpy()) for i in images]))[:, None]
    assert signal_figures(images, images)["input_spearman"].tolist() == pytest.approx([1.0] * 8)
    assert signal_figures(edges, images)["edge_spearman"].tolist() == pytest.approx([1.0] * 8)
    # A signed map counts by magnitude, and channels are summed first.
    assert signal_figures(-images.expand(-1, 3, -1, -1), images)["input_spearman"].tolist() == pytest.approx([1.0] * 8)


def test_figures_match_scipy_and_numpy_per_image():
    images = _blobs(4, 12, seed=1).expand(-1, 3, -1, -1) * torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1, 1)
    maps = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(2)) + images
    figures = signal_figures(maps, images)
    for i in range(4):
        magnitude = maps[i].abs().sum(0).double().numpy()
        gray = images[i].mean(0).double().numpy()
        assert figures["input_spearman"][i].item() == pytest.approx(stats.spearmanr(magnitude.ravel(), gray.ravel())[0])
        assert figures["edge_spearman"][i].item() == pytest.approx(
            stats.spearmanr(magnitude.ravel(), sobel(gray).ravel())[0])
        pairs = np.corrcoef(magnitude[:, :-1].ravel(), magnitude[:, 1:].ravel())[0, 1]
        assert figures["neighbour_corr"][i].item() == pytest.approx(pairs)


def test_lower_bound_is_where_a_one_sided_t_test_stops_rejecting():
    differences = torch.tensor([0.3, 0.1, 0.45, 0.2, math.nan, 0.25])
    bound = lower_bound(differences)
    kept = differences[~differences.isnan()].numpy()
    test = stats.ttest_1samp(kept, popmean=bound, alternative="greater")
    assert test.pvalue == pytest.approx(0.05)
    assert math.isnan(lower_bound(torch.tensor([0.4, math.nan])))


def test_noise_model_and_input_following_model_are_told_apart():
    images = _blobs(16, 16)
    torch.manual_seed(0)
    noise_model, energy_model = NoiseModel(16).eval(), EnergyModel().eval()
    maps = {"noise": explain_all(noise_model, images, "predicted", {"gradient": {}})["gradient"],
            "follows": explain_all(energy_model, images, "predicted", {"gradient": {}})["gradient"]}
    table = signal_table(maps, images, seed=3).set_index("method")
    assert table.loc["follows", "input_spearman"] == pytest.approx(1.0)
    assert table.loc["follows", "neighbour_corr"] > 0.8
    assert abs(table.loc["noise", "input_spearman"]) < 0.15
    assert abs(table.loc["noise", "neighbour_corr"]) < 0.15
    assert abs(table.loc[REFERENCE, "input_spearman"]) < 0.1
    assert table.loc["follows", "excess"] > 0.8
    assert table.loc["noise", "excess"] < 0.1
    assert table["informative"].to_dict() == {REFERENCE: False, "noise": False, "follows": True}
    assert uninformative(table.reset_index()) == ["noise"]
    assert table["n_images"].tolist() == [16, 16, 16]


def test_controls_are_flagged_and_not_reported_as_uninformative():
    images = _blobs(8)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    table = signal_table({"random": noise, "edge": images.clone()}, images, controls=["random", "edge"])
    assert table.set_index("method")["is_control"].to_dict() == {REFERENCE: True, "random": True, "edge": True}
    assert table.set_index("method")["informative"].to_dict() == {REFERENCE: False, "random": False, "edge": True}
    assert uninformative(table) == []


def test_the_reference_is_seeded():
    images = _blobs(6)
    maps = {"image": images}
    first, again, other = (signal_table(maps, images, seed=s).iloc[0] for s in (1, 1, 2))
    assert first["method"] == REFERENCE
    assert first["neighbour_corr"] == again["neighbour_corr"]
    assert first["neighbour_corr"] != other["neighbour_corr"]


def test_a_constant_map_has_no_signal():
    images = _blobs(4)
    table = signal_table({"dead": torch.zeros_like(images)}, images).set_index("method")
    assert math.isnan(table.loc["dead", "input_spearman"])
    assert math.isnan(table.loc["dead", "excess"])
    assert not table.loc["dead", "informative"]


def test_a_gradcam_map_of_an_rgb_image_is_accepted():
    images = _blobs(4).expand(-1, 3, -1, -1)
    table = signal_table({"gradcam": images[:, :1] ** 2}, images).set_index("method")
    assert table.loc["gradcam", "input_spearman"] == pytest.approx(1.0)


@pytest.mark.parametrize("maps, images, message", [
    ({"m": torch.zeros(2, 1, 8, 8)}, torch.zeros(3, 1, 8, 8), "do not match"),
    ({"m": torch.zeros(2, 1, 8, 4)}, torch.zeros(2, 1, 8, 8), "do not match"),
    ({"m": torch.zeros(2, 8, 8)}, torch.zeros(2, 1, 8, 8), r"\(B, C, H, W\)"),
    ({}, torch.zeros(2, 1, 8, 8), "no maps"),
])
def test_bad_input_is_one_line_error(maps, images, message):
    with pytest.raises(SanityError, match=message):
        signal_table(maps, images)
