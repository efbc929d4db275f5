"""Paper-style figures drawn from summary.csv, so they can be redrawn without recomputing."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

METRIC_TITLES = {
    "spearman_abs": "Rank correlation (absolute value)",
    "spearman": "Rank correlation (no absolute value)",
    "ssim": "SSIM",
    "hog": "HOG similarity",
}


def similarity_curves(summary: pd.DataFrame, path: Path, title: str, metrics: list[str] | None = None) -> Path:
    """Similarity to the trained model's maps against the block reached (paper Fig. 3).

    One panel per metric, one line per method: the mean over images with a band of
    one standard deviation. The x axis reads from the trained model ("original")
    through each block re-initialized, top (logits) first.
    """
    metrics = metrics or [m for m in METRIC_TITLES if m in set(summary["metric"])]
    steps = summary.drop_duplicates("step").sort_values("step")
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.2 + 0.42 * len(steps) * len(metrics) + 2.5 * len(metrics), 4.2),
                             squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        for method, rows in summary[summary["metric"] == metric].groupby("method", sort=False):
            rows = rows.sort_values("step")
            line, = ax.plot(rows["step"], rows["mean"], marker="o", markersize=3, label=method)
            ax.fill_between(rows["step"], rows["mean"] - rows["std"].fillna(0), rows["mean"] + rows["std"].fillna(0),
                            color=line.get_color(), alpha=0.15, linewidth=0)
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=10)
        ax.set_xticks(steps["step"], steps["block"], rotation=90, fontsize=8)
        ax.set_xlabel("block re-initialized (cumulative, from the top)")
        ax.set_ylim(-1.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("similarity to the trained model's map")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
