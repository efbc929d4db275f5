"""compare_variants() ranks each map once per (with, without absolute value) and derives
every normalization's Spearman ranks from that one sort; the scores equal those of each
variant computed on its own (normalize, then rank) and scipy's."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from sanity_cli import metrics
from sanity_cli.metrics import (
    NORMALIZATIONS,
    RANK_METRICS,
    compare_variants,
    normalize,
    rankdata,
)
from sanity_cli.robustness import robustness_scores

ALL_RANK_VARIANTS = [(m, s) for m in (*RANK_METRICS, "hog") for s in NORMALIZATIONS]


def maps_of(kind: str, channels: int, seed: int, size: int = 48) -> torch.Tensor:
    """(3, channels, size, size) maps: smooth, with many ties, or with a big outlier (so the
    paper's 99th-percentile clip ties a whole top percent)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, channels, size, size, generator=generator)
    if kind == "ties":
        x = (x * 2).round() / 2
    elif kind == "outliers":
        x[:, :, :3, :3] *= 50
    elif kind == "gradcam_like":  # non-negative, zero in most places
        x = x.clamp(min=0) ** 3
    return x


def separate(reference: torch.Tensor, other: torch.Tensor, metric: str, scheme: str,
             single_channel: bool | None) -> np.ndarray:
    """One variant on its own: normalize each map, then scipy's Spearman per image."""
    a, b = (normalize(m, metric, scheme, single_channel).flatten(1).numpy() for m in (reference, other))
    return np.array([scipy.stats.spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)])


@pytest.mark.parametrize("single_channel", [None, False, True])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["smooth", "ties", "outliers", "gradcam_like"])
def test_every_spearman_variant_equals_its_separate_computation_and_scipy(kind, channels, single_channel):
    reference, other = maps_of(kind, channels, 3), maps_of(kind, channels, 4)
    variants = [(m, s) for m in RANK_METRICS for s in NORMALIZATIONS]
    shared = compare_variants(reference.clone(), other, variants, single_channel=single_channel)
    for metric, scheme in variants:
        own = metrics._pearson_of_ranks(*(rankdata(normalize(m, metric, scheme, single_channel).flatten(1))
                                          for m in (reference, other)))
        assert torch.equal(shared[(metric, scheme)], own), (metric, scheme)  # bit for bit
        np.testing.assert_allclose(shared[(metric, scheme)].numpy(),
                                   separate(reference, other, metric, scheme, single_channel), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 7])
def test_the_ranks_of_each_normalization_equal_rankdata_of_the_normalized_map(seed):
    maps = maps_of("outliers", 3, seed, size=32)
    ranks = metrics._rank_maps(metrics._Reduced(maps, None), ALL_RANK_VARIANTS, {"pixels_per_cell": 8})
    for metric, scheme in ALL_RANK_VARIANTS:
        normalized = normalize(maps, metric, scheme)
        vectors = metrics.hog(normalized, pixels_per_cell=8) if metric == "hog" else normalized.flatten(1)
        expected = scipy.stats.rankdata(vectors.numpy(), axis=-1)
        np.testing.assert_array_equal(ranks[(metric, scheme)].double().numpy(), expected, err_msg=str((metric, scheme)))
    # the clipped variant really has its top percent tied, the plain one none
    assert (len(torch.unique(ranks[("spearman_abs", "paper")][0]))
            < len(torch.unique(ranks[("spearman_abs", "none")][0])))


def test_one_sort_per_map_and_sign_serves_every_normalization(monkeypatch):
    sorts = []
    original = metrics._sort
    monkeypatch.setattr(metrics, "_sort", lambda x: sorts.append(tuple(x.shape)) or original(x))
    reference, other = maps_of("smooth", 3, 1), maps_of("smooth", 3, 2)
    variants = [(m, s) for m in RANK_METRICS for s in NORMALIZATIONS]
    with metrics.kept_ranks():  # as the state loop compares a seed's states
        compare_variants(reference, other, variants)
        assert len(sorts) == 2 * 2  # (reference, other) x (with, without absolute value)
        sorts.clear()
        compare_variants(reference, maps_of("smooth", 3, 5), variants)
        assert len(sorts) == 2  # the reference's ranks were kept: only the new map is sorted


