"""Similarity metrics between two batches of saliency maps (batched torch).

Reproduces the comparisons of "Sanity Checks for Saliency Maps" (Adebayo et
al. 2018): Spearman rank correlation with and without absolute value, SSIM
and HOG similarity, each after a per-image normalization.

Everything runs in float64 on the device of the inputs, batched over images:
no host round trip, no Python loop over images or pixels (on the CPU the sorts
go through NumPy's argsort on the tensors' own memory, see ``_sort``).

Reference behaviour matched (see tests/test_metrics.py):
  * ``rankdata``  == ``scipy.stats.rankdata(x, method="average")``
  * ``spearman``  == ``scipy.stats.spearmanr``
  * ``ssim``      == ``skimage.metrics.structural_similarity`` with
                     ``gaussian_weights=True``
  * ``hog``       == ``skimage.feature.hog`` (2-D image, L2-Hys,
                     ``feature_vector=True``)

NaN policy: a correlation with a constant input (undefined), an SSIM of maps
smaller than the Gaussian window, and a HOG similarity of maps too small to
hold one block are NaN; nothing raises or warns for those cases.

Cost: a rank correlation is mostly its two sorts. Every normalization is a
non-decreasing function of a map's channel sum, so ``compare_variants`` sorts
each map once with and once without absolute value and derives the ranks of
every normalization (the paper's clipped one included) from those two sorts.
A check compares every state with the same step-0 maps, so the ranks of the
reference maps it has seen are kept (``REFERENCE_CACHE_BYTES`` at most, see
``_ReferenceRanks``) inside a ``kept_ranks()`` block, whose owner (the state
loop, for one seed's states) decides how long they live, and only the other maps
are ranked when the same reference comes again; outside such a block nothing is
kept between calls. Memory: every
metric is per image, so ``compare`` works through the images in chunks of at
most ``COMPARE_CHUNK_VALUES`` map values; its float64 temporaries stay bounded
however many images are compared.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

METRICS = ("spearman_abs", "spearman", "ssim", "hog")
NORMALIZATIONS = ("paper", "none", "max_abs", "second_moment")

# skimage's structural_similarity truncates its Gaussian at 3.5 sigma (an
# 11-tap window for sigma 1.5, as in Wang et al. 2004).
_SSIM_TRUNCATE = 3.5
# skimage's _hog_normalize_block epsilon.
_HOG_EPS = 1e-5
# Below this many values a sort is too short to gain from threads (their start costs more).
_PARALLEL_SORT_VALUES = 1 << 16
# L2-Hys clips the L2-normalized block at this value (Lowe 2004).
_HOG_CLIP = 0.2
_F64 = torch.float64
_EXACT_IN_F64 = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # every value converts exactly
# Most bytes of reference ranks and SSIM moments (and the copies that validate them) kept between
# compare() calls: about 2.1 MiB an image of 224 x 224, so a check's 64 such references fit whole.
REFERENCE_CACHE_BYTES = 256 * 2**20
# Most map values compared at once (an 8 MiB float64 temporary; a handful are alive at a time).
COMPARE_CHUNK_VALUES = 2**20


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _check_choice(name: str, choices: Sequence[str], what: str) -> None:
    if name not in choices:
        raise ValueError(f"unknown {what} {name!r}; valid choices: {', '.join(choices)}")


def _nan(batch: int, like: torch.Tensor) -> torch.Tensor:
    """A (batch,) float64 tensor of NaN on ``like``'s device."""
    return torch.full((batch,), math.nan, dtype=_F64, device=like.device)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0; num unchanged where den is 0 (or NaN).

    Used by the unclipped schemes: a zero or constant map keeps its values
    (zero after min-subtraction) instead of turning into inf / NaN.
    """
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), num)


def _clip_div(num: torch.Tensor, den: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clip(num / den, lo, hi), with the limit den -> 0+ where den is 0.

    That limit is clip(sign(num) * inf) = sign(num) clipped, so a map whose
    99th percentile equals its minimum still yields a finite, ordered map.
    """
    ok = den > 0
    q = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.sign(num))
    return q.clamp(lo, hi)


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile along the last dim with NumPy's default 'linear' method.

    (..., N) -> (..., 1). Sort-based rather than torch.quantile, which
    refuses inputs of more than 2**24 elements (a big batch of 299x299 maps).
    """
    return _quantile_of_sorted(x.sort(dim=-1).values, q)


def _quantile_of_sorted(s: torch.Tensor, q: float) -> torch.Tensor:
    """_quantile() of values already sorted along the last dim: (..., N) -> (..., 1)."""
    pos = q * (s.shape[-1] - 1)
    i0 = math.floor(pos)
    i1 = min(i0 + 1, s.shape[-1] - 1)
    return _lerp(s[..., i0 : i0 + 1], s[..., i1 : i1 + 1], pos - i0)


def _upper_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """_quantile(x, q) for q near 1 from the largest values only: (..., N) -> (..., 1).

    topk returns the same elements a full sort puts at those positions (NaN counts as
    the largest in both), at a fraction of the sort's cost for the 99th percentile.
    """
    n = x.shape[-1]
    pos = q * (n - 1)
    i0 = math.floor(pos)
    i1 = min(i0 + 1, n - 1)
    top = x.topk(n - i0, dim=-1, sorted=True).values  # descending: position i of the sort is top[n - 1 - i]
    return _lerp(top[..., n - 1 - i0 : n - i0], top[..., n - 1 - i1 : n - i1], pos - i0)


def _lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """NumPy's _lerp: interpolate from the nearer end for accuracy."""
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)


