"""Image folders as they are found on disks: every file that is no readable image is
skipped with a warning that names it, the next image taken in its place, and deep
(16-bit, float) images are scaled, not clipped."""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sanity_cli.data import UnreadableImage, load_image_folder, read_image, select_images
from sanity_cli.errors import SanityError

GRAY = 100 / 255


def truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:400])


def header_only_bomb(path):
    """A PNG whose header claims 100000 x 100000 pixels: 10^10 to decode from a few bytes."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(png[24:29])
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(png))


BAD_FILES = {
    "truncated.jpg": (truncated_jpeg, "damaged image data"),
    "empty.png": (lambda p: p.write_bytes(b""), "not an image file"),
    "text.png": (lambda p: p.write_text("not pixels"), "not an image file"),
    "dangling.png": (lambda p: os.symlink(p.parent / "gone.png", p), "it does not exist"),
    "folder.jpg": (lambda p: p.mkdir(), "a directory, not an image file"),
    "pipe.png": (lambda p: os.mkfifo(p), "a FIFO, not an image file"),
    "bomb.png": (header_only_bomb, "too many pixels to decode safely"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_each_bad_file_is_skipped_by_name_and_replaced(tmp_path, name, caplog):
    make, reason = BAD_FILES[name]
    (tmp_path / "a").mkdir()
    make(tmp_path / "a" / name)
    for i in range(2):
        Image.new("RGB", (20, 20), (100, 100, 100)).save(tmp_path / "a" / f"good{i}.png")
    with caplog.at_level(logging.WARNING):
        data = load_image_folder(str(tmp_path), image_size=8, n_images=3, seed=0)  # asks for every file
    assert data.test_x.shape == (2, 3, 8, 8)
    assert torch.allclose(data.test_x, torch.full_like(data.test_x, GRAY), atol=1e-3)
    assert f"skipping {tmp_path / 'a' / name}: {reason}" in caplog.text
    assert f"skipped 1 unreadable image file in {tmp_path}" in caplog.text
    with pytest.raises(UnreadableImage, match=reason):
        read_image(tmp_path / "a" / name, 8)


def test_a_skipped_file_gives_its_place_to_the_next_image(tmp_path):
    (tmp_path / "a").mkdir()
    BAD_FILES["empty.png"][0](tmp_path / "a" / "0.png")
    for i in range(1, 4):
        Image.new("L", (8, 8), 60 * i).save(tmp_path / "a" / f"{i}.png")
    data = load_image_folder(str(tmp_path), image_size=8, n_images=2, seed=0)
    assert data.test_x.shape == (2, 3, 8, 8)  # two images although the seeded order may start with the empty one


def test_a_folder_of_only_bad_files_is_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("empty.png", "text.png"):
        BAD_FILES[name][0](tmp_path / "a" / name)
    with pytest.raises(SanityError, match=r"has no readable image \(all 2 tried were not\)"):
        load_image_folder(str(tmp_path), 8, 4, 0)


def test_a_fifo_does_not_block(tmp_path):
    """Reading a FIFO blocks until a writer comes; none comes here, and none is needed."""
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(UnreadableImage, match="a FIFO"):
        read_image(tmp_path / "pipe.png", 8)


@pytest.mark.parametrize("array, expected", [
    (np.full((12, 12), 40000, dtype=np.uint16), 40000 / 65535),   # 16-bit: not clipped to white
    (np.full((12, 12), 300, dtype=np.uint16), 300 / 65535),       # dark 16-bit: not rounded to black
    (np.full((12, 12), 0.25, dtype=np.float32), 0.25),            # float in [0, 1]: as it is
])
def test_deep_images_are_scaled_to_unit_range(tmp_path, array, expected):
    path = tmp_path / ("image.png" if array.dtype == np.uint16 else "image.tif")
    Image.fromarray(array).save(path)
    image = read_image(path, 8)
    assert image.shape == (3, 8, 8)
    assert torch.allclose(image, torch.full_like(image, expected), rtol=1e-4, atol=1e-6)


def test_float_pixels_outside_unit_range_are_stretched(tmp_path, caplog):
    ramp = np.tile(np.linspace(-2.0, 6.0, 16, dtype=np.float32), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    with caplog.at_level(logging.WARNING):
        image = read_image(tmp_path / "ramp.tif", 16)
    assert "float pixels in [-2, 6], outside [0, 1]: stretched" in caplog.text
    assert image.min().item() == pytest.approx(0.0, abs=1e-3) and image.max().item() == pytest.approx(1.0, abs=1e-3)
    nan = np.full((4, 4), np.nan, dtype=np.float32)
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    with pytest.raises(UnreadableImage, match="NaN or infinite"):
        read_image(tmp_path / "nan.tif", 4)


def test_more_images_asked_than_there_are_is_a_warning_with_the_number(caplog):
    with caplog.at_level(logging.WARNING):
        chosen = select_images(torch.arange(7) % 3, 50, seed=0)
    assert len(chosen) == 7
    assert "n_images=50, but the test split holds 7 images: explaining those 7" in caplog.text
