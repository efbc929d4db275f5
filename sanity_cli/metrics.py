"""Similarity metrics between two batches of saliency maps (batched torch).

Reproduces the comparisons of "Sanity Checks for Saliency Maps" (Adebayo et
al. 2018): Spearman rank correlation with and without absolute value, SSIM
and HOG similarity, each after a per-image normalization.

Everything runs in float64 on the device of the inputs, batched over images:
no host round trip, no Python loop over images or pixels (on the CPU every row of
a batch is sorted by one integer radix sort, see ``_sort``).

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
every normalization (the paper's clipped one included) from those two sorts;
the average ranks come from the equal neighbours alone. A check compares every
state with the same step-0 maps, so the ranks of the reference maps it has seen
are kept (``REFERENCE_CACHE_BYTES`` at most, see ``_ReferenceRanks``) inside a
``kept_ranks()`` block, whose owner (the state loop, for one seed's states)
decides how long they live, and only the other maps are ranked when the same
reference comes again; their ranks are never put back in place (the pairs are
correlated in the other map's sorted order). Outside such a block nothing is
kept between calls. One call with every metric reduces a map's channels once
(``_Reduced``): the signed sum serves the signed Spearman, SSIM and HOG. Memory: every
metric is per image, so ``compare`` works through the images in chunks of at
most ``COMPARE_CHUNK_VALUES`` map values; its float64 temporaries stay bounded
however many images are compared.
"""

from __future__ import annotations

import functools
import math
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
# Most pixels that SSIM filters at once (two 224 x 224 maps): its 22 passes over three planes then
# find them in the cache. 0.82 of the time over a chunk of six maps (one map at a time: 0.95; HOG,
# whose passes are fewer and cheaper, was slower in blocks).
_SSIM_BLOCK_PIXELS = 2**17


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _check_choice(name: str, choices: Sequence[str], what: str) -> None:
    if name not in choices:
        raise ValueError(f"unknown {what} {name!r}; valid choices: {', '.join(choices)}")


def _nan(batch: int, like: torch.Tensor) -> torch.Tensor:
    """A (batch,) float64 tensor of NaN on ``like``'s device."""
    return torch.full((batch,), math.nan, dtype=_F64, device=like.device)


def _has_nan(x: torch.Tensor) -> bool:
    """Whether x holds a NaN. A sum is NaN if a term is (or if +inf meets -inf): a sum, about a
    third of the time of isnan().any(), rules NaN out, and only a NaN sum is looked at closely."""
    return bool(torch.isnan(x.sum())) and bool(torch.isnan(x).any())


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0; num unchanged where den is 0 (or NaN).

    Used by the unclipped schemes: a zero or constant map keeps its values
    (zero after min-subtraction) instead of turning into inf / NaN.
    """
    ok = den > 0
    if bool(ok.all()):  # den holds one number a row: checked at no cost
        return num / den
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), num)


def _clip_div(num: torch.Tensor, den: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clip(num / den, lo, hi), with the limit den -> 0+ where den is 0.

    That limit is clip(sign(num) * inf) = sign(num) clipped, so a map whose
    99th percentile equals its minimum still yields a finite, ordered map.
    """
    ok = den > 0
    if bool(ok.all()):
        return (num / den).clamp_(lo, hi)
    q = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.sign(num))
    return q.clamp_(lo, hi)


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


