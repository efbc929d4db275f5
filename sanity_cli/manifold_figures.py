"""Figures of test=manifold: each method's share in the tangent space of the data manifold
(bars with their intervals, against sqrt(k/d) and the random control), and for a few
images each method's map beside its part in the tangent space and the rest.

Read from a run's files (verdict.csv's rows, results.csv, maps.npz), like the other figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sanity_cli.figures import save
from sanity_cli.runfiles import open_maps, read_results

MAX_IMAGES = 3


def draw_manifold(run_dir: Path, verdicts: pd.DataFrame) -> list[Path]:
    """figures/manifold_fractions.png and figures/manifold_maps.png of a test=manifold run."""
    run_dir = Path(run_dir)
    drawn = []
    if len(verdicts):
        drawn.append(save(fraction_figure(verdicts, chance_of(run_dir)), run_dir / "figures" /
                          "manifold_fractions.png"))
    figure = maps_figure(run_dir, set(verdicts.loc[verdicts["is_control"].astype(bool), "method"]))
    if figure is not None:
        drawn.append(save(figure, run_dir / "figures" / "manifold_maps.png"))
    return drawn


def chance_of(run_dir: Path) -> float:
    """sqrt(k/d) as the run recorded it (results.csv's chance_fraction), NaN without it."""
    results = read_results(run_dir)
    return float(results.loc[results["metric"] == "chance_fraction", "value"].mean())


def fraction_figure(verdicts: pd.DataFrame, chance: float):
    """Bars of the mean fraction per method with the interval as error bars; the controls
    hatched; sqrt(k/d) dashed, the threshold of `aligned` dotted."""
    rows = verdicts.reset_index(drop=True)
    fig = Figure(figsize=(1.0 + 0.8 * len(rows), 3.6))
    ax = fig.subplots()
    positions = np.arange(len(rows))
    low, high = rows["mean"] - rows["ci_low"], rows["ci_high"] - rows["mean"]
    colours = {"aligned": "#4c9a5a", "not aligned": "#c0504d", "inconclusive": "#d9a33a", "not valid": "#888888"}
    for i, row in rows.iterrows():
        ax.bar(i, row["mean"], color=colours.get(row["verdict"], "#7a7a7a"),
               hatch="//" if bool(row["is_control"]) else None, edgecolor="black", linewidth=0.5)
    ax.errorbar(positions, rows["mean"], yerr=[low.fillna(0), high.fillna(0)], fmt="none", ecolor="black", capsize=3)
    if np.isfinite(chance):
        ax.axhline(chance, color="black", linestyle="--", linewidth=1,
                   label=f"random direction, sqrt(k/d) = {chance:.3f}")
    ax.axhline(float(rows["threshold"].iloc[0]), color="#c0504d", linestyle=":", linewidth=1,
               label=f"aligned above {float(rows['threshold'].iloc[0]):.3f}")
    labels = [f"{m}\n(control)" if c else m for m, c in zip(rows["method"], rows["is_control"].astype(bool))]
    ax.set_xticks(positions, labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("||P_T a|| / ||a||")
    ax.set_ylim(0, 1)
    level = float(rows["level"].iloc[0])
    ax.set_title(f"Share of each map in the manifold's tangent space ({level:.0%} intervals)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def maps_figure(run_dir: Path, controls: set[str]):
    """One row per method, for a few images three panels each: the map (unit length), its
    part in the tangent space and the rest (the map minus that part); the images on top.
    None without maps.npz or without both states' maps."""
    with open_maps(run_dir) as kept:
        if kept is None:
            return None
        keys = {state["step"]: state["key"] for state in kept.meta["states"]}
        if 0 not in keys or 1 not in keys:
            return None
        methods = [m for m in kept.meta["methods"] if f"{keys[0]}/{m}" in kept]
        images = kept.images.astype(np.float32)[:MAX_IMAGES]
        maps = {m: (kept.maps(f"{keys[0]}/{m}"), kept.maps(f"{keys[1]}/{m}")) for m in methods}
    if not methods:
        return None
    n = len(images)
    fig = Figure(figsize=(1.1 * 3 * n + 0.4, 1.15 * (1 + len(methods)) + 0.3))
    axes = fig.subplots(1 + len(methods), 3 * n, squeeze=False)
    for i in range(n):
        picture = images[i].transpose(1, 2, 0)
        axes[0, 3 * i + 1].imshow(picture.squeeze(), cmap="gray" if picture.shape[2] == 1 else None, vmin=0, vmax=1)
        axes[0, 3 * i].axis("off"), axes[0, 3 * i + 2].axis("off")
        for j, method in enumerate(methods, start=1):
            whole, inside = maps[method][0][i].sum(axis=0), maps[method][1][i].sum(axis=0)
            scale = float(np.abs(whole).max()) or 1.0
            for k, (panel, title) in enumerate(((whole, "map"), (inside, "tangent part"), (whole - inside, "rest"))):
                ax = axes[j, 3 * i + k]
                ax.imshow(panel, cmap="bwr", vmin=-scale, vmax=scale)
                if j == 1:
                    ax.set_title(title, fontsize=7)
                if i == 0 and k == 0:
                    ax.set_ylabel(f"{method}\n(control)" if method in controls else method, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig
