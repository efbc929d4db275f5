"""Datasets: the bundled digits, torchvision files from a local copy, image folders, samples."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from sanity_cli.data import adapt_images, load_digits, load_image_folder, load_samples, load_torchvision, select_images
from sanity_cli.errors import SanityError


def test_digits_split_is_fixed_and_seeded():
    a, b, c = load_digits(28, 0.2, seed=0), load_digits(28, 0.2, seed=0), load_digits(28, 0.2, seed=1)
    assert a.train_x.shape == (1438, 1, 28, 28) and a.test_x.shape == (359, 1, 28, 28)
    assert 0.0 <= a.train_x.min() and a.train_x.max() <= 1.0
    assert torch.equal(a.test_y, b.test_y) and not torch.equal(a.test_y, c.test_y)


def _write_idx(path, array: np.ndarray):
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_system_copy_of_idx_files_is_used_without_download(tmp_path):
    system = tmp_path / "system"
    system.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        _write_idx(system / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(system / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_torchvision("FashionMNIST", tmp_path / "data", system_dir=str(system))
    assert data.train_x.shape == (12, 1, 28, 28) and data.test_x.shape == (6, 1, 28, 28)
    assert data.test_y.tolist() == [0, 1, 2, 3, 4, 5] and data.num_classes == 10


def test_failed_download_says_how_to_provide_the_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(SanityError, match="put the dataset's files in .*MNIST.*raw"):
        load_torchvision("MNIST", tmp_path)


def test_image_folder_is_balanced_resized_and_labelled(tmp_path):
    for label, colour in (("cat", 40), ("dog", 200)):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (40 + 10 * i, 30), (colour, colour, colour)).save(tmp_path / label / f"{i}.png")
    data = load_image_folder(str(tmp_path), image_size=16, n_images=4, seed=0)
    assert data.test_x.shape == (4, 3, 16, 16) and data.classes == ["cat", "dog"]
    assert sorted(data.test_y.tolist()) == [0, 0, 1, 1]
    for x, y in zip(data.test_x, data.test_y):
        assert torch.allclose(x, torch.full_like(x, (40 if y == 0 else 200) / 255), atol=1e-3)


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SanityError, match="does not exist"):
        load_image_folder(str(tmp_path / "nope"), 16, 4, 0)
    with pytest.raises(SanityError, match="no class sub-folders"):
        load_image_folder(str(tmp_path), 16, 4, 0)


def test_samples_and_adaptation():
    data = load_samples(64)
    assert data.test_x.shape == (5, 3, 64, 64) and (data.test_y == -1).all()
    gray = adapt_images(data.test_x, 1, 28)
    assert gray.shape == (5, 1, 28, 28)
    assert adapt_images(gray, 3, 28).shape == (5, 3, 28, 28)


def test_selected_images_cover_the_classes():
    labels = torch.arange(100) % 10
    chosen = select_images(labels, 10, seed=0)
    assert sorted(labels[chosen].tolist()) == list(range(10))
    assert torch.equal(chosen, select_images(labels, 10, seed=0))


def test_image_folder_class_choice(tmp_path):
    for label in ("a", "b", "c"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / label / f"{i}.png")
    picked = load_image_folder(str(tmp_path), 8, 10, seed=0, use_classes=2)
    assert len(set(picked.test_y.tolist())) == 2 and len(picked.test_y) == 4
    named = load_image_folder(str(tmp_path), 8, 10, seed=0, use_classes=["c"])
    assert named.test_y.tolist() == [2, 2]  # labels keep the full dataset's class indices
    with pytest.raises(SanityError, match="no class folder 'z'"):
        load_image_folder(str(tmp_path), 8, 10, seed=0, use_classes=["z"])