def _upper_quantile(x: torch.Tensor, q: float, n: int | None = None) -> torch.Tensor:
    """_quantile(x, q) for q near 1 from the largest values only: (..., N) -> (..., 1).

    topk returns the same elements a full sort puts at those positions (NaN counts as
    the largest in both), at a fraction of the sort's cost for the 99th percentile.
    n: the number of values x stands for, if x holds only the largest of them (as many
    as the quantile needs: n - floor(q (n - 1)) at least).
    """
    n = x.shape[-1] if n is None else n
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

    On the CPU, float32 and float64 go through an integer radix sort of all rows at once
    (_radix_sort_rows) where torch has one, else through NumPy's argsort on the tensor's own
    memory (about half the time of torch's comparison sort there); elsewhere torch.sort. Any
    sorting permutation serves the ranks (equal values get their mean rank), and a row with
    a NaN has NaN ranks whatever its order.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.ndim > 0:
        if _RADIX_SORT and x.numel() >= _RADIX_SORT_VALUES and not _has_nan(x):
            rows = x.detach().to(_F64).reshape(-1, x.shape[-1])
            s, order = _radix_sort_rows(rows)
            return s.view(x.shape).to(x.dtype), order.view(x.shape)
        order = torch.from_numpy(_argsort_rows(x.detach().numpy()))
        return x.gather(-1, order), order
    return x.sort(dim=-1)


# torch sorts a long 1-D integer tensor by a parallel radix sort where it is built with FBGEMM
# and OpenMP (x86): per 224-pixel map, 32-bit keys about 0.25 ms, 64-bit keys 0.45 ms, NumPy's
# argsort 2.5 ms (on one thread), torch.sort's comparison sort of float rows 2 ms.
_RADIX_SORT = "fbgemm" in torch.backends.quantized.supported_engines and torch.backends.openmp.is_available()
_RADIX_SORT_VALUES = 1 << 15  # below this torch's 1-D integer sort is a comparison sort
_FLOAT32_MAGNITUDE = 0x7FFFFFFF


def _radix_sort_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, N) float64 without NaN, each row sorted, and where each value was: x.sort()'s outputs.

    One sort of 32-bit integer keys sorts every row. A value's key is its float32 rounding
    (which never reverses an order) as an integer of the same order, shortened by as many low
    bits as the row number needs in front. Values with equal keys may come out in any order;
    each run of them that holds different values (some hundreds of a 224-pixel map's 50,176)
    is then sorted by the values themselves, so the order is exact.
    """
    rows, n = x.shape
    row_bits = (rows - 1).bit_length()
    bits = x.float().view(torch.int32)
    key = torch.where(bits < 0, bits ^ _FLOAT32_MAGNITUDE, bits)  # negative floats: magnitude reversed
    key >>= row_bits
    # row r's keys moved to the r-th of 2**row_bits equal parts of the int32 range
    first = torch.arange(rows, dtype=torch.int64, device=x.device) << (32 - row_bits)
    key += (first + (1 << (31 - row_bits)) - (1 << 31)).to(torch.int32)[:, None]
    sorted_key, order = key.view(-1).sort()
    del key
    tied = torch.eq(sorted_key[1:], sorted_key[:-1]).nonzero().squeeze(1)  # pairs (j, j + 1) of equal keys
    del sorted_key
    if len(tied):
        values = x.reshape(-1)
        differ = values[order[tied]] != values[order[tied + 1]]
        if bool(differ.any()):
            # Runs of consecutive tied pairs share one key. Only a run that holds two different
            # values needs sorting: the many exact ties of a map (zeros, a clipped top, an
            # upsampled coarse map) are in order already.
            run = _run_starts(tied).cumsum(0) - 1
            unsorted = torch.zeros(len(tied), dtype=torch.bool, device=x.device).index_fill_(0, run[differ], True)
            pairs = tied[unsorted[run]]
            _sort_runs(values, order, torch.cat([pairs, pairs + 1]).unique(), n)
    order = order.view(rows, n)
    order -= torch.arange(0, rows * n, n, dtype=torch.int64, device=x.device)[:, None]
    return x.gather(-1, order), order


def _sort_runs(values: torch.Tensor, order: torch.Tensor, places: torch.Tensor, n: int) -> None:
    """Put values[order] in ascending order at `places`, the sorted places of a 1-D permutation
    whose keys tie there, in place: each run of consecutive places within one row of n is
    sorted by the values. (Neighbouring runs of different keys may merge: their values are
    already in order between them.)"""
    run = _run_starts(places, n).cumsum(0)
    where = order[places]
    by_value = values[where].argsort(stable=True)
    by_run = by_value[run[by_value].argsort(stable=True)]  # by run, then by value
    order[places] = where[by_run]


def _run_starts(indices: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Where each run of consecutive integers in ascending `indices` starts (bool, like
    indices); with n, a run also starts at each multiple of n (the first place of a row)."""
    starts = torch.ones(indices.shape, dtype=torch.bool, device=indices.device)
    starts[1:] = indices[1:] != indices[:-1] + 1
    if n is not None:
        starts[1:] |= indices[1:] % n == 0
    return starts


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
    return _in_place(order, _mean_ranks_of_sorted(s))


def _in_place(order: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Ranks given in sorted order (`ranks`), put where their values were (`order`): (..., N) float64."""
    return torch.empty(order.shape, dtype=_F64, device=order.device).scatter_(-1, order, ranks)


def _mean_ranks_of_sorted(s: torch.Tensor) -> torch.Tensor:
    """The average rank of each value of s, values in ascending order along the last dim:
    (..., N) -> (..., N) float64, in s's order (a row with a NaN is all NaN).

    A Pearson correlation does not depend on the order of the pairs, so the Spearman of x
    and y is the Pearson of these and of y's ranks taken in x's sorted order: the ranks of
    a map compared with a kept reference are never put back in place (compare_variants).
    To the bit for maps of up to about 300,000 values: the products of centred half-integer
    ranks are quarter-integers, and their sums stay exact in float64 in any order.
    """
    n = s.shape[-1]
    nan_rows = torch.isnan(s).any(dim=-1, keepdim=True) if _has_nan(s) else None
    mean_rank = torch.arange(1, n + 1, dtype=_F64, device=s.device).expand(s.shape)
    # Equal neighbours (j, j + 1), as flat indices of an (..., N) array whose last column is
    # never one: a run of consecutive pairs is one group of ties, and never crosses a row.
    # Ties are few in real-valued maps (the paper's clipped percent, some exact zeros), so
    # only they are visited; a map of many ties costs about as much as one of none.
    tied = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    torch.eq(s[..., 1:], s[..., :-1], out=tied[..., :-1])
    pairs = tied.flatten().nonzero().squeeze(1)
    del tied
    if len(pairs):
        mean_rank = mean_rank.contiguous().flatten()
        starts = _run_starts(pairs)
        group = starts.cumsum(0) - 1
        ends = torch.ones_like(starts)
        ends[:-1] = starts[1:]
        # a group's first pair (j0, j0 + 1) to its last (j1, j1 + 1): ranks j0 + 1 to j1 + 2
        group_rank = ((pairs[starts] % n + pairs[ends] % n).to(_F64) + 3) / 2
        mean_rank[pairs] = group_rank[group]
        mean_rank[pairs + 1] = group_rank[group]
        mean_rank = mean_rank.view(s.shape)
    return mean_rank if nan_rows is None else mean_rank.masked_fill(nan_rows, math.nan)


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
    return _ssim_with(_ssim_moments(x, sigma, use_sample_covariance), x, b.to(_F64), data_range=data_range,
                      sigma=sigma, use_sample_covariance=use_sample_covariance, k1=k1, k2=k2)


def _ssim_radius(sigma: float) -> int:
    return int(_SSIM_TRUNCATE * sigma + 0.5)


def _covariance_norm(sigma: float, use_sample_covariance: bool) -> float:
    npix = (2 * _ssim_radius(sigma) + 1) ** 2
    return npix / (npix - 1) if use_sample_covariance else 1.0


def _ssim_moments(x: torch.Tensor, sigma: float, use_sample_covariance: bool) -> torch.Tensor:
    """The part of SSIM that depends on x alone, float64 (B, H, W) maps -> (B, 2, H - 2r, W - 2r):
    the Gaussian-filtered x (its local mean) and its local variance (compare keeps a reference's).
    Maps smaller than the window: an empty (B, 2, 0, 0)."""
    radius = _ssim_radius(sigma)
    if min(x.shape[-2:]) < 2 * radius + 1:
        return x.new_empty((x.shape[0], 2, 0, 0))
    moments = _gaussian_filter_valid(torch.stack([x, x * x], dim=1), sigma)
    ux, uxx = moments.unbind(1)
    uxx.sub_(ux * ux).mul_(_covariance_norm(sigma, use_sample_covariance))
    return moments


def _gaussian_filter_valid(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, P, H, W) -> (B, P, H - 2r, W - 2r): rows then columns, like scipy's separable
    gaussian_filter, the valid part only. Each plane on its own: the same numbers whichever
    planes are filtered together."""
    w = _gaussian_weights(sigma, _ssim_radius(sigma))
    return _correlate1d_valid(_correlate1d_valid(planes, w, -2), w, -1)


def _ssim_with(moments: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, data_range: float, sigma: float,
               use_sample_covariance: bool, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """ssim(x, y) from _ssim_moments(x, sigma, use_sample_covariance): float64 (B, H, W) maps -> (B,).

    skimage's formula, ((2 ux uy + c1)(2 vxy + c2)) / ((ux^2 + uy^2 + c1)(vx + vy + c2)),
    worked in place on y's filtered planes."""
    if moments.shape[-1] == 0:
        return _nan(x.shape[0], x)
    per_block = max(1, _SSIM_BLOCK_PIXELS // (y.shape[-2] * y.shape[-1]))
    if len(y) > per_block:
        return torch.cat([_ssim_with(moments[i : i + per_block], x[i : i + per_block], y[i : i + per_block],
                                     data_range=data_range, sigma=sigma, use_sample_covariance=use_sample_covariance,
                                     k1=k1, k2=k2)
                          for i in range(0, len(y), per_block)])
    ux, vx = moments.unbind(1)
    planes = torch.empty((y.shape[0], 3, *y.shape[1:]), dtype=y.dtype, device=y.device)
    planes[:, 0] = y
    torch.mul(y, y, out=planes[:, 1])
    torch.mul(x, y, out=planes[:, 2])
    uy, uyy, uxy = _gaussian_filter_valid(planes, sigma).unbind(1)
    del planes
    cov_norm = _covariance_norm(sigma, use_sample_covariance)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    square_y, product = uy * uy, ux * uy
    vy, vxy = uyy.sub_(square_y).mul_(cov_norm), uxy.sub_(product).mul_(cov_norm)
    numerator = product.mul_(2).add_(c1).mul_(vxy.mul_(2).add_(c2))
    denominator = square_y.add_(ux * ux).add_(c1).mul_(vy.add_(vx).add_(c2))
    return numerator.div_(denominator).mean(dim=(-2, -1))  # already cropped by the 'valid' filtering


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
    g_row, g_col = torch.empty_like(x), torch.empty_like(x)
    g_row[:, [0, -1], :], g_col[:, :, [0, -1]] = 0.0, 0.0
    torch.sub(x[:, 2:, :], x[:, :-2, :], out=g_row[:, 1:-1, :])
    torch.sub(x[:, :, 2:], x[:, :, :-2], out=g_col[:, :, 1:-1])
    (cr, cc), (nr, nc) = cell, n_cells
    g_row, g_col = g_row[:, : nr * cr, : nc * cc], g_col[:, : nr * cr, : nc * cc]
    mag = torch.hypot(g_col, g_row)
    # Same expression as skimage (rad2deg(arctan2) % 180) so bin edges agree.
    angle = torch.remainder(torch.atan2(g_row, g_col) * (180.0 / math.pi), 180.0)
    width = 180.0 / orientations
    # The bin i with width * i <= angle < width * (i + 1): angle / width rounded down, then
    # moved by one where that rounding crossed an edge, so the edges are skimage's exactly.
    index = angle.div(width).floor_()
    # An angle outside every bin votes nothing, as in skimage: 180.0, which the remainder
    # gives for a tiny negative angle, and NaN, from a NaN gradient.
    outside = ~(angle < width * orientations)
    if bool(outside.any()):
        mag.masked_fill_(outside, 0.0)
        index.nan_to_num_(0.0)
    del outside
    index.clamp_(0, orientations - 1)
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
        lo, hi = torch.aminmax(v, dim=-1, keepdim=True)
        return _safe_div(v - lo, hi - lo)
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
    return _Reduced(maps, single_channel).normalized(metric, scheme)


class _Reduced:
    """(B, C, H, W) maps reduced over channels as the metrics need them, each reduction and
    normalization computed once: a map's Spearman sorts, SSIM and HOG share them."""

    def __init__(self, maps: torch.Tensor, single_channel: bool | None) -> None:
        self.maps = maps
        self.single = maps.shape[1] == 1 if single_channel is None else single_channel
        self._sums: dict[bool, torch.Tensor] = {}
        self._spatial: dict[str, torch.Tensor] = {}

    def sums(self, metric: str) -> torch.Tensor:
        """(B, H * W) float64: the sum of |map| over channels for 'spearman_abs', the signed sum otherwise."""
        absolute = metric == "spearman_abs"
        if absolute not in self._sums:
            # channel by channel in float64, as sum(1) of the float64 maps adds them (the same
            # numbers), without a float64 copy of every channel
            first, *rest = (channel.abs() if absolute else channel for channel in self.maps.unbind(1))
            total = first.to(_F64, copy=True)
            for channel in rest:
                total += channel
            self._sums[absolute] = total.flatten(1)
        return self._sums[absolute]

    def normalized(self, metric: str, scheme: str) -> torch.Tensor:
        """normalize(maps, metric, scheme): (B, H, W) float64."""
        flat = self.sums(metric)
        if scheme == "none":
            out = flat
        elif scheme == "max_abs":
            out = _safe_div(flat, flat.abs().amax(-1, keepdim=True))
        elif scheme == "second_moment":
            out = _safe_div(flat, flat.square().mean(-1, keepdim=True).sqrt())
        else:
            out = _paper_normalize(flat, metric, single_channel=self.single)
        return out.view(self.maps.shape[0], *self.maps.shape[2:])

    def spatial(self, scheme: str) -> torch.Tensor:
        """The map SSIM and HOG compare, normalized by `scheme`: both see the signed channel
        sum, normalized alike."""
        if scheme not in self._spatial:
            self._spatial[scheme] = self.normalized("ssim", scheme)
        return self._spatial[scheme]


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
    """What compare_variants() has computed of the reference maps it has seen (ranks, SSIM
    moments), kept for the next call with the same reference (the next state of a check),
    ``max_bytes`` at most.

    An entry is found by the values of the reference's rows, not by the tensor object: a run
    that reads its reference maps back from disk in every state passes a new tensor with the
    same values each time. The key is the rows' shape, dtype, device and sum; an entry is used
    only where its copy of the values equals them, so a reference changed in place, by any
    means, is ranked anew. An entry holds what was kept of every variant asked for so far,
    each under its key. Entries are kept in the order they come, and none is dropped for a
    later one: a check compares every state with the same references in the same order, so
    a bound that holds only the first of them keeps those for every state, where dropping
    the oldest would push out each entry just before it is needed again.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: dict[tuple, tuple[torch.Tensor, dict[tuple, torch.Tensor]]] = {}

    def ranks(self, reference: torch.Tensor, rows: slice, keys: Sequence[tuple],
              compute: Callable[[list[tuple]], dict[tuple, torch.Tensor]]) -> dict[tuple, torch.Tensor]:
        """{key: ranks} of ``reference[rows]``: from the cache where they are there, the
        others from compute(missing keys), which returns {key: ranks} for those keys."""
        part = reference[rows].detach()
        found = _content_key(part)
        entry = self._entries.get(found)
        if entry is not None and not _same(entry[0], part):  # the same sum, other values: not kept
            return compute(list(keys))
        kept = entry[1] if entry is not None else {}
        missing = [key for key in keys if key not in kept]
        computed = compute(missing) if missing else {}
        added = sum(_nbytes(value) for value in computed.values()) + (_nbytes(part) if entry is None else 0)
        if computed and self.bytes + added <= self.max_bytes:
            self._entries[found] = (part.clone() if entry is None else entry[0], {**kept, **computed})
            self.bytes += added
        return {key: kept[key] if key in kept else computed[key] for key in keys}


def _content_key(values: torch.Tensor) -> tuple:
    """Where _ReferenceRanks looks for the entry of these values: their shape, dtype, device and
    sum (a NaN sum as one key, since NaN equals nothing)."""
    total = float(values.sum(dtype=_F64)) if values.numel() else 0.0
    return (tuple(values.shape), values.dtype, values.device, "nan" if math.isnan(total) else total)


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
    if scheme == "max_abs" or (scheme == "paper" and single):  # the largest |v| is at one end of s
        return _safe_div(s, torch.maximum(s[..., :1].abs(), s[..., -1:].abs()))
    if scheme == "second_moment":
        return _safe_div(s, v.square().mean(-1, keepdim=True).sqrt())
    if metric == "spearman_abs":  # the paper's: (v - min) / (p99 - min), clipped to [0, 1]
        lo = s[..., :1]
        return _clip_div(s - lo, _quantile_of_sorted(s, 0.99) - lo, 0.0, 1.0)
    return _clip_div(s, _upper_quantile_of_ends(s, 0.99), -1.0, 1.0)  # v / p99(|v|), clipped to [-1, 1]


def _upper_quantile_of_ends(s: torch.Tensor, q: float) -> torch.Tensor:
    """_quantile(|v|, q) for q near 1 from s, v sorted along the last dim: (..., N) -> (..., 1).

    The m largest |v| are among the m smallest and the m largest v, so only those 2m are
    looked at."""
    n = s.shape[-1]
    m = n - math.floor(q * (n - 1))
    if 2 * m > n:
        return _upper_quantile(s.abs(), q)
    return _upper_quantile(torch.cat([s[..., :m], s[..., n - m:]], dim=-1).abs(), q, n)


def _sorted_ranks(maps: _Reduced, variants: Sequence[Variant],
                  hog_options: dict) -> dict[Variant, tuple[torch.Tensor, torch.Tensor]]:
    """What each rank variant correlates, in ascending order: {variant: (order, mean ranks)},
    both (B, F): where each sorted value was, and its average rank (_mean_ranks_of_sorted).

    Spearman variants: one sort of the channel sum per metric (with or without absolute
    value), each normalization's ranks derived from it; the same as sorting and ranking
    normalize(maps, metric, scheme).flatten(1). HOG: the sorted HOG features of each
    normalization's map.
    """
    out: dict[Variant, tuple[torch.Tensor, torch.Tensor]] = {}
    for metric in RANK_METRICS:
        schemes = [scheme for m, scheme in variants if m == metric]
        if not schemes:
            continue
        v = maps.sums(metric)
        s, order = _sort(v)
        for scheme in schemes:
            out[(metric, scheme)] = order, _mean_ranks_of_sorted(_normalized_sorted(v, s, metric, scheme, maps.single))
        del s, order
    for metric, scheme in variants:
        if metric == "hog":
            s, order = _sort(hog(maps.spatial(scheme), **hog_options))
            out[(metric, scheme)] = order, _mean_ranks_of_sorted(s)
    return out


def _rank_maps(maps: _Reduced, variants: Sequence[Variant], hog_options: dict) -> dict[Variant, torch.Tensor]:
    """Ranks of what each rank variant correlates, in place: {variant: (B, F)}; equal to
    rankdata(normalize(maps, metric, scheme).flatten(1)), and for HOG to the rankdata of the
    HOG features of each normalization's map."""
    return {variant: _compact(_in_place(order, ranks))
            for variant, (order, ranks) in _sorted_ranks(maps, variants, hog_options).items()}


def _reference_values(maps: torch.Tensor, variants: Sequence[Variant], cache_key: dict[Variant, tuple],
                      single_channel: bool | None, hog_options: dict, sigma: float,
                      use_sample_covariance: bool) -> dict[tuple, torch.Tensor]:
    """What compare_variants keeps of a reference chunk (B, C, H, W), under each variant's
    cache key: the ranks of the rank metrics; for 'ssim' the normalized map, and its SSIM
    moments (_ssim_moments) under the key with "moments" added."""
    reduced = _Reduced(maps, single_channel)
    values = {cache_key[v]: r for v, r in _rank_maps(reduced, [v for v in variants if v[0] != "ssim"],
                                                      hog_options).items()}
    for variant in variants:
        if variant[0] == "ssim":
            spatial = reduced.spatial(variant[1])
            values[cache_key[variant]] = spatial
            values[_moments_key(cache_key[variant])] = _ssim_moments(spatial, sigma, use_sample_covariance)
    return values


def _moments_key(key: tuple) -> tuple:
    """Where an SSIM variant's reference moments are kept, beside its normalized map under `key`."""
    return (*key, "moments")


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
    own_options = {"hog": tuple(sorted(hog_options.items())), "ssim": (ssim_sigma, ssim_sample_covariance)}
    cache_key = {variant: (*variant, single_channel, own_options.get(variant[0], ())) for variant in variants}
    by_key = {key: variant for variant, key in cache_key.items()}
    # every key kept of the reference, and the variant it belongs to
    by_key |= {_moments_key(key): variant for key, variant in by_key.items() if variant[0] == "ssim"}
    per_chunk = max(1, COMPARE_CHUNK_VALUES // math.prod(reference.shape[1:]))
    kept_by = _KEPT.get() or _ReferenceRanks(REFERENCE_CACHE_BYTES)  # outside kept_ranks(): for this call only
    chunks: dict[Variant, list[torch.Tensor]] = {variant: [] for variant in variants}
    for start in range(0, max(len(reference), 1), per_chunk):  # no image: one empty chunk
        rows = slice(start, start + per_chunk)
        kept = kept_by.ranks(reference, rows, list(by_key),
                             lambda missing, rows=rows: _reference_values(
                                 reference[rows], list(dict.fromkeys(by_key[k] for k in missing)), cache_key,
                                 single_channel, hog_options, ssim_sigma, ssim_sample_covariance))
        reduced = _Reduced(other[rows], single_channel)
        for metric, scheme in variants:
            if metric == "ssim":
                key = cache_key[(metric, scheme)]
                chunks[(metric, scheme)].append(_ssim_with(kept[_moments_key(key)], kept[key],
                                                           reduced.spatial(scheme), **ssim_options))
        # The pairs of ranks in the other map's sorted order: its ranks are never put in place.
        for variant, (order, ranks) in _sorted_ranks(reduced, ranked, hog_options).items():
            chunks[variant].append(_pearson_of_ranks(kept[cache_key[variant]].gather(-1, order), ranks))
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
