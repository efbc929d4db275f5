"""The tidy CSV of a run and its summary.

results.csv holds one row per (seed, step, method, image, metric); rows of a state
are appended and flushed as soon as the state is done, so an interrupted run keeps
everything it finished. summary.csv aggregates them per (method, step, block, metric).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
from torch import Tensor

COLUMNS = ["test", "model", "dataset", "method", "seed", "step", "block", "image", "label", "target",
           "metric", "value"]
GROUP = ["test", "model", "dataset", "method", "seed", "step", "block", "metric"]


class ResultsWriter:
    """Appends rows to results.csv, writing the header once and flushing per state."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerow(COLUMNS)

    def append(self, rows: Iterable[Mapping]) -> None:
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writerows(rows)
            handle.flush()


def state_rows(context: Mapping, step: int, block: str, scores: Mapping[str, Mapping[str, Tensor]],
               images: Tensor, labels: Tensor, targets: Tensor) -> list[dict]:
    """Rows for one state. scores: method -> metric -> (B,) values; images: (B,) indices."""
    image_ids, label_ids, target_ids = images.tolist(), labels.tolist(), targets.tolist()
    rows = []
    for method, per_metric in scores.items():
        for metric, values in per_metric.items():
            for i, value in enumerate(values.tolist()):
                rows.append({**context, "method": method, "step": step, "block": block, "image": image_ids[i],
                             "label": label_ids[i], "target": target_ids[i], "metric": metric,
                             "value": value if math.isfinite(value) else float("nan")})
    return rows


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count per (test, model, dataset, method, seed, step, block, metric).

    Undefined scores (NaN: a constant map has no rank correlation) are left out of
    mean and std and counted in `n_nan`. Step 0, the trained model against itself,
    is its own row and never part of another step's average.
    """
    grouped = results.groupby(GROUP, sort=False, dropna=False)["value"]
    summary = grouped.agg(mean="mean", std="std", n="count").reset_index()
    summary["n_nan"] = grouped.apply(lambda v: int(v.isna().sum())).to_numpy()
    return summary.sort_values(["test", "method", "metric", "seed", "step"], kind="stable").reset_index(drop=True)
