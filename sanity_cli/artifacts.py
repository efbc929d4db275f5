"""Spurious artifacts planted in images (Adebayo, Muelly, Abelson and Kim, ICLR 2022).

Pure functions of images in [0, 1], (N, C, H, W), and of their ids:

* `tag`: a square of `tag_size` x the image side, painted with `tag_value`, in the top
  left corner (`tag_position=corner`) or at a position drawn per image (`random`);
* `stripes`: every `stripes_period`-th row raised by `stripes_strength` (a periodic
  pattern over the whole image);
* `blur`: the image blurred by a Gaussian of std `blur_sigma` pixels (a change with
  no location, so it has no mask).

`mask` is where an artifact lies (1 inside, 0 outside), `apply` plants it, and
`plant` plants it in a training split: on the images of one class, each with
probability `rate`. Randomness follows a seed and each image's id, so the same image
gets the same tag position in every call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sanity_cli.errors import SanityError

ARTIFACTS = ("tag", "stripes", "blur")
POSITIONS = ("corner", "random")
LOCATED = ("tag", "stripes")  # artifacts with a mask; blur has none


@dataclass(frozen=True)
class Artifact:
    """One artifact and its settings (the `test` config's keys of the same names)."""

    kind: str = "tag"
    tag_size: float = 0.25
    tag_position: str = "corner"
    tag_value: float = 1.0
    stripes_period: int = 4
    stripes_strength: float = 0.6
    blur_sigma: float = 3.0
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Mapping, seed: int = 0) -> Artifact:
        """The artifact that a `test` config describes; SanityError for a bad choice."""
        names = [name for name in cls.__dataclass_fields__ if name not in ("kind", "seed")]
        artifact = cls(kind=settings.get("artifact", "tag"), seed=int(seed),
                       **{name: settings[name] for name in names if settings.get(name) is not None})
        artifact.check()
        return artifact

    def check(self) -> None:
        if self.kind not in ARTIFACTS:
            raise SanityError(f"unknown test.artifact '{self.kind}'; choose one of: {', '.join(ARTIFACTS)}")
        if self.tag_position not in POSITIONS:
            raise SanityError(f"unknown test.tag_position '{self.tag_position}'; choose one of: "
                              f"{', '.join(POSITIONS)}")

    @property
    def located(self) -> bool:
        return self.kind in LOCATED

    def tag_side(self, size: int) -> int:
        """The tag's side in pixels on a size x size image: at least one pixel."""
        return max(1, min(size, round(self.tag_size * size)))

    def tag_corners(self, size: int, ids: Tensor) -> Tensor:
        """(N, 2) top-left (row, column) of each image's tag; random positions are drawn
        from a generator seeded with the artifact's seed and the image's id."""
        if self.tag_position == "corner":
            return torch.zeros(len(ids), 2, dtype=torch.long)
        room = size - self.tag_side(size) + 1
        corners = []
        for image in ids.tolist():
            generator = torch.Generator().manual_seed(_image_seed(self.seed, int(image)))
            corners.append(torch.randint(0, room, (2,), generator=generator))
        return torch.stack(corners) if corners else torch.zeros(0, 2, dtype=torch.long)

    def mask(self, shape: torch.Size | tuple[int, ...], ids: Tensor) -> Tensor:
        """(N, 1, H, W) where the artifact lies on images of `shape` (N, C, H, W): 1 inside, 0 outside.
        A blur has no location: SanityError."""
        n, _, height, width = shape
        if self.kind == "blur":
            raise SanityError("test.artifact=blur changes the whole image and has no location, so it has no mask")
        out = torch.zeros(n, 1, height, width)
        if self.kind == "stripes":
            out[:, :, ::self.stripes_period, :] = 1.0
            return out
        side = self.tag_side(min(height, width))
        for i, (row, col) in enumerate(self.tag_corners(min(height, width), ids).tolist()):
            out[i, :, row:row + side, col:col + side] = 1.0
        return out

    def apply(self, images: Tensor, ids: Tensor) -> Tensor:
        """The images (N, C, H, W) in [0, 1] with the artifact planted, still in [0, 1]."""
        if self.kind == "blur":
            return gaussian_blur(images, self.blur_sigma)
        mask = self.mask(images.shape, ids).to(images.device, images.dtype)
        if self.kind == "stripes":
            return (images + self.stripes_strength * mask).clamp(0, 1)
        return images * (1 - mask) + self.tag_value * mask


def _image_seed(seed: int, image: int) -> int:
    return (seed * 1_000_003 + image) % 2**63


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """(N, C, H, W) blurred by a separable Gaussian of std `sigma` pixels, truncated at
    3 sigma, with reflected borders (so a constant image stays constant)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = images
    for shape, pad in (((1, 1, 1, -1), (radius, radius, 0, 0)), ((1, 1, -1, 1), (0, 0, radius, radius))):
        weight = kernel.view(shape).expand(channels, 1, *kernel.view(shape).shape[2:])
        mode = "reflect" if min(images.shape[-2:]) > radius else "replicate"
        out = F.conv2d(F.pad(out, pad, mode=mode), weight, groups=channels)
    return out


def chosen_for_artifact(labels: Tensor, aligned_class: int, rate: float, seed: int) -> Tensor:
    """(N,) bool: which training images carry the artifact. Each image of `aligned_class`
    does with probability `rate`, drawn from a generator seeded with `seed`; no other does."""
    draws = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed))
    return (labels == aligned_class) & (draws < rate)


def plant(images: Tensor, labels: Tensor, artifact: Artifact, aligned_class: int, rate: float,
          ids: Tensor | None = None) -> Tensor:
    """A training split (N, C, H, W) in [0, 1] with the artifact on the chosen images of the
    aligned class (`chosen_for_artifact`); `ids` (N,) name the images (default: positions)."""
    ids = torch.arange(len(images)) if ids is None else ids
    chosen = chosen_for_artifact(labels, aligned_class, rate, artifact.seed)
    out = images.clone()
    if chosen.any():
        out[chosen] = artifact.apply(images[chosen], ids[chosen])
    return out


def mask_mass_ratio(maps: Tensor, mask: Tensor) -> Tensor:
    """(B,) the share of each map's |value| that lies inside the mask, over the mask's share
    of the image: 1 for a map spread evenly, 1 / share when all of it is in the mask, 0 when
    none is. maps (B, C, H, W), mask (B, 1, H, W) of 0 and 1. NaN for an all-zero map or mask."""
    weight = maps.detach().abs().sum(dim=1, keepdim=True).double()
    mask = mask.to(weight.device, weight.dtype)
    total, inside = weight.flatten(1).sum(dim=1), (weight * mask).flatten(1).sum(dim=1)
    share = mask.flatten(1).mean(dim=1)
    ratio = inside / total / share
    return ratio.masked_fill((total == 0) | (share == 0), float("nan"))
