"""Does a trained model's map carry signal at all? Three figures per method and a
seeded random map as the reference.

A map that is noise before any randomization "passes" a randomization check
trivially: noise stays unlike noise (Binder et al., CVPR 2023). So before reading
a cascade, look at the trained model's maps themselves:

* ``input_spearman``: Spearman rank correlation between |map| (summed over
  channels) and the image (channel mean): does the map follow the object?
* ``neighbour_corr``: Pearson correlation of horizontally adjacent pixels of
  |map| (summed over channels): is the map spatially coherent, or pixel noise?
* ``edge_spearman``: Spearman rank correlation between |map| and the Sobel
  magnitude of the image: does the map follow the object's outline? (Flat
  objects, e.g. garments, light up along their edges rather than everywhere.)

Each is computed per image, then averaged. The same figures of a standard normal
map drawn here (the row ``random_reference``) are what noise scores on the same
images. The rule: a method is *informative* when, for at least one figure, the
lower one-sided 95% confidence bound of the mean paired difference (method minus
reference, image by image) exceeds ``margin``, 0.3: with 95% confidence, at least
a medium correlation (Cohen's convention) above what noise has. The ``excess``
column holds the largest of those three bounds. (Digits CNN, measured: Gradient
and Guided Backprop maps have an excess of 0.14 and 0.22 under the paper's init,
0.69 and 0.72 under the default one.) The rule separates noise from structure; it
does not say whether the structure comes from the model (an edge detector is
informative, and GradCAM maps are smooth by their upsampling): that is what the
randomization checks measure.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import pandas as pd
import torch
from scipy import stats
from torch import Tensor

from sanity_cli.errors import SanityError
from sanity_cli.methods.controls import random_map, sobel_magnitude
from sanity_cli.metrics import spearman

REFERENCE = "random_reference"
FIGURES = ("input_spearman", "neighbour_corr", "edge_spearman")
MARGIN = 0.3
CONFIDENCE = 0.95


@torch.no_grad()
def signal_figures(maps: Tensor, images: Tensor) -> dict[str, Tensor]:
    """The three figures of each image: {figure: (B,) float64}, NaN where undefined.

    maps: (B, C', H, W), any C' (GradCAM has 1); images: (B, C, H, W) in [0, 1].
    A constant map (all zero, e.g. a dead GradCAM) has no defined correlation: NaN.
    """
    _check_shapes(maps, images)
    magnitude = maps.detach().abs().sum(dim=1).to(torch.float64)  # (B, H, W)
    gray = images.detach().mean(dim=1, keepdim=True).to(torch.float64)  # (B, 1, H, W)
    edges = sobel_magnitude(gray)[:, 0]
    flat = magnitude.flatten(1)
    return {
        "input_spearman": spearman(flat, gray.flatten(1)),
        "neighbour_corr": _pearson(magnitude[..., :-1].flatten(1), magnitude[..., 1:].flatten(1)),
        "edge_spearman": spearman(flat, edges.flatten(1)),
    }


def signal_table(maps: Mapping[str, Tensor], images: Tensor, *, controls: Collection[str] = (),
                 seed: int = 0, margin: float = MARGIN) -> pd.DataFrame:
    """One row per method of `maps`, and one for a random reference map drawn here.

    maps: method -> (B, C', H, W) maps of the trained model; images: (B, C, H, W) in
    [0, 1]. `controls` names the methods of `maps` that are controls (edge, random);
    they and the reference row get ``is_control``. `seed` draws the reference map.
    Columns: method, n_images, each figure's mean and std over images (NaN images
    left out), excess (the largest lower 95% bound of a figure's mean paired
    difference from the reference), informative (excess > `margin`), is_control.
    """
    return table_of(figures_by_method(maps, images, seed=seed), controls=controls, margin=margin)


def figures_by_method(maps: Mapping[str, Tensor], images: Tensor, *, seed: int = 0,
                      positions: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
    """{method: its `signal_figures`}, and the random reference's under REFERENCE.

    `positions` (B,): the images' places among all the run's images (default 0..B-1), which
    seed their reference maps: the figures of a run's images taken chunk by chunk and
    joined (`join_figures`) are those of all of them at once.
    """
    if not maps:
        raise SanityError("no maps to check for signal; select at least one method")
    reference = random_map(images.detach().to(torch.float64), seed, positions)
    figures = {REFERENCE: signal_figures(reference, images)}
    figures.update({name: signal_figures(value, images) for name, value in maps.items()})
    return figures


def join_figures(parts: Sequence[Mapping[str, Mapping[str, Tensor]]]) -> dict[str, dict[str, Tensor]]:
    """The figures of chunks of images (`figures_by_method`'s, in image order) as one."""
    return {name: {figure: torch.cat([part[name][figure] for part in parts]) for figure in FIGURES}
            for name in parts[0]}


def table_of(figures: Mapping[str, Mapping[str, Tensor]], *, controls: Collection[str] = (),
             margin: float = MARGIN) -> pd.DataFrame:
    """`signal_table` from figures already computed (`figures_by_method`)."""
    rows = [_row(name, values, figures[REFERENCE], name == REFERENCE or name in controls, margin)
            for name, values in figures.items()]
    return pd.DataFrame(rows)


def uninformative(table: pd.DataFrame) -> list[str]:
    """The methods (controls aside) whose maps are not told apart from noise."""
    rows = table[~table["is_control"].astype(bool) & ~table["informative"].astype(bool)]
    return rows["method"].tolist()


def lower_bound(differences: Tensor, confidence: float = CONFIDENCE) -> float:
    """Lower one-sided `confidence` bound (Student t) of the mean of (B,) paired
    differences, NaN values left out; NaN with fewer than two values."""
    values = differences[~torch.isnan(differences)].to(torch.float64)
    n = values.numel()
    if n < 2:
        return math.nan
    spread = values.std().item() / math.sqrt(n)
    return values.mean().item() - float(stats.t.ppf(confidence, n - 1)) * spread


def _row(name: str, values: dict[str, Tensor], reference: dict[str, Tensor], is_control: bool,
         margin: float) -> dict:
    row: dict = {"method": name, "n_images": len(values[FIGURES[0]])}
    for figure in FIGURES:
        row[figure] = _nanmean(values[figure])
        row[f"{figure}_std"] = _nanstd(values[figure])
    bounds = [lower_bound(values[f].cpu() - reference[f].cpu()) for f in FIGURES]
    defined = [b for b in bounds if not math.isnan(b)]
    row["excess"] = max(defined) if defined else math.nan
    row["informative"] = bool(defined) and row["excess"] > margin
    row["is_control"] = is_control
    return row


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per row of (B, N) tensors -> (B,); NaN where a row is constant."""
    ca, cb = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    den = torch.sqrt((ca * ca).sum(dim=1) * (cb * cb).sum(dim=1))
    r = (ca * cb).sum(dim=1) / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, r, math.nan).clamp(-1.0, 1.0)


def _nanmean(values: Tensor) -> float:
    kept = values[~torch.isnan(values)]
    return kept.mean().item() if kept.numel() else math.nan


def _nanstd(values: Tensor) -> float:
    kept = values[~torch.isnan(values)]
    return kept.std().item() if kept.numel() > 1 else math.nan


def _check_shapes(maps: Tensor, images: Tensor) -> None:
    if images.dim() != 4 or maps.dim() != 4:
        raise SanityError(f"signal check needs (B, C, H, W) maps and images, got maps {tuple(maps.shape)} "
                          f"and images {tuple(images.shape)}")
    if maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise SanityError(f"maps {tuple(maps.shape)} do not match images {tuple(images.shape)}; give one map "
                          "per image at the image's height and width")
