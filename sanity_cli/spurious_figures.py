"""The figures of test=spurious, drawn from a finished run's files.

* `{test}_spurious_gallery.png`: for each example image (up to GALLERY_IMAGES), the image,
  the image with the artifact and the artifact's mask, then each method's |map| of the
  normal and the spurious model on the clean and on the artifact image (the layout of
  Adebayo et al. 2022, Fig. 1);
* `{test}_spurious_measures.png`: per method, K-SSD gain, CCM and FAM by the verdict's
  metric, and the mask mass ratio of both models, as bars with their bootstrap intervals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from sanity_cli.checks import spurious
from sanity_cli.figures import image_tile, map_tile, save
from sanity_cli.judging import VerdictSettings
from sanity_cli.runfiles import MAPS, open_maps, read_info, read_results
from sanity_cli.validation import run_seeds
from sanity_cli.verdict import settings_of

GALLERY_IMAGES = 2
MAP_STATES = (spurious.NORMAL_CLEAN, spurious.SPURIOUS_CLEAN, spurious.NORMAL_ARTIFACT, spurious.SPURIOUS_ARTIFACT)
MAP_TITLES = ("normal,\nclean", "spurious,\nclean", "normal,\nartifact", "spurious,\nartifact")


def draw(run_dir: Path) -> list[Path]:
    """Both figures where the run's files allow; their PNG paths."""
    run_dir = Path(run_dir)
    settings = read_info(run_dir).get("settings") or {}
    if not settings.get("test"):
        return []
    paths = []
    if (run_dir / MAPS).is_file():
        paths.append(gallery(run_dir, settings))
    results = run_dir / "results.csv"
    if results.is_file():
        paths.append(measures_figure(run_dir, read_results(run_dir), settings))
    return paths


def _artifact_images(meta: dict, images: np.ndarray, settings: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """The example images with the artifact, and its mask (None for blur), as the run planted them."""
    seeds = run_seeds(settings.get("seed", 0), settings["test"].get("seeds"))
    artifact = spurious.artifact_of(settings["test"], int(seeds[0]))
    ids = torch.tensor(meta["image_ids"][: len(images)])
    planted = artifact.apply(torch.from_numpy(images).float(), ids).numpy()
    mask = artifact.mask(images.shape, ids).numpy() if artifact.located else None
    return planted, mask


def gallery(run_dir: Path, settings: dict) -> Path:
    with open_maps(run_dir) as kept:
        meta = kept.meta
        states = {s["block"]: s["key"] for s in meta["states"] if s["seed"] == meta["states"][0]["seed"]}
        methods = [m for m in meta["methods"] if f"{states[spurious.NORMAL_CLEAN]}/{m}" in kept]
        images = kept.images[:GALLERY_IMAGES].astype(np.float32)
        planted, mask = _artifact_images(meta, images, settings)
        maps = {(state, m): kept.maps(f"{states[state]}/{m}") for state in MAP_STATES if state in states
                for m in methods}
    columns = len(MAP_STATES) * len(images)
    fig = Figure(figsize=(1.05 * columns + 1.2, 1.1 * (1 + len(methods)) + 0.9))
    axes = fig.subplots(1 + len(methods), columns, squeeze=False)
    for i in range(len(images)):
        shape = image_tile(images[i]).shape[:2]
        first = i * len(MAP_STATES)
        inputs = [(image_tile(images[i]), f"image {meta['image_ids'][i]}"), (image_tile(planted[i]), "with artifact"),
                  (image_tile(mask[i]), "mask") if mask is not None else (None, "(no mask)"), (None, "")]
        for k, (tile, title) in enumerate(inputs):
            ax = axes[0][first + k]
            if tile is not None:
                ax.imshow(tile)
            ax.set_title(title, fontsize=7)
        for j, method in enumerate(methods):
            for k, state in enumerate(MAP_STATES):
                ax = axes[1 + j][first + k]
                if (state, method) in maps:
                    ax.imshow(map_tile(maps[(state, method)][i], False, shape))
                if j == 0:
                    ax.set_title(MAP_TITLES[k], fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    for j, method in enumerate(methods):
        axes[1 + j][0].set_ylabel(method, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"{meta.get('title', '')}\nartifact {settings['test'].get('artifact')}, aligned class "
                 f"{settings['test'].get('aligned_class')}; |map|, white = high", fontsize=8)
    fig.tight_layout()
    return save(fig, run_dir / "figures" / f"{meta['test']}_spurious_gallery.png")


def measure_table(results: pd.DataFrame, settings: dict) -> pd.DataFrame:
    """The check's verdict rows (with the informative ones) from results.csv and run.json's settings."""
    verdict = settings_of(settings) if settings else VerdictSettings()
    rows = spurious.verdict_rows(results[results["step"] > 0], verdict, 0, settings)
    return pd.DataFrame(rows)


def measures_figure(run_dir: Path, results: pd.DataFrame, settings: dict) -> Path:
    table = measure_table(results, settings)
    metric = settings_of(settings).metric
    panels = [(spurious.KSSD_GAIN, metric), (spurious.CCM, metric), (spurious.FAM, metric),
              (spurious.KSSD, spurious.MASS), (spurious.KSSD_NORMAL, spurious.MASS)]
    panels = [(b, m) for b, m in panels if ((table["block"] == b) & (table["metric"] == m)).any()]
    fig = Figure(figsize=(2.6 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (block, metric_name) in zip(axes[0], panels):
        part = table[(table["block"] == block) & (table["metric"] == metric_name)]
        x = np.arange(len(part))
        low = (part["mean"] - part["ci_low"]).clip(lower=0).fillna(0)
        high = (part["ci_high"] - part["mean"]).clip(lower=0).fillna(0)
        ax.bar(x, part["mean"].fillna(0), yerr=[low, high], capsize=2, color="0.6")
        threshold = part["threshold"].dropna()
        if len(threshold):
            ax.axhline(threshold.iloc[0], color="red", lw=1)
        if metric_name == spurious.MASS:
            ax.axhline(1.0, color="0.3", lw=0.8, ls="--")  # an even spread
        ax.set_xticks(x, part["method"], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{block}\n({metric_name})", fontsize=8)
    test = settings["test"]
    score = spurious.spurious_score_table(results[results["step"] > 0], int(test["aligned_class"]),
                                          float(test["reliance_margin"]))
    fig.suptitle(f"{test.get('artifact')}: {score['reason'].iloc[0]}", fontsize=7, wrap=True)
    fig.tight_layout()
    return save(fig, run_dir / "figures" / f"{settings['test']['name']}_spurious_measures.png")