def test_ssim_and_hog_share_the_channel_sums_of_the_spearman_sorts(monkeypatch):
    """One comparison of a map with every metric reduces its channels once per sign (the
    signed sum serves the signed Spearman, SSIM and HOG) and normalizes it once for both
    SSIM and HOG; the scores are those of each variant compared alone."""
    reductions, normalizations = [], []
    sums, normalized = metrics._Reduced.sums, metrics._Reduced.normalized

    def counting_sums(self, metric):
        if (metric == "spearman_abs") not in self._sums:
            reductions.append(metric == "spearman_abs")
        return sums(self, metric)

    monkeypatch.setattr(metrics._Reduced, "sums", counting_sums)
    monkeypatch.setattr(metrics._Reduced, "normalized",
                        lambda self, metric, scheme: normalizations.append(scheme) or normalized(self, metric, scheme))
    reference, other = maps_of("outliers", 3, 1), maps_of("outliers", 3, 2)
    variants = [*((m, s) for m in RANK_METRICS for s in ("none", "paper")), ("ssim", "paper"), ("hog", "paper")]
    with metrics.kept_ranks():
        compare_variants(reference, other, variants, hog_pixels_per_cell=8)
        reductions.clear(), normalizations.clear()
        scores = compare_variants(reference, maps_of("outliers", 3, 5), variants, hog_pixels_per_cell=8)
    assert sorted(reductions) == [False, True]  # the other map's signed and absolute sums, once each
    assert normalizations == ["paper"]  # SSIM's map, and HOG's taken from it
    for metric, scheme in variants:
        alone = compare_variants(reference, maps_of("outliers", 3, 5), [(metric, scheme)], hog_pixels_per_cell=8)
        assert torch.equal(scores[(metric, scheme)], alone[(metric, scheme)]), (metric, scheme)


def test_the_radix_sort_of_all_rows_gives_each_rows_order_and_ranks(monkeypatch):
    """Every row of a batch sorted by one integer sort of (row, float32 value) keys: the sorted
    values and a permutation that yields them, and scipy's ranks, for values that the keys
    cannot tell apart (a few units in the last place, whole rows of them, beyond float32's
    range or below its smallest), signed zeros, infinities, subnormals and many rows; float32
    in, float32 out."""
    if not metrics._RADIX_SORT:
        pytest.skip("this torch sorts integers without a parallel radix sort (no FBGEMM and OpenMP)")
    monkeypatch.setattr(metrics, "_RADIX_SORT_VALUES", 0)  # small arrays through the radix sort too
    used = []
    radix = metrics._radix_sort_rows
    monkeypatch.setattr(metrics, "_radix_sort_rows", lambda x: used.append(x.shape) or radix(x))
    rng = np.random.default_rng(11)
    eps = np.finfo(np.float64).eps
    cases = [rng.standard_normal((3, 500)),
             1.0 + rng.integers(-20, 20, (5, 300)) * eps,  # rows of equal keys, one after the other
             -(1.0 + rng.integers(-20, 20, (70, 40)) * eps),  # 70 rows: 7 bits of the key for the row
             np.sort(1.0 + rng.standard_normal((4, 300)) * 1e-7, axis=-1)[:, ::-1].copy(),  # many short runs
             rng.choice([0.0, -0.0, 5e-324, -5e-324, 1e-300, -1e-300, 2e-300, np.inf, -np.inf, 1e308, -1e308,
                         2e308 / 3, 1.0], (4, 200)),
             rng.integers(-3, 4, (6, 100)).astype(float)]
    for values in cases:
        for dtype in (torch.float64, torch.float32):
            x = torch.from_numpy(values).to(dtype)
            s, order = metrics._sort(x)
            assert s.dtype == dtype and torch.equal(s, x.sort(dim=-1).values)
            assert torch.equal(x.gather(-1, order), s)
            np.testing.assert_array_equal(rankdata(x).numpy(), scipy.stats.rankdata(x.double().numpy(), axis=-1))
    assert len(used) == 2 * 2 * len(cases)  # _sort and rankdata, in both dtypes
    x = torch.tensor([[1.0, float("nan"), 0.0]])
    used.clear()
    assert torch.equal(metrics._sort(x)[1], torch.tensor([[2, 0, 1]])) and used == []  # NaN: NumPy's order


