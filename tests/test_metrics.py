"""Parity of sanity_cli.metrics with scipy / scikit-image, and its edge cases.

References: scipy.stats.rankdata / spearmanr, skimage.metrics.structural_similarity,
skimage.feature.hog, and a NumPy re-statement of the authors' normalization.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from skimage.feature import hog as sk_hog
from skimage.metrics import structural_similarity as sk_ssim

from sanity_cli import metrics
from sanity_cli.metrics import (
    METRICS,
    NORMALIZATIONS,
    compare,
    hog,
    normalize,
    rankdata,
    spearman,
    ssim,
)

ATOL = 1e-5
KINDS = ("random", "relu", "quantized", "blocky")


def _maps(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Float64 test maps; all kinds but 'random' have many tied values."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=shape)
    if kind == "relu":  # ReLU'd gradients: about half exact zeros
        return np.maximum(rng.normal(size=shape), 0.0)
    if kind == "quantized":  # few levels
        return rng.integers(-2, 3, size=shape).astype(np.float64)
    # blocky: nearest-upsampled coarse map, like a resized GradCAM
    *lead, h, w = shape
    coarse = np.maximum(rng.normal(size=(*lead, -(-h // 8), -(-w // 8))), 0.0)
    return np.kron(coarse, np.ones((8, 8)))[..., :h, :w]


def _pair(kind: str, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two partly correlated maps of one kind."""
    a = _maps(kind, shape, seed)
    b = 0.6 * a + 0.4 * _maps(kind, shape, seed + 1)
    if kind == "quantized":
        b = np.round(b)
    return a, b


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def _sk_ssim(a: np.ndarray, b: np.ndarray, **kw) -> np.ndarray:
    return np.array([sk_ssim(x, y, gaussian_weights=True, **kw) for x, y in zip(a, b)])


# ---------------------------------------------------------------- rank correlation


@pytest.mark.parametrize("kind", KINDS)
def test_rankdata_matches_scipy(kind):
    x = _maps(kind, (4, 24, 24), seed=1).reshape(4, -1)
    np.testing.assert_allclose(rankdata(_t(x)).numpy(), stats.rankdata(x, axis=-1), rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32])
@pytest.mark.parametrize("kind", ["random", "quantized"])
def test_rankdata_in_every_dtype_ranks_the_values_it_holds(dtype, kind):
    # Floats are sorted in their own dtype: the ranks must be those of the same values in
    # float64, ties included (low precision makes many), and -0.0 ties with 0.0.
    x = torch.from_numpy(_maps(kind, (3, 200), seed=4)).mul(50).to(dtype)
    x[0, :2] = torch.tensor([-0.0, 0.0]).to(dtype)
    got = rankdata(x)
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), stats.rankdata(x.double().numpy(), axis=-1))


def test_rankdata_any_leading_dims_and_nan_rows():
    x = _maps("quantized", (2, 3, 50), seed=2)
    np.testing.assert_array_equal(rankdata(_t(x)).numpy(), stats.rankdata(x, axis=-1))
    x[0, 1, 7] = np.nan
    r = rankdata(_t(x)).numpy()
    assert np.isnan(r[0, 1]).all()
    np.testing.assert_array_equal(r[1], stats.rankdata(x[1], axis=-1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [28 * 28, 64 * 64])
def test_spearman_matches_scipy(kind, n):
    a, b = _pair(kind, (5, n), seed=3)
    want = [stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
    got = spearman(_t(a), _t(b))
    assert got.shape == (5,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=ATOL)


def test_spearman_constant_row_is_nan_without_warning():
    a, b = _pair("random", (3, 100), seed=4)
    a[1] = 0.5
    b[2] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = spearman(_t(a), _t(b)).numpy()
    assert np.isnan(r[1]) and np.isnan(r[2])
    assert r[0] == pytest.approx(stats.spearmanr(a[0], b[0]).statistic, abs=ATOL)


# ---------------------------------------------------------------- SSIM


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(28, 28), (64, 64), (45, 71)])
def test_ssim_matches_skimage_paper_settings(kind, size):
    a, b = _pair(kind, (3, *size), seed=5)
    want = _sk_ssim(a, b, data_range=2.0, sigma=1.5, use_sample_covariance=True)
    np.testing.assert_allclose(ssim(_t(a), _t(b)).numpy(), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "kw",
    [
        dict(data_range=2.0, sigma=1.5, use_sample_covariance=False),
        dict(data_range=1.0, sigma=1.0, use_sample_covariance=True),
        dict(data_range=2.0, sigma=2.5, use_sample_covariance=False),
    ],
)
@pytest.mark.parametrize("kind", ["random", "blocky"])
def test_ssim_matches_skimage_other_settings(kw, kind):
    a, b = _pair(kind, (2, 40, 33), seed=6)
    np.testing.assert_allclose(ssim(_t(a), _t(b), **kw).numpy(), _sk_ssim(a, b, **kw), rtol=0, atol=ATOL)


