"""Figures drawn from synthetic run directories: the files exist, open, and show what they should."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from sanity_cli.figures import (
    Run,
    curves_figure,
    describe_run,
    draw_all,
    map_grid_figure,
    normalize_abs,
    normalize_signed,
)

CASCADE_METHODS = ["gradient", "gradcam", "edge"]
CASCADE_STATES = [(0, "original"), (1, "fc2"), (2, "fc1"), (3, "conv2")]
DATA_STATES = [(0, "true labels"), (1, "shuffled labels")]
METRICS = ["spearman_abs", "spearman", "ssim", "hog"]


def write_summary(run_dir: Path, test: str, methods: list[str], states: list[tuple[int, str]],
                  seeds: tuple[int, ...] = (0,)) -> pd.DataFrame:
    """A summary.csv like the pipeline's; hog is all NaN, as on 28x28 maps."""
    rng = np.random.default_rng(0)
    rows = [{"test": test, "model": "cnn", "dataset": "mnist", "method": method, "seed": seed, "step": step,
             "block": block, "metric": metric,
             "mean": np.nan if metric == "hog" else (1.0 if step == 0 else rng.uniform(0, 0.9)),
             "std": np.nan if metric == "hog" else (0.0 if step == 0 else 0.1), "n": 4, "n_nan": 0,
             "train_accuracy": 0.9}
            for seed in seeds for method in methods for step, block in states for metric in METRICS]
    summary = pd.DataFrame(rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary.to_csv(run_dir / "summary.csv", index=False)
    return summary


def write_maps(run_dir: Path, test: str, methods: list[str], states: list[tuple[int, str]],
               n_images: int = 2, size: int = 32) -> None:
    """A maps.npz in the pipeline's format: gradcam maps have one channel, the others three."""
    rng = np.random.default_rng(1)
    meta = {"test": test, "model": "cnn", "dataset": "cifar10", "title": f"{test} randomization: cnn on cifar10",
            "methods": [m for m in methods if m != "edge"], "controls": ["edge"],
            "states": [{"key": f"s0_step{step}", "seed": 0, "step": step, "block": block} for step, block in states],
            "image_ids": list(range(10, 10 + n_images)), "labels": [3] * n_images,
            "classes": [f"c{i}" for i in range(10)]}
    arrays = {"meta": np.array(json.dumps(meta)),
              "images": rng.uniform(0, 1, (n_images, 3, size, size)).astype(np.float32)}
    for state in meta["states"]:
        for method in methods:
            channels = 1 if method == "gradcam" else 3
            arrays[f"{state['key']}/{method}"] = rng.normal(size=(n_images, channels, size, size)).astype(np.float32)
    np.savez_compressed(run_dir / "maps.npz", **arrays)


def assert_figures(paths: list[Path], expected: set[str]) -> None:
    """The expected PNGs, each with a PDF twin, each an image of a plausible size."""
    assert {p.name for p in paths} == expected
    for png in paths:
        assert png.with_suffix(".pdf").stat().st_size > 1000
        pixels = mpimg.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200


def test_cascade_run_draws_curves_and_both_grids(tmp_path):
    write_summary(tmp_path, "cascade", CASCADE_METHODS, CASCADE_STATES)
    write_maps(tmp_path, "cascade", CASCADE_METHODS, CASCADE_STATES)
    expected = {"cascade_curves.png", "methods.png"}  # methods.png: paper Fig. 1
    expected |= {f"cascade_grid_{style}_{i}.png" for style in ("abs", "diverging") for i in range(2)}
    assert_figures(draw_all(tmp_path), expected)
    assert all(p.parent == tmp_path / "figures" for p in (tmp_path / "figures").iterdir())


def test_without_maps_only_the_curves_are_drawn(tmp_path):
    write_summary(tmp_path, "independent", CASCADE_METHODS, CASCADE_STATES, seeds=(0, 1))
    assert_figures(draw_all(tmp_path), {"independent_curves.png"})


def test_data_run_draws_bars_and_map_pairs(tmp_path):
    write_summary(tmp_path, "data", CASCADE_METHODS, DATA_STATES)
    write_maps(tmp_path, "data", CASCADE_METHODS, DATA_STATES)
    assert_figures(draw_all(tmp_path), {"data_similarity.png", "data_maps_0.png", "data_maps_1.png",
                                                "methods.png"})


def test_random_logit_run_draws_bars(tmp_path):
    write_summary(tmp_path, "random_logit", CASCADE_METHODS, [(0, "true class"), (1, "random class")])
    assert_figures(draw_all(tmp_path), {"random_logit_similarity.png"})


def test_empty_run_dir_draws_nothing(tmp_path):
    assert draw_all(tmp_path) == []


def test_nan_only_metrics_are_skipped(tmp_path):
    summary = write_summary(tmp_path, "cascade", CASCADE_METHODS, CASCADE_STATES)
    fig = curves_figure(summary, describe_run(summary, None))
    titles = [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    assert titles == ["Rank correlation (absolute value)", "Rank correlation (no absolute value)", "SSIM"]


def test_controls_are_flat_reference_lines_not_curves(tmp_path):
    summary = write_summary(tmp_path, "cascade", CASCADE_METHODS, CASCADE_STATES)
    fig = curves_figure(summary, describe_run(summary, None), ["spearman"])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    plt.close(fig)
    assert set(lines) == {"gradient", "gradcam", "edge (control)"}
    control = lines["edge (control)"]
    assert control.get_linestyle() == "--" and len(set(control.get_ydata())) == 1
    randomized = summary[(summary["method"] == "edge") & (summary["metric"] == "spearman") & (summary["step"] >= 1)]
    assert control.get_ydata()[0] == pytest.approx(randomized["mean"].mean())
    assert list(lines["gradient"].get_xdata()) == [0, 1, 2, 3]


def test_title_names_model_dataset_and_seeds(tmp_path):
    summary = write_summary(tmp_path, "cascade", CASCADE_METHODS, CASCADE_STATES, seeds=(0, 1))
    assert describe_run(summary, None).title == "cascade: cnn on mnist, seeds 0, 1"


def test_normalizations_follow_the_paper():
    rng = np.random.default_rng(0)
    rgb, gray = rng.normal(size=(3, 20, 20)), rng.normal(size=(1, 20, 20))
    for saliency in (rgb, gray):
        shown = normalize_abs(saliency)
        assert shown.shape == (20, 20) and shown.min() == 0 and shown.max() == 1
        assert np.mean(shown == 1) == pytest.approx(0.01, abs=0.01)  # the top 1% saturate
        signed = normalize_signed(saliency)
        assert signed.min() == -1 and signed.max() == 1
        assert np.all(np.sign(signed) == np.sign(saliency.sum(axis=0)))
    assert not normalize_abs(np.zeros((3, 8, 8))).any() and not normalize_signed(np.zeros((3, 8, 8))).any()


def test_inception_sized_grid_stays_within_the_size_cap():
    blocks = ["original", "Logits", *[f"Mixed_{i}" for i in range(11)], *[f"Conv2d_{i}a_3x3" for i in range(4)]]
    mosaic = np.zeros((10 * 8, (1 + len(blocks)) * 8, 3), np.uint8)
    fig = map_grid_figure(mosaic, [f"method_{i}" for i in range(10)], ["input", *blocks], "t")
    width, height = fig.get_size_inches()
    plt.close(fig)
    assert width <= 24.5 and height <= 16.5 and width > 10


def test_meta_controls_come_after_the_methods(tmp_path):
    summary = write_summary(tmp_path, "cascade", CASCADE_METHODS, CASCADE_STATES)
    meta = {"test": "cascade", "title": "t, seed 0", "methods": ["gradcam", "gradient"], "controls": ["edge"],
            "states": []}
    run = describe_run(summary, meta)
    assert run == Run("cascade", "t, seed 0", ["gradcam", "gradient", "edge"], ["edge"],
                      "blocks randomized cumulatively, from the top (logits) down")
    assert run.explainers == ["gradcam", "gradient"]