# --------------------------------------------------------------------------
# rank correlation
# --------------------------------------------------------------------------


@torch.no_grad()  # a metric, not a loss: no autograd graph (in-place ops are safe)
def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) along the last dim, ties get their mean rank.

    Shape (..., N) -> (..., N), float64. Equals
    ``scipy.stats.rankdata(x, method='average', axis=-1)``; a row with a NaN
    is all NaN (scipy's nan_policy='propagate').
    """
    if x.shape[-1] == 0:
        return torch.empty(x.shape, dtype=_F64, device=x.device)
    # Floats sort in their own dtype (every one of them is exact in float64, so the order and
    # the ties are the same); other dtypes as float64, as the ranks are.
    return _ranks_of_sorted(*_sort(x if x.dtype in _EXACT_IN_F64 else x.to(_F64)))


def _sort(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x sorted along the last dim, and where each value was (int64): x.sort()'s two outputs.

    On the CPU, float32 and float64 go through NumPy's argsort on the tensor's own memory
    (its vectorized quicksort takes about half the time of torch's sort there); elsewhere
    torch.sort. Any sorting permutation serves the ranks (equal values get their mean rank),
    and both put NaN last.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.ndim > 0:
        order = torch.from_numpy(_argsort_rows(x.detach().numpy()))
        return x.gather(-1, order), order
    return x.sort(dim=-1)


def _argsort_rows(values: np.ndarray) -> np.ndarray:
    """np.argsort(values, axis=-1), its rows shared out among torch's CPU threads.

    NumPy sorts on one thread and lets go of the GIL while it sorts, so each thread sorts
    its own rows; every row is sorted on its own either way, so the permutation is the
    same. Without it, the sorts of 224-pixel maps take as long as the rest of comparing
    while the model's passes use every thread.
    """
    threads = min(torch.get_num_threads(), values.shape[0] if values.ndim > 1 else 1)
    if threads < 2 or values.size < _PARALLEL_SORT_VALUES:
        return np.argsort(values, axis=-1)
    rows = values.reshape(-1, values.shape[-1])
    order = np.empty(rows.shape, dtype=np.intp)
    bounds = np.linspace(0, len(rows), threads + 1).astype(int)

    def sort(part: int) -> None:
        start, stop = bounds[part], bounds[part + 1]
        order[start:stop] = np.argsort(rows[start:stop], axis=-1)

    list(_sort_pool(threads).map(sort, range(threads)))
    return order.reshape(values.shape)


@functools.cache
def _sort_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, for the life of the process (its threads sleep when idle)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="sanity-sort")


def _ranks_of_sorted(s: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """rankdata() of x from s, x's values in ascending order along the last dim, and
    order, where they were in x (x.sort()'s two outputs): (..., N) -> (..., N) float64.

    Only the sorted values and the permutation matter, so the ranks of f(x) for any
    non-decreasing f come from the same sort: f(s) is sorted and `order` sorts f(x).
    """
    n = s.shape[-1]
    nan_rows = torch.isnan(s).any(dim=-1, keepdim=True)
    new = s[..., 1:] != s[..., :-1]
    if bool(new.all()):  # no ties, the usual case for real-valued maps: the ranks are the positions
        del new
        positions = torch.arange(1, n + 1, dtype=_F64, device=s.device).expand(order.shape)
        ranks = torch.empty(order.shape, dtype=_F64, device=s.device).scatter_(-1, order, positions)
        return ranks.masked_fill(nan_rows, math.nan)
    edge = torch.ones_like(s[..., :1], dtype=torch.bool)
    starts = torch.cat([edge, new], dim=-1)  # first element of a tie group
    ends = torch.cat([new, edge], dim=-1)  # last element of a tie group
    del new  # temporaries go as soon as they are used: a big batch holds few (..., N) arrays at once
    pos = torch.arange(n, device=s.device, dtype=torch.int32 if n < 2**31 else torch.int64).expand(order.shape)
    # Propagate each group's first index forward and last index backward.
    first = torch.where(starts, pos, 0).cummax(dim=-1).values
    del starts
    last = torch.where(ends, pos, n - 1).flip(-1).cummin(dim=-1).values.flip(-1)
    del ends
    mean_rank = first.to(_F64).add_(last).div_(2).add_(1)
    del first, last
    ranks = torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)
    return ranks.masked_fill(nan_rows, math.nan)


def _pearson_of_ranks(ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of (B, N) average ranks -> (B,); NaN if constant."""
    n = ra.shape[-1]
    if n < 2:
        return _nan(ra.shape[0], ra)
    ra, rb = ra.to(_F64), rb.to(_F64)  # kept ranks may be float32 (see _compact)
    # Average ranks of N values always sum to N(N+1)/2: the exact mean.
    ca, cb = ra - (n + 1) / 2, rb - (n + 1) / 2
    den = torch.sqrt((ca * ca).sum(-1) * (cb * cb).sum(-1))
    r = (ca * cb).sum(-1) / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, r, math.nan).clamp(-1.0, 1.0)


@torch.no_grad()  # a metric, not a loss: no autograd graph (in-place ops are safe)
def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row: (B, N) x (B, N) -> (B,) float64.

    Tie-aware (average ranks), equal to ``scipy.stats.spearmanr(a[i], b[i])``.
    NaN where either row is constant, has a NaN, or N < 2.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"spearman expects two (B, N) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _pearson_of_ranks(rankdata(a), rankdata(b))


# --------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------


def _gaussian_weights(sigma: float, radius: int) -> list[float]:
    """scipy.ndimage's normalized 1-D Gaussian, 2*radius+1 taps, as Python floats.

    Python floats (not a device tensor) so that the filter needs no
    host-device transfer.
    """
    phi = [math.exp(-0.5 / (sigma * sigma) * x * x) for x in range(-radius, radius + 1)]
    total = math.fsum(phi)
    return [p / total for p in phi]


def _correlate1d_valid(x: torch.Tensor, w: list[float], dim: int) -> torch.Tensor:
    """1-D correlation with a symmetric kernel along ``dim``, 'valid' outputs only.

    Output size is size - 2r: only the samples whose window lies inside the
    image. SSIM crops exactly r = (win_size-1)//2 samples at each border
    before averaging, so scipy's 'reflect' padding never reaches a value
    that is averaged: the valid part equals skimage's cropped map, with no
    padding to build. Pairs are summed first, as scipy's correlate1d does.
    """
    r = (len(w) - 1) // 2
    n = x.shape[dim] - 2 * r
    out = x.narrow(dim, r, n) * w[r]
    pair = torch.empty_like(out)
    for j in range(1, r + 1):  # a few taps, each vectorized over the batch
        torch.add(x.narrow(dim, r - j, n), x.narrow(dim, r + j, n), out=pair)
        out.add_(pair, alpha=w[r + j])
    return out


@torch.no_grad()  # a metric, not a loss: no autograd graph (in-place ops are safe)
def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    data_range: float = 2.0,
    sigma: float = 1.5,
    use_sample_covariance: bool = True,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean Gaussian-window SSIM per image: (B, H, W) x (B, H, W) -> (B,) float64.

    Equals ``skimage.metrics.structural_similarity(a[i], b[i],
    data_range=data_range, gaussian_weights=True, sigma=sigma,
    use_sample_covariance=use_sample_covariance)`` (window truncated at 3.5
    sigma, a border of (win-1)//2 cropped before the mean, so skimage's
    'reflect' padding never matters). Maps smaller than the window give NaN.
    """
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(f"ssim expects two (B, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if sigma <= 0 or data_range <= 0:
        raise ValueError("ssim needs sigma > 0 and data_range > 0")
    x = a.to(_F64)
    return _ssim_with(_ssim_moments(x, sigma), x, b.to(_F64), data_range=data_range, sigma=sigma,
                      use_sample_covariance=use_sample_covariance, k1=k1, k2=k2)


def _ssim_radius(sigma: float) -> int:
    return int(_SSIM_TRUNCATE * sigma + 0.5)


def _ssim_moments(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Gaussian-filtered x and x**2 of float64 (B, H, W) maps: (B, 2, H - 2r, W - 2r),
    the part of SSIM that depends on one map only (compare keeps a reference's).
    Maps smaller than the window: an empty (B, 2, 0, 0)."""
    radius = _ssim_radius(sigma)
    if min(x.shape[-2:]) < 2 * radius + 1:
        return x.new_empty((x.shape[0], 2, 0, 0))
    return _gaussian_filter_valid(torch.stack([x, x * x], dim=1), sigma)


def _gaussian_filter_valid(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, P, H, W) -> (B, P, H - 2r, W - 2r): rows then columns, like scipy's separable
    gaussian_filter, the valid part only. Each plane on its own: the same numbers whichever
    planes are filtered together."""
    w = _gaussian_weights(sigma, _ssim_radius(sigma))
    return _correlate1d_valid(_correlate1d_valid(planes, w, -2), w, -1)


def _ssim_with(moments: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, data_range: float, sigma: float,
               use_sample_covariance: bool, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """ssim(x, y) from _ssim_moments(x, sigma): float64 (B, H, W) maps -> (B,)."""
    if moments.shape[-1] == 0:
        return _nan(x.shape[0], x)
    ux, uxx = moments.unbind(1)
    uy, uyy, uxy = _gaussian_filter_valid(torch.stack([y, y * y, x * y], dim=1), sigma).unbind(1)
    npix = (2 * _ssim_radius(sigma) + 1) ** 2
    cov_norm = npix / (npix - 1) if use_sample_covariance else 1.0
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(-2, -1))  # already cropped by the 'valid' filtering


# --------------------------------------------------------------------------
# HOG
# --------------------------------------------------------------------------


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _cell_histograms(
    x: torch.Tensor, cell: tuple[int, int], n_cells: tuple[int, int], orientations: int
) -> torch.Tensor:
    """skimage's per-cell orientation histograms: (B, H, W) -> (B, ncr, ncc, O).

    Gradient by central differences with zero borders; each pixel votes its
    magnitude into the one bin with start <= angle < end (unsigned angle in
    [0, 180)); a cell's bin is the mean over the cell's pixels.
    """
    b = x.shape[0]
    g_row, g_col = torch.zeros_like(x), torch.zeros_like(x)
    g_row[:, 1:-1, :] = x[:, 2:, :] - x[:, :-2, :]
    g_col[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
    (cr, cc), (nr, nc) = cell, n_cells
    g_row, g_col = g_row[:, : nr * cr, : nc * cc], g_col[:, : nr * cr, : nc * cc]
    mag = torch.hypot(g_col, g_row)
    # Same expression as skimage (rad2deg(arctan2) % 180) so bin edges agree.
    angle = torch.remainder(torch.atan2(g_row, g_col) * (180.0 / math.pi), 180.0)
    width = 180.0 / orientations
    # The bin i with width * i <= angle < width * (i + 1): angle / width rounded down, then
    # moved by one where that rounding crossed an edge, so the edges are skimage's exactly.
    unknown = torch.isnan(angle)  # a NaN gradient is in no bin: it votes nothing, as in skimage
    mag = mag.masked_fill(unknown, 0.0)
    index = torch.floor(angle / width).nan_to_num_(0.0).clamp_(0, orientations - 1)
    index -= (angle < width * index).to(index.dtype)
    index += ((angle >= width * (index + 1)) & (index < orientations - 1)).to(index.dtype)
    # Each pixel's vote goes to (image, cell row, cell column, bin) in one scatter.
    cell_row = torch.arange(nr * cr, device=x.device) // cr
    cell_col = torch.arange(nc * cc, device=x.device) // cc
    cell = (cell_row[:, None] * nc + cell_col[None, :]) * orientations  # (H', W')
    image = torch.arange(b, device=x.device)[:, None, None] * (nr * nc * orientations)
    slot = (image + cell + index.long()).flatten()
    hist = torch.zeros(b * nr * nc * orientations, dtype=x.dtype, device=x.device).index_add_(0, slot, mag.flatten())
    return hist.view(b, nr, nc, orientations) / (cr * cc)


@torch.no_grad()  # a metric, not a loss: no autograd graph (in-place ops are safe)
def hog(
    maps: torch.Tensor,
    *,
    orientations: int = 9,
    pixels_per_cell: int | Sequence[int] = 16,
    cells_per_block: int | Sequence[int] = 3,
) -> torch.Tensor:
    """HOG feature vectors: (B, H, W) -> (B, F) float64.

    Equals ``skimage.feature.hog(maps[i], orientations, pixels_per_cell,
    cells_per_block, block_norm='L2-Hys', feature_vector=True)``, with F =
    n_blocks_row * n_blocks_col * cells_row * cells_col * orientations in the
    same order. Maps too small to hold one block give F == 0 (skimage raises).
    skimage accumulates each cell in a C float (float32); this sums in
    float64, so features agree to about 1e-7 relative, not bit for bit.
    """
    if maps.ndim != 3:
        raise ValueError(f"hog expects a (B, H, W) tensor, got shape {tuple(maps.shape)}")
    x = maps.to(_F64)
    (cr, cc), (br, bc) = _pair(pixels_per_cell), _pair(cells_per_block)
    nr, nc = x.shape[1] // cr, x.shape[2] // cc
    nbr, nbc = nr - br + 1, nc - bc + 1
    if nbr <= 0 or nbc <= 0:
        return x.new_zeros((x.shape[0], 0))
    hist = _cell_histograms(x, (cr, cc), (nr, nc), orientations)
    # (B, nbr, nbc, O, br, bc) -> (B, nbr, nbc, br, bc, O): skimage's ravel order.
    blocks = hist.unfold(1, br, 1).unfold(2, bc, 1).permute(0, 1, 2, 4, 5, 3)
    dims = (-3, -2, -1)
    blocks = blocks / torch.sqrt((blocks**2).sum(dims, keepdim=True) + _HOG_EPS**2)
    blocks = blocks.clamp(max=_HOG_CLIP)
    blocks = blocks / torch.sqrt((blocks**2).sum(dims, keepdim=True) + _HOG_EPS**2)
    return blocks.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------
# normalization
# --------------------------------------------------------------------------


def _paper_normalize(v: torch.Tensor, metric: str, single_channel: bool) -> torch.Tensor:
    """The authors' per-image normalization of flattened (B, N) maps."""
    if metric in ("ssim", "hog"):  # min-max of the signed map to [0, 1]
        lo = v.amin(-1, keepdim=True)
        return _safe_div(v - lo, v.amax(-1, keepdim=True) - lo)
    if single_channel:  # their MNIST code: divide by the max |value|, no clipping
        return _safe_div(v, v.abs().amax(-1, keepdim=True))
    if metric == "spearman_abs":  # v is already sum |map|
        lo = v.amin(-1, keepdim=True)
        return _clip_div(v - lo, _quantile(v, 0.99) - lo, 0.0, 1.0)
    return _clip_div(v, _quantile(v.abs(), 0.99), -1.0, 1.0)


@torch.no_grad()  # a metric, not a loss: no autograd graph (in-place ops are safe)
def normalize(maps: torch.Tensor, metric: str, scheme: str = "paper",
              single_channel: bool | None = None) -> torch.Tensor:
    """Reduce channels and normalize each map for ``metric``: (B, C, H, W) -> (B, H, W) float64.

    Channels: sum of |map| for 'spearman_abs', signed sum otherwise. Schemes:
    'paper' (the authors' code: see compare() and REFERENCE.md section 2),
    'none', 'max_abs' (v / max|v|), 'second_moment' (v / sqrt(mean v**2)).
    A zero denominator leaves the map as is (a constant map stays constant).
    single_channel: whether the paper's rule for one-channel (MNIST) inputs applies;
    None infers it from C, but a GradCAM map (C = 1) of an RGB input is not one.
    """
    _check_choice(metric, METRICS, "metric")
    _check_choice(scheme, NORMALIZATIONS, "normalization")
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (B, C, H, W), got {tuple(maps.shape)}")
    x = maps.to(_F64)
    v = x.abs().sum(1) if metric == "spearman_abs" else x.sum(1)
    flat = v.flatten(1)
    if scheme == "none":
        out = flat
    elif scheme == "max_abs":
        out = _safe_div(flat, flat.abs().amax(-1, keepdim=True))
    elif scheme == "second_moment":
        out = _safe_div(flat, flat.square().mean(-1, keepdim=True).sqrt())
    else:
        single = maps.shape[1] == 1 if single_channel is None else single_channel
        out = _paper_normalize(flat, metric, single_channel=single)
    return out.view(v.shape)


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------

# (metric, normalization): one score of compare_variants().
Variant = tuple[str, str]
# The metrics that correlate the ranks of the normalized map's own values: every
# normalization is a non-decreasing function of one channel sum, so one sort serves all.
RANK_METRICS = ("spearman_abs", "spearman")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _compact(ranks: torch.Tensor) -> torch.Tensor:
    """Average ranks in float32 where that is exact (multiples of 1/2 up to N < 2**23): half the
    memory for the ranks kept between calls; _pearson_of_ranks widens them back to float64."""
    return ranks.float() if ranks.shape[-1] < 2**23 else ranks


class _ReferenceRanks:
    """Ranks of reference maps that compare_variants() has seen, kept for the next
    call with the same reference (the next state of a check), least recently used
    dropped first beyond ``max_bytes``.

    An entry is used only for the same tensor object (held weakly: the entry
    goes when the tensor does) whose values still equal a copy taken when it
    was ranked, so a reference changed in place, by any means, is ranked anew.
    An entry holds what was kept of every variant asked for so far (ranks, SSIM
    moments), each under its key.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[weakref.ref, torch.Tensor, dict[tuple, torch.Tensor]]] = OrderedDict()

    def ranks(self, reference: torch.Tensor, rows: slice, keys: Sequence[tuple],
              compute: Callable[[list[tuple]], dict[tuple, torch.Tensor]]) -> dict[tuple, torch.Tensor]:
        """{key: ranks} of ``reference[rows]``: from the cache where they are there, the
        others from compute(missing keys), which returns {key: ranks} for those keys."""
        full_key = (id(reference), rows.start, rows.stop)
        entry = self._entries.get(full_key)
        if entry is not None and not (entry[0]() is reference and _same(entry[1], reference[rows])):
            del self._entries[full_key]
            entry = None
        kept = entry[2] if entry is not None else {}
        missing = [key for key in keys if key not in kept]
        computed = compute(missing) if missing else {}
        result = {key: kept[key] if key in kept else computed[key] for key in keys}
        if not computed:
            if entry is not None:
                self._entries.move_to_end(full_key)
            return result
        if entry is None:
            entries = self._entries
            forget = lambda _, k=full_key: entries.pop(k, None)  # noqa: E731 - runs when the tensor is freed
            entry = (weakref.ref(reference, forget), reference[rows].detach().clone(), {})
        self._entries.pop(full_key, None)
        grown = (entry[0], entry[1], {**entry[2], **computed})
        if self._make_room(_entry_bytes(grown), id(reference)):
            self._entries[full_key] = grown
        return result

    def _make_room(self, size: int, owner: int) -> bool:
        """Drop the least recently used entries of other tensors until `size` more bytes fit;
        False (nothing dropped) when they cannot. Chunks of the owner's own tensor stay: a
        reference bigger than the bound, compared chunk after chunk in every state, then keeps
        its first chunks for good instead of each chunk pushing out the one needed next."""
        sizes = {key: _entry_bytes(entry) for key, entry in self._entries.items()}
        others = [key for key in sizes if key[0] != owner]
        if sum(sizes.values()) - sum(sizes[key] for key in others) + size > self.max_bytes:
            return False
        total = sum(sizes.values()) + size
        for key in others:  # least recently used first
            if total <= self.max_bytes:
                break
            del self._entries[key]
            total -= sizes[key]
        return True


def _entry_bytes(entry: tuple[weakref.ref, torch.Tensor, dict[tuple, torch.Tensor]]) -> int:
    return _nbytes(entry[1]) + sum(_nbytes(value) for value in entry[2].values())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


_KEPT: ContextVar[_ReferenceRanks | None] = ContextVar("kept_ranks", default=None)


@contextmanager
def kept_ranks(max_bytes: int = REFERENCE_CACHE_BYTES) -> Iterator[_ReferenceRanks]:
    """Keep what compare_variants() computes of each reference (its ranks, SSIM moments) for
    the later calls with the same reference inside this block, ``max_bytes`` at most; all of
    it goes when the block ends. The scores are those of a fresh ranking either way."""
    token = _KEPT.set(_ReferenceRanks(max_bytes))
    try:
        yield _KEPT.get()
    finally:
        _KEPT.reset(token)


def _normalized_sorted(v: torch.Tensor, s: torch.Tensor, metric: str, scheme: str, single: bool) -> torch.Tensor:
    """normalize()'s values of the channel sums v (B, N), in the ascending order of s = v sorted.

    Each scheme maps every value by one non-decreasing function per image (a positive
    scale, a shift, a clip), computed from the same denominators as normalize(); so the
    result is sorted, and the same numbers normalize() gives, only in sorted order.
    """
    if scheme == "none":
        return s
    if scheme == "max_abs" or (scheme == "paper" and single):
        return _safe_div(s, v.abs().amax(-1, keepdim=True))
    if scheme == "second_moment":
        return _safe_div(s, v.square().mean(-1, keepdim=True).sqrt())
    if metric == "spearman_abs":  # the paper's: (v - min) / (p99 - min), clipped to [0, 1]
        lo = v.amin(-1, keepdim=True)
        return _clip_div(s - lo, _quantile_of_sorted(s, 0.99) - lo, 0.0, 1.0)
    return _clip_div(s, _upper_quantile(v.abs(), 0.99), -1.0, 1.0)  # v / p99(|v|), clipped to [-1, 1]


def _rank_maps(maps: torch.Tensor, variants: Sequence[Variant], single_channel: bool | None,
               hog_options: dict) -> dict[Variant, torch.Tensor]:
    """Ranks of what each rank variant correlates: (B, C, H, W) maps -> {variant: (B, F)}.

    Spearman variants: one sort of the channel sum per metric (with or without absolute
    value), each normalization's ranks derived from it (_ranks_of_sorted); equal to
    rankdata(normalize(maps, metric, scheme).flatten(1)). HOG: the ranks of the HOG
    features of each normalization's map.
    """
    single = maps.shape[1] == 1 if single_channel is None else single_channel
    x = maps.to(_F64)
    out: dict[Variant, torch.Tensor] = {}
    for metric in RANK_METRICS:
        schemes = [scheme for m, scheme in variants if m == metric]
        if not schemes:
            continue
        v = (x.abs().sum(1) if metric == "spearman_abs" else x.sum(1)).flatten(1)
        s, order = _sort(v)
        for scheme in schemes:
            out[(metric, scheme)] = _compact(_ranks_of_sorted(_normalized_sorted(v, s, metric, scheme, single), order))
        del s, order
    for metric, scheme in variants:
        if metric == "hog":
            out[(metric, scheme)] = _compact(rankdata(hog(normalize(maps, "hog", scheme, single_channel),
                                                          **hog_options)))
    return out


def _reference_values(maps: torch.Tensor, variants: Sequence[Variant], cache_key: dict[Variant, tuple],
                      single_channel: bool | None, hog_options: dict, sigma: float) -> dict[tuple, torch.Tensor]:
    """What compare_variants keeps of a reference chunk (B, C, H, W), under each variant's
    cache key: the ranks of the rank metrics, the SSIM moments (_ssim_moments) for 'ssim'."""
    values = {cache_key[v]: r for v, r in _rank_maps(maps, [v for v in variants if v[0] != "ssim"],
                                                      single_channel, hog_options).items()}
    for variant in variants:
        if variant[0] == "ssim":
            values[cache_key[variant]] = _ssim_moments(
                normalize(maps, "ssim", variant[1], single_channel).to(_F64), sigma)
    return values


def _check_pair(reference: torch.Tensor, other: torch.Tensor) -> None:
    if reference.shape != other.shape:
        raise ValueError(f"shape mismatch: {tuple(reference.shape)} vs {tuple(other.shape)}")
    if reference.ndim != 4 or min(reference.shape[1:]) < 1:
        raise ValueError(f"maps must have shape (B, C, H, W) with C, H, W >= 1, got {tuple(reference.shape)}")
    if reference.device != other.device:
        raise ValueError(f"device mismatch: {reference.device} vs {other.device}")


@torch.no_grad()  # a metric, not a loss: no autograd graph (in-place ops are safe)
def compare_variants(
    reference: torch.Tensor,
    other: torch.Tensor,
    variants: Iterable[Variant],
    *,
    ssim_data_range: float = 2.0,
    ssim_sigma: float = 1.5,
    ssim_sample_covariance: bool = True,
    hog_pixels_per_cell: int = 16,
    hog_cells_per_block: int = 3,
    hog_orientations: int = 9,
    single_channel: bool | None = None,
) -> dict[Variant, torch.Tensor]:
    """Similarity of ``other`` to ``reference`` per image, for each (metric, normalization).

    reference, other: (B, C, H, W) maps, any float dtype, one device.
    Returns {(metric, normalization): (B,) float64 tensor on that device}, each equal to
    compare(reference, other, metric, normalization)[metric]: the Spearman variants of
    one map share its two sorts (with and without absolute value), and the reference's
    ranks are kept for the next call with the same reference inside ``kept_ranks()``.
    """
    variants = tuple(dict.fromkeys(variants))
    for metric, scheme in variants:
        _check_choice(metric, METRICS, "metric")
        _check_choice(scheme, NORMALIZATIONS, "normalization")
    _check_pair(reference, other)
    hog_options = dict(orientations=hog_orientations, pixels_per_cell=hog_pixels_per_cell,
                       cells_per_block=hog_cells_per_block)
    ssim_options = dict(data_range=ssim_data_range, sigma=ssim_sigma, use_sample_covariance=ssim_sample_covariance)
    ranked = [variant for variant in variants if variant[0] != "ssim"]
    own_options = {"hog": tuple(sorted(hog_options.items())), "ssim": (ssim_sigma,)}
    cache_key = {variant: (*variant, single_channel, own_options.get(variant[0], ())) for variant in variants}
    by_key = {key: variant for variant, key in cache_key.items()}
    per_chunk = max(1, COMPARE_CHUNK_VALUES // math.prod(reference.shape[1:]))
    kept_by = _KEPT.get() or _ReferenceRanks(REFERENCE_CACHE_BYTES)  # outside kept_ranks(): for this call only
    chunks: dict[Variant, list[torch.Tensor]] = {variant: [] for variant in variants}
    for start in range(0, max(len(reference), 1), per_chunk):  # no image: one empty chunk
        rows = slice(start, start + per_chunk)
        kept = kept_by.ranks(reference, rows, list(by_key),
                               lambda missing, rows=rows: _reference_values(
                                   reference[rows], [by_key[k] for k in missing], cache_key,
                                   single_channel, hog_options, ssim_sigma))
        for metric, scheme in variants:
            if metric == "ssim":
                a, b = (normalize(maps[rows], metric, scheme, single_channel).to(_F64) for maps in (reference, other))
                chunks[(metric, scheme)].append(
                    _ssim_with(kept[cache_key[(metric, scheme)]], a, b, **ssim_options))
        other_ranks = _rank_maps(other[rows], ranked, single_channel, hog_options)
        for variant in ranked:
            chunks[variant].append(_pearson_of_ranks(kept[cache_key[variant]], other_ranks[variant]))
    return {variant: torch.cat(values) for variant, values in chunks.items()}


@torch.no_grad()  # a metric, not a loss: no autograd graph (in-place ops are safe)
def compare(
    reference: torch.Tensor,
    other: torch.Tensor,
    metrics: Iterable[str] | str = METRICS,
    normalization: str = "paper",
    **options,
) -> dict[str, torch.Tensor]:
    """Similarity of ``other`` to ``reference``, per image and metric.

    reference, other: (B, C, H, W) maps, any float dtype, one device.
    options: compare_variants()'s (ssim_data_range, ssim_sigma, ssim_sample_covariance,
    hog_pixels_per_cell, hog_cells_per_block, hog_orientations, single_channel;
    single_channel: see normalize(), None infers it from the maps' C).
    Returns {metric: (B,) float64 tensor on that device}. NaN marks an
    undefined value (constant map for the correlations, maps smaller than
    the SSIM window or than one HOG block).
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    for m in metrics:
        _check_choice(m, METRICS, "metric")
    _check_choice(normalization, NORMALIZATIONS, "normalization")
    scores = compare_variants(reference, other, [(m, normalization) for m in metrics], **options)
    return {m: scores[(m, normalization)] for m in metrics}


@torch.no_grad()
def histogram_entropy(maps: torch.Tensor, bins: int = 100) -> torch.Tensor:
    """Shannon entropy (nats) of the histogram of each map's values (eMPRT, Hedström et al. 2023).

    maps: (B, C, H, W); each map is reduced to sum |map| over channels and min-max
    scaled to [0, 1] before `bins` equal bins are counted. Returns (B,) float64.
    A constant map puts everything in one bin: entropy 0.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (B, C, H, W), got {tuple(maps.shape)}")
    v = maps.to(_F64).abs().sum(dim=1).flatten(1)
    low, high = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    scaled = _safe_div(v - low, high - low)
    index = (scaled * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(v.shape[0], bins, dtype=_F64, device=v.device).scatter_add_(1, index, torch.ones_like(v))
    p = counts / v.shape[1]
    return -(p * torch.log(p.clamp_min(1e-300))).sum(dim=1)