def test_ssim_smallest_map_and_too_small_map():
    a, b = _pair("random", (2, 11, 11), seed=7)  # exactly the 11-tap window
    want = _sk_ssim(a, b, data_range=2.0, sigma=1.5)
    np.testing.assert_allclose(ssim(_t(a), _t(b)).numpy(), want, rtol=0, atol=ATOL)
    too_small = ssim(_t(a[:, :10]), _t(b[:, :10]))
    assert torch.isnan(too_small).all() and too_small.dtype == torch.float64


# ---------------------------------------------------------------- HOG


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(48, 48), (64, 80), (299, 299)])
def test_hog_features_match_skimage(kind, size):
    x = _maps(kind, (2, *size), seed=8)
    got = hog(_t(x)).numpy()
    for i in range(2):
        want = sk_hog(x[i], orientations=9, pixels_per_cell=(16, 16), cells_per_block=(3, 3), block_norm="L2-Hys")
        assert got[i].shape == want.shape
        np.testing.assert_allclose(got[i], want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("orientations,ppc,cpb", [(6, (5, 7), (2, 3)), (12, (8, 8), (1, 1)), (9, (7, 7), (3, 3))])
def test_hog_features_match_skimage_other_settings(orientations, ppc, cpb):
    x = _maps("blocky", (2, 50, 61), seed=9) - 0.3
    got = hog(_t(x), orientations=orientations, pixels_per_cell=ppc, cells_per_block=cpb).numpy()
    for i in range(2):
        want = sk_hog(x[i], orientations=orientations, pixels_per_cell=ppc, cells_per_block=cpb, block_norm="L2-Hys")
        np.testing.assert_allclose(got[i], want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("orientations", [9, 7])
def test_an_angle_that_rounds_to_180_degrees_is_in_no_hog_bin(orientations):
    """A gradient a hair below 0 degrees has the angle 180.0 after skimage's remainder, which
    is outside its last bin [180 - 180 / O, 180): that pixel votes nothing, in skimage and here."""
    x = np.zeros((32, 32))
    x[7, 8], x[9, 8], x[8, 7], x[8, 9] = 1e-300, 0.0, 0.0, 0.5  # at (8, 8): g_row = -1e-300, g_col = 0.5
    assert np.rad2deg(np.arctan2(-1e-300, 0.5)) % 180 == 180.0
    got = hog(_t(x[None]), orientations=orientations, pixels_per_cell=8, cells_per_block=2).numpy()[0]
    want = sk_hog(x, orientations=orientations, pixels_per_cell=(8, 8), cells_per_block=(2, 2), block_norm="L2-Hys")
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("per_block", [1, 2])
def test_ssim_takes_the_images_a_block_at_a_time(monkeypatch, per_block):
    """Five maps filtered one or two at a time (the last block shorter): each image's SSIM is
    still skimage's, in the images' order, under settings none of which is the default."""
    size = (48, 52)
    monkeypatch.setattr(metrics, "_SSIM_BLOCK_PIXELS", per_block * size[0] * size[1] + 7)
    a, b = _pair("random", (5, *size), seed=12)
    options = dict(data_range=1.5, sigma=1.2, use_sample_covariance=False)
    got = ssim(_t(a), _t(b), k1=0.02, k2=0.05, **options).numpy()
    np.testing.assert_allclose(got, _sk_ssim(a, b, K1=0.02, K2=0.05, **options), rtol=0, atol=ATOL)


def test_hog_too_small_gives_empty_features():
    assert hog(torch.rand(3, 28, 28)).shape == (3, 0)
    assert hog(torch.rand(3, 47, 64)).shape == (3, 0)
    assert hog(torch.rand(3, 48, 48)).shape == (3, 81)


@pytest.mark.parametrize("kind", ["random", "blocky"])
@pytest.mark.parametrize("size", [64, 150])
def test_hog_metric_is_spearman_of_skimage_hog(kind, size):
    a, b = _pair(kind, (2, 3, size, size), seed=10)

    def sk_features(m):  # the authors' pipeline: signed channel sum, min-max, skimage hog
        v = m.sum(0)
        return sk_hog((v - v.min()) / (v.max() - v.min()), pixels_per_cell=(16, 16), cells_per_block=(3, 3))

    want = [stats.spearmanr(sk_features(x), sk_features(y)).statistic for x, y in zip(a, b)]
    got = compare(_t(a), _t(b), metrics=("hog",))["hog"].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


# ---------------------------------------------------------------- normalizations


def _one(metric: str, scheme: str, channels: list[list[list[float]]]) -> np.ndarray:
    return normalize(torch.tensor([channels], dtype=torch.float64), metric, scheme)[0].numpy()


def test_channel_reduction_and_none():
    chans = [[[1.0, -2.0]], [[-3.0, 0.5]], [[0.0, 4.0]]]  # (C=3, H=1, W=2)
    np.testing.assert_allclose(_one("spearman_abs", "none", chans), [[4.0, 6.5]])
    for metric in ("spearman", "ssim", "hog"):
        np.testing.assert_allclose(_one(metric, "none", chans), [[-2.0, 2.5]])


def test_max_abs_and_second_moment():
    np.testing.assert_allclose(_one("spearman", "max_abs", [[[-2.0, 1.0], [0.0, 4.0]]]), [[-0.5, 0.25], [0.0, 1.0]])
    np.testing.assert_allclose(_one("ssim", "second_moment", [[[3.0, -3.0], [3.0, -3.0]]]), [[1.0, -1.0], [1.0, -1.0]])
    # mean(v**2) = (4 + 4 + 16 + 0) / 4 = 6
    np.testing.assert_allclose(
        _one("spearman", "second_moment", [[[2.0, -2.0], [4.0, 0.0]]]), np.array([[2.0, -2.0], [4.0, 0.0]]) / np.sqrt(6)
    )


def test_paper_minmax_for_ssim_and_hog():
    chans = [[[-1.0, 0.5], [1.0, 0.0]], [[0.0, 0.5], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]  # sum [[-1,1],[3,0]]
    for metric in ("ssim", "hog"):
        np.testing.assert_allclose(_one(metric, "paper", chans), [[0.0, 0.5], [1.0, 0.25]])


def test_paper_spearman_abs_uses_p99_and_clips():
    v = np.arange(100.0).reshape(10, 10)
    chans = [(-v / 2).tolist(), (v / 2).tolist(), np.zeros((10, 10)).tolist()]  # |.| sums to v, signed sum 0
    # 99th percentile of 0..99 with linear interpolation: 0.99 * 99 = 98.01
    np.testing.assert_allclose(_one("spearman_abs", "paper", chans), np.minimum(v / 98.01, 1.0), atol=1e-12)


def test_paper_signed_spearman_divides_by_p99_of_abs_and_clips():
    v = np.ones(100)
    v[0] = -100.0
    v = v.reshape(10, 10)
    chans = [v.tolist(), np.zeros((10, 10)).tolist(), np.zeros((10, 10)).tolist()]
    # sorted |v| = 99 ones then 100: p99 = 1 + 0.01 * (100 - 1) = 1.99
    np.testing.assert_allclose(_one("spearman", "paper", chans), np.clip(v / 1.99, -1, 1), atol=1e-12)


def test_paper_single_channel_divides_by_max_abs_without_clipping():
    chans = [[[-4.0, 2.0], [1.0, 0.0]]]
    np.testing.assert_allclose(_one("spearman_abs", "paper", chans), [[1.0, 0.5], [0.25, 0.0]])
    np.testing.assert_allclose(_one("spearman", "paper", chans), [[-1.0, 0.5], [0.25, 0.0]])
    np.testing.assert_allclose(_one("ssim", "paper", chans), [[0.0, 1.0], [5 / 6, 4 / 6]])
    # each map by its own largest |value|, not the batch's
    batch = torch.tensor([[[[-4.0, 2.0]]], [[[0.5, -0.25]]]], dtype=torch.float64)
    got = normalize(batch, "spearman", "paper", single_channel=True).numpy()
    np.testing.assert_allclose(got, [[[-1.0, 0.5]], [[1.0, -0.5]]])


def _np_paper(maps: np.ndarray, metric: str) -> np.ndarray:
    """NumPy re-statement of the authors' normalization of (B, 3, H, W) maps."""
    out = []
    for m in maps:
        if metric == "spearman_abs":
            v = np.abs(m).sum(0)
            lo = v.min()
            out.append(np.clip((v - lo) / (np.percentile(v, 99) - lo), 0, 1))
        elif metric == "spearman":
            v = m.sum(0)
            out.append(np.clip(v / np.percentile(np.abs(v), 99), -1, 1))
        else:
            v = m.sum(0)
            out.append((v - v.min()) / (v.max() - v.min()))
    return np.stack(out)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["random", "relu"])
def test_paper_normalization_matches_numpy(metric, kind):
    maps = _maps(kind, (3, 3, 32, 40), seed=11)
    got = normalize(_t(maps), metric, "paper").numpy()
    np.testing.assert_allclose(got, _np_paper(maps, metric), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scheme", NORMALIZATIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("channels", [1, 3])
def test_zero_and_constant_maps_stay_finite(scheme, metric, channels):
    maps = torch.zeros(2, channels, 8, 8, dtype=torch.float64)
    maps[1] = 0.7
    out = normalize(maps, metric, scheme)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    assert (out[1] == out[1, 0, 0]).all()


def test_paper_degenerate_percentile_is_finite_and_ordered():
    v = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    v[0, 0, 0, 0] = 5.0  # one nonzero pixel in 1024: the map's p99 equals its minimum
    for metric in ("spearman_abs", "spearman"):
        out = normalize(v, metric, "paper")
        assert torch.isfinite(out).all()
        assert out[0, 0, 0] == 1.0 and (out.flatten()[1:] == 0).all()


# ---------------------------------------------------------------- compare()


def test_compare_shapes_dtype_and_reference_pipeline():
    a, b = _pair("relu", (3, 3, 64, 64), seed=12)
    res = compare(_t(a), _t(b))
    assert tuple(res) == METRICS
    for v in res.values():
        assert v.shape == (3,) and v.dtype == torch.float64
    na, nb = _np_paper(a, "spearman_abs"), _np_paper(b, "spearman_abs")
    want = [stats.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(na, nb)]
    np.testing.assert_allclose(res["spearman_abs"].numpy(), want, rtol=0, atol=ATOL)
    sa, sb = _np_paper(a, "spearman"), _np_paper(b, "spearman")
    want = [stats.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(sa, sb)]
    np.testing.assert_allclose(res["spearman"].numpy(), want, rtol=0, atol=ATOL)
    ma, mb = _np_paper(a, "ssim"), _np_paper(b, "ssim")
    np.testing.assert_allclose(res["ssim"].numpy(), _sk_ssim(ma, mb, data_range=2.0, sigma=1.5), rtol=0, atol=ATOL)


def test_compare_identical_and_negated_maps():
    a = _t(_maps("random", (2, 3, 64, 64), seed=13))
    same = compare(a, a.clone())
    for m in METRICS:
        np.testing.assert_allclose(same[m].numpy(), 1.0, rtol=0, atol=1e-12)
    neg = compare(a, -a, metrics=("spearman_abs", "spearman"))
    np.testing.assert_allclose(neg["spearman_abs"].numpy(), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(neg["spearman"].numpy(), -1.0, rtol=0, atol=1e-12)


def test_compare_constant_map_gives_nan_without_raising():
    a = _t(_maps("random", (2, 3, 64, 64), seed=14))
    b = a.clone()
    b[1] = 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = compare(a, b)
    for m in ("spearman_abs", "spearman", "hog"):
        assert res[m][0] == pytest.approx(1.0) and torch.isnan(res[m][1])
    assert torch.isfinite(res["ssim"]).all()


def test_compare_mnist_size_hog_is_nan_others_finite():
    a, b = _pair("relu", (4, 1, 28, 28), seed=15)
    res = compare(_t(a), _t(b))
    assert torch.isnan(res["hog"]).all()
    for m in ("spearman_abs", "spearman", "ssim"):
        assert torch.isfinite(res[m]).all()


def test_compare_float32_input_and_other_schemes():
    a32 = torch.from_numpy(_maps("random", (2, 3, 48, 48), seed=16)).float()
    b32 = torch.from_numpy(_maps("blocky", (2, 3, 48, 48), seed=17)).float()
    for scheme in NORMALIZATIONS:
        r32 = compare(a32, b32, normalization=scheme)
        r64 = compare(a32.double(), b32.double(), normalization=scheme)
        for m in METRICS:
            assert r32[m].dtype == torch.float64
            torch.testing.assert_close(r32[m], r64[m], rtol=0, atol=1e-12)


def test_compare_metric_subset_and_single_name():
    a = torch.rand(2, 3, 16, 16)
    assert set(compare(a, a, metrics=("ssim",))) == {"ssim"}
    assert set(compare(a, a, metrics="spearman")) == {"spearman"}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(metrics=("pearson",)), "spearman_abs, spearman, ssim, hog"),
        (dict(normalization="minmax"), "paper, none, max_abs, second_moment"),
    ],
)
def test_compare_bad_names_raise(kwargs, match):
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=match):
        compare(a, a, **kwargs)


