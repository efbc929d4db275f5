"""compare() ranks a reference it has seen once and works through many images in
chunks; results stay those of one fresh ranking of all images."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from sanity_cli import metrics
from sanity_cli.metrics import compare


@pytest.fixture(autouse=True)
def kept():
    """The reference's ranks kept between calls, as the state loop keeps them for a seed's states."""
    with metrics.kept_ranks() as cache:
        yield cache


@pytest.fixture
def maps():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(6, 1, 12, 12, generator=generator)
    others = [torch.randn(6, 1, 12, 12, generator=generator) for _ in range(3)]
    return reference, others


@pytest.fixture
def rank_calls(monkeypatch):
    """How many (B, N) sorts compare() makes (a ranking is one sort: each map's every
    Spearman normalization comes from one sort with and one without absolute value)."""
    calls = []
    original = metrics._sort

    def counting(x):
        calls.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(metrics, "_sort", counting)
    return calls


def scipy_spearman_abs(reference: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """Spearman of |map| per image (one channel: |v| / max keeps the order)."""
    a, b = reference.abs().flatten(1).numpy(), other.abs().flatten(1).numpy()
    return np.array([scipy.stats.spearmanr(row_a, row_b)[0] for row_a, row_b in zip(a, b, strict=True)])


def test_a_reference_compared_again_is_ranked_once(maps, rank_calls):
    reference, others = maps
    for other in others:
        scores = compare(reference, other, ["spearman_abs", "spearman"])
        np.testing.assert_allclose(scores["spearman_abs"].numpy(), scipy_spearman_abs(reference, other), atol=1e-12)
    # 2 metrics x (1 reference + 3 others): the reference ranked once per metric, not per call
    assert len(rank_calls) == 2 + 2 * len(others)


def test_ranks_are_kept_only_inside_the_block_that_owns_them(maps, rank_calls, kept):
    reference, (other, *_) = maps
    compare(reference, other, "spearman_abs")
    assert len(kept._entries) == 1 and len(rank_calls) == 2
    with metrics.kept_ranks() as inner:  # a block of its own: its own ranks, the outer ones stay
        compare(reference, other, "spearman_abs")
        assert len(inner._entries) == 1 and len(rank_calls) == 4
    assert len(kept._entries) == 1
    token = metrics._KEPT.set(None)  # outside any block: nothing is kept between calls
    try:
        first = compare(reference, other, "spearman_abs")["spearman_abs"]
        again = compare(reference, other, "spearman_abs")["spearman_abs"]
    finally:
        metrics._KEPT.reset(token)
    assert len(rank_calls) == 8, "the reference is ranked in every call"
    assert torch.equal(first, again) and len(kept._entries) == 1


def test_cached_scores_are_bit_for_bit_a_fresh_rankings(maps):
    reference, others = maps
    cached = [compare(reference, other, "spearman_abs")["spearman_abs"] for other in others]
    fresh = [compare(reference.clone(), other, "spearman_abs")["spearman_abs"] for other in others]
    for a, b in zip(cached, fresh, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change", ["in_place", "through_data"])
def test_a_reference_changed_in_place_is_ranked_anew(maps, change):
    reference, (other, *_) = maps
    compare(reference, other, "spearman_abs")
    if change == "in_place":
        reference.mul_(-1).add_(other)
    else:  # .data changes bypass the version counter: the stored copy still notices
        reference.data.copy_(torch.flip(reference.data, dims=(-1,)))
    scores = compare(reference, other, "spearman_abs")["spearman_abs"].numpy()
    np.testing.assert_allclose(scores, scipy_spearman_abs(reference, other), atol=1e-12)


def test_each_metric_and_setting_has_its_own_entry(maps):
    reference, (other, *_) = maps
    compare(reference, other, "spearman_abs")
    signed = compare(reference, other, "spearman")["spearman"].numpy()
    expected = [scipy.stats.spearmanr(a, b)[0] for a, b in
                zip(reference.flatten(1).numpy(), other.flatten(1).numpy(), strict=True)]
    np.testing.assert_allclose(signed, expected, atol=1e-12)
    none = compare(reference, other, "spearman", "none")["spearman"].numpy()
    np.testing.assert_allclose(none, expected, atol=1e-12)  # a scale does not change ranks


def test_hog_features_of_the_reference_are_cached_with_their_options(rank_calls):
    generator = torch.Generator().manual_seed(1)
    reference, other = (torch.randn(2, 1, 32, 32, generator=generator) for _ in range(2))
    first = compare(reference, other, "hog", hog_pixels_per_cell=8)["hog"]
    again = compare(reference, other, "hog", hog_pixels_per_cell=8)["hog"]
    finer = compare(reference, other, "hog", hog_pixels_per_cell=4)["hog"]
    assert torch.equal(first, again)
    assert not torch.equal(first, finer)
    assert rank_calls == [(2, 324), (2, 324), (2, 324), (2, 2916), (2, 2916)]


def rank(reference: torch.Tensor):
    """A compute() for the cache: rankdata of the reference under every missing key."""
    return lambda missing: {key: metrics.rankdata(reference) for key in missing}


def test_the_first_entries_stay_under_the_byte_bound_through_every_round():
    """Five references asked for round after round, room for three: the first three are
    kept and found in every round (dropping the oldest would push out each one just before it
    is asked for again); the other two are ranked each time and never kept."""
    cache = metrics._ReferenceRanks(max_bytes=3 * (10 * 8 + 10 * 4))  # three (1, 10) entries
    references = [torch.randn(1, 10, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    computed = []
    for _ in range(3):
        for i, reference in enumerate(references):
            ranks = cache.ranks(reference, slice(0, 1), [("m",)],
                                lambda missing, i=i, r=reference: computed.append(i) or rank(r)(missing))
            assert torch.equal(ranks[("m",)], metrics.rankdata(reference))
    assert computed == [0, 1, 2, 3, 4, 3, 4, 3, 4]
    assert len(cache._entries) == 3 and cache.bytes <= cache.max_bytes


def test_a_reference_read_again_as_another_tensor_is_found_by_its_values(rank_calls, kept):
    """A run that keeps its reference maps on disk reads them back in every state: a new tensor
    with the same values finds what was kept; one with other values of the same sum, or with a
    NaN (equal to nothing), is ranked afresh and adds no entry."""
    generator = torch.Generator().manual_seed(4)
    reference, other = (torch.randn(3, 1, 12, 12, generator=generator) for _ in range(2))
    first = compare(reference, other, "spearman")["spearman"]
    assert torch.equal(compare(reference.clone(), other, "spearman")["spearman"], first)
    assert len(rank_calls) == 3  # the reference once, the other map in each call
    shuffled = reference.flip(-1)  # the same sum, other values
    want = [scipy.stats.spearmanr(a, b)[0] for a, b in zip(shuffled.flatten(1).numpy(), other.flatten(1).numpy())]
    np.testing.assert_allclose(compare(shuffled, other, "spearman")["spearman"].numpy(), want, atol=1e-12)
    assert len(rank_calls) == 5 and len(kept._entries) == 1
    nan = reference.clone()
    nan[0, 0, 0, 0] = float("nan")
    for _ in range(3):
        assert torch.isnan(compare(nan.clone(), other, "spearman")["spearman"][0])
    assert len(rank_calls) == 5 + 3 * 2 and len(kept._entries) == 2


def test_an_entry_gathers_the_keys_asked_for_and_computes_only_the_missing_ones():
    cache = metrics._ReferenceRanks(max_bytes=2**20)
    reference = torch.randn(2, 10)
    asked = []

    def compute(missing):
        asked.append(list(missing))
        return {key: metrics.rankdata(reference) * len(key) for key in missing}

    first = cache.ranks(reference, slice(0, 2), [("a",), ("b", 1)], compute)
    again = cache.ranks(reference, slice(0, 2), [("b", 1), ("c",)], compute)
    assert asked == [[("a",), ("b", 1)], [("c",)]]
    assert again[("b", 1)] is first[("b", 1)]
    assert torch.equal(again[("c",)], metrics.rankdata(reference))
    assert len(cache._entries) == 1 and set(next(iter(cache._entries.values()))[1]) == {("a",), ("b", 1), ("c",)}


def test_a_reference_larger_than_the_bound_is_not_kept():
    cache = metrics._ReferenceRanks(max_bytes=100)
    reference = torch.randn(1, 50)
    ranks = cache.ranks(reference, slice(0, 1), [("m",)], rank(reference))[("m",)]
    assert torch.equal(ranks, metrics.rankdata(reference))
    assert not cache._entries


@pytest.mark.parametrize("channels", [1, 3])
def test_chunks_of_images_give_the_scores_of_all_images_at_once(monkeypatch, rank_calls, channels):
    generator = torch.Generator().manual_seed(2)
    reference, other, later = (torch.randn(7, channels, 48, 48, generator=generator) for _ in range(3))
    whole = compare(reference.clone(), other)
    monkeypatch.setattr(metrics, "COMPARE_CHUNK_VALUES", 3 * channels * 48 * 48)  # 3 images a chunk
    rank_calls.clear()
    chunked = compare(reference, other)
    for metric in metrics.METRICS:
        assert torch.equal(chunked[metric], whole[metric]), metric
    assert len(rank_calls) == 3 * 3 * 2  # 3 chunks x 3 rank metrics x (reference + other)
    assert rank_calls[0][0] == 3 and rank_calls[-1][0] == 1  # chunks of 3, 3 and 1 images
    rank_calls.clear()
    compare(reference, later)
    assert len(rank_calls) == 3 * 3  # every chunk of the reference came from the cache