@pytest.mark.parametrize("seed", [0, 3])
def test_ranks_from_the_ties_alone_equal_scipys(seed):
    """Average ranks by visiting the equal neighbours only: none, a few, the paper's clipped
    ends, nearly all, ties that end one row and start the next, and NaN rows."""
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal(60), np.round(rng.standard_normal(60)), np.zeros(60),
            np.clip(rng.standard_normal(60), -1, 1), np.r_[np.arange(55.0), np.full(5, 99.0)],
            np.r_[np.full(5, -1.0), np.arange(55.0)], np.r_[np.arange(59.0), np.nan]]
    x = torch.from_numpy(np.stack(rows))
    s = x.sort(dim=-1).values
    got = metrics._mean_ranks_of_sorted(s).numpy()
    want = scipy.stats.rankdata(s.numpy(), axis=-1)
    want[np.isnan(s.numpy()).any(-1)] = np.nan
    np.testing.assert_array_equal(got, want)
    assert metrics._mean_ranks_of_sorted(s[:0]).shape == (0, 60)
    assert metrics._mean_ranks_of_sorted(torch.ones(2, 1)).tolist() == [[1.0], [1.0]]


def test_the_upper_quantile_of_the_absolute_values_from_the_sorted_ends():
    generator = torch.Generator().manual_seed(6)
    for n in (1, 2, 3, 100, 101, 5000):
        v = torch.randn(4, n, generator=generator, dtype=torch.float64)
        v[1] = v[1].abs()  # all positive
        v[2] = -v[2].abs()  # all negative
        v[3, : n // 2] = 0.0
        s = v.sort(dim=-1).values
        for q in (0.5, 0.9, 0.99, 1.0):
            assert torch.equal(metrics._upper_quantile_of_ends(s, q), metrics._quantile(v.abs(), q)), (n, q)


def test_upper_quantile_equals_the_sort_based_one():
    generator = torch.Generator().manual_seed(5)
    for n in (1, 2, 3, 100, 101, 5000):
        x = torch.randn(4, n, generator=generator, dtype=torch.float64)
        x[1, : n // 2] = 0.0  # ties
        if n > 3:
            x[2, -2:] = float("inf")
            x[3, 0] = float("nan")
        for q in (0.5, 0.9, 0.99, 1.0):
            got, want = metrics._upper_quantile(x, q), metrics._quantile(x, q)
            assert torch.equal(got.isnan(), want.isnan()), (n, q)
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), (n, q)


@pytest.mark.parametrize("single_channel", [False, True])
def test_robustness_scores_come_from_shared_ranks_and_equal_scipy(single_channel):
    reference, other = maps_of("outliers", 3, 8), maps_of("outliers", 3, 9)
    scores = robustness_scores(reference, other, single_channel=single_channel)
    for scheme, by_metric in scores.items():
        for metric, values in by_metric.items():
            np.testing.assert_allclose(values.numpy(), separate(reference, other, metric, scheme, single_channel),
                                       atol=1e-12, err_msg=str((scheme, metric)))


@pytest.mark.parametrize("scheme", NORMALIZATIONS)
def test_ssim_from_a_kept_reference_equals_skimage(scheme):
    from skimage.metrics import structural_similarity

    reference = maps_of("smooth", 3, 10, size=32)
    for seed in (11, 12):  # the second call takes the reference's SSIM moments from the cache
        other = maps_of("smooth", 3, seed, size=32)
        got = compare_variants(reference, other, [("ssim", scheme)], ssim_sigma=1.0)[("ssim", scheme)]
        a, b = (normalize(m, "ssim", scheme).numpy() for m in (reference, other))
        expected = [structural_similarity(x, y, data_range=2.0, gaussian_weights=True, sigma=1.0,
                                          use_sample_covariance=True) for x, y in zip(a, b, strict=True)]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_a_reference_bigger_than_the_bound_keeps_its_first_chunks_for_good():
    entry = 4 * 8 + 4 * 8  # the copy of one (1, 4) float64 chunk and its float64 ranks
    cache = metrics._ReferenceRanks(max_bytes=2 * entry)
    reference = torch.randn(4, 4, dtype=torch.float64)
    computed = []

    def compute(rows):
        return lambda missing: computed.append(rows.start) or {key: rankdata(reference[rows]) for key in missing}

    for _ in range(3):  # three states, each comparing the reference's four chunks in order
        for start in range(4):
            rows = slice(start, start + 1)
            cache.ranks(reference, rows, [("m",)], compute(rows))
    # chunks 0 and 1 were kept from the first pass on; 2 and 3 are ranked in every pass (an LRU
    # bound would have pushed out each chunk just before it was needed again: 12 rankings)
    assert computed == [0, 1, 2, 3, 2, 3, 2, 3]
    other = torch.randn(1, 4, dtype=torch.float64)
    ranks = cache.ranks(other, slice(0, 1), [("m",)], lambda missing: {key: rankdata(other) for key in missing})
    assert torch.equal(ranks[("m",)], rankdata(other))
    kept = [copy for copy, _ in cache._entries.values()]
    # nor does another tensor push them out
    assert len(kept) == 2 and torch.equal(kept[0], reference[:1]) and torch.equal(kept[1], reference[1:2])


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_a_states_scores_come_from_one_comparison_of_its_maps(normalization):
    """A state's rows (results.csv under the run's normalization, robustness.csv under every
    one) come from one compare_variants call per map: the check's own call of compare_fn for
    the run's metrics computes nothing again, and every score equals compare()'s."""
    from sanity_cli.metrics import METRICS, compare
    from sanity_cli.pipeline.score import _reusing, state_scores
    from sanity_cli.robustness import robustness_table

    reference, other = maps_of("outliers", 3, 13), maps_of("outliers", 3, 14)
    options = {"metrics": list(METRICS), "normalization": normalization, "single_channel": False,
               "ssim_sigma": 1.0, "hog_pixels_per_cell": 8}
    calls = []

    def compare_fn(a, b, **overrides):
        calls.append(list(overrides.get("metrics", options["metrics"])))
        return compare(a, b, **{**options, **overrides})

    computed = state_scores(reference, other, options)
    again = _reusing(compare_fn, options, reference, other, computed)
    got = again(reference, other)
    assert calls == []
    expected = compare(reference.clone(), other.clone(), **options)
    for metric in METRICS:
        assert torch.equal(got[metric], expected[metric]), metric
    robust = robustness_table(computed)
    alone = robustness_scores(reference.clone(), other.clone(), single_channel=False)
    assert robust.keys() == alone.keys() == set(NORMALIZATIONS)
    for scheme in NORMALIZATIONS:
        for metric, values in alone[scheme].items():
            assert torch.equal(robust[scheme][metric], values), (scheme, metric)
    again(reference, other, metrics=["ssim"], ssim_sigma=1.5)  # what a check asks for itself goes to compare
    again(reference.clone(), other)  # and so does another pair of maps
    assert calls == [["ssim"], list(METRICS)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sorts_shared_among_threads_give_numpys_permutation(threads: int, dtype) -> None:
    """The rows of a big sort are shared out among torch's threads; every row's permutation
    is the one np.argsort gives it alone, ties and NaN included, for 1-D, 2-D and 3-D input."""
    rng = np.random.default_rng(7)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(5, 1 << 15), (2, 3, 1 << 15), (1 << 17,), (1, 1 << 17)]:
            values = rng.standard_normal(shape).astype(dtype)
            values.reshape(-1)[::97] = 0.5  # ties
            values.reshape(-1)[5::1001] = np.nan
            np.testing.assert_array_equal(metrics._argsort_rows(values), np.argsort(values, axis=-1))
    finally:
        torch.set_num_threads(before)