def test_compare_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        compare(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 17))
    with pytest.raises(ValueError):
        compare(torch.rand(3, 16, 16), torch.rand(3, 16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compare_on_cuda_matches_cpu():
    a, b = _pair("relu", (3, 3, 64, 64), seed=18)
    cpu = compare(_t(a), _t(b))
    gpu = compare(_t(a).cuda(), _t(b).cuda())
    for m in METRICS:
        assert gpu[m].device.type == "cuda"
        torch.testing.assert_close(gpu[m].cpu(), cpu[m], rtol=0, atol=ATOL, equal_nan=True)


def test_histogram_entropy_matches_numpy_histogram():
    from sanity_cli.metrics import histogram_entropy

    rng = np.random.default_rng(3)
    maps = rng.normal(size=(3, 2, 20, 20))
    maps[2] = 0.0  # constant: all mass in one bin
    got = histogram_entropy(torch.from_numpy(maps), bins=100)
    for i in range(3):
        v = np.abs(maps[i]).sum(axis=0).ravel()
        counts, _ = np.histogram(v, bins=100, range=(v.min(), v.max() if v.max() > v.min() else v.min() + 1))
        p = counts[counts > 0] / v.size
        assert abs(got[i].item() - float(-(p * np.log(p)).sum())) < 1e-9
    assert got[2].item() == 0.0


def test_gradcam_map_of_an_rgb_input_uses_the_rgb_rule():
    from sanity_cli.metrics import normalize

    cam = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    cam[:, :, 0, 0] = 100.0  # an outlier that the p99 rule clips and the max rule does not
    as_rgb = normalize(cam, "spearman_abs", "paper", single_channel=False)
    assert torch.allclose(as_rgb, normalize(cam.expand(-1, 3, -1, -1), "spearman_abs", "paper"))
    assert not torch.allclose(as_rgb, normalize(cam, "spearman_abs", "paper"))
