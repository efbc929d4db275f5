"""The end of a run: its tables summarized, the figures drawn, and what the maps' structure
says (signal.csv); also a finished run's figures redrawn (`finish`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sanity_cli.errors import SanityError
from sanity_cli.pipeline.plan import RunPlan
from sanity_cli.pipeline.prepare import Prepared
from sanity_cli.rundir import replace_atomically
from sanity_cli.runfiles import models_of, read_results
from sanity_cli.settings import Settings
from sanity_cli.signal import table_of, uninformative

log = logging.getLogger(__name__)
UNDEFINED_HINTS = {"hog": " (the maps are smaller than one HOG block); lower metrics.hog.pixels_per_cell, e.g. to 4",
                   "ssim": " (the maps are smaller than the SSIM window); lower metrics.ssim.sigma"}


@dataclass
class RunResult:
    """What a run leaves in its directory, also returned for callers in Python."""

    run_dir: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    figures: list[Path]
    timing: dict[str, float] = field(default_factory=dict)
    verdict: pd.DataFrame | None = None   # verdict.csv: one row per check, method and metric
    report: Path | None = None            # report.html


def finish(run_dir: Path, timing: dict[str, float] | None = None) -> RunResult:
    """Summarize results.csv and draw the figures; also used to redraw a finished run."""
    from sanity_cli.figures import draw_all
    from sanity_cli.summary import summarize

    results = read_results(run_dir)
    if results.empty:
        raise SanityError(f"{run_dir} has no finished state yet; continue the run with resume=true")
    summary = summarize(results, models_of(run_dir))
    summary.to_csv(run_dir / "summary.csv", index=False)
    for metric, rows in summary[summary["step"] > 0].groupby("metric"):
        if rows["n"].sum() == 0:
            log.warning("%s is undefined for every image%s", metric, undefined_hint(metric, run_dir))
    return RunResult(run_dir, results, summary, draw_all(run_dir), timing or {})


def record_signal(plan: RunPlan, figures: dict[str, dict], run_dir: Path) -> pd.DataFrame:
    """signal.csv: how much structure each method's maps of the unrandomized model have,
    next to a random map's (sanity_cli.signal; `figures` by `figures_by_method`); warns
    for each method that has none."""
    controls = [name for name in figures if name in plan.controls]
    table = table_of(figures, controls=controls)
    replace_atomically(run_dir / "signal.csv", table.to_csv(index=False).encode())
    for name in uninformative(table):
        log.warning("%s: the trained model's maps are no more structured than a random map (signal.csv); "
                    "its randomization scores are marked uninformative, not a pass", name)
    return table


def examples_meta(settings: Settings, plan: RunPlan, prepared: Prepared) -> dict:
    """What maps.npz says of its examples: the run, its methods and the images shown."""
    n = settings.n_examples
    return {"test": settings.test.name, "model": settings.model.name, "dataset": settings.dataset.name,
            "title": describe(settings, plan), "methods": list(plan.methods), "controls": plan.controls,
            "image_ids": prepared.image_ids[:n].tolist(), "labels": prepared.labels[:n].tolist(),
            "classes": list(prepared.classes)}


def describe(settings: Settings, plan: RunPlan) -> str:
    seeds = ", ".join(map(str, plan.seeds))
    return f"{settings.test.name}: {settings.model.name} on {settings.dataset.name}, seed {seeds}"


def undefined_hint(metric: str, run_dir: Path) -> str:
    """Why `metric` is undefined for every image of a run: the maps' size where it is below
    what the metric needs (UNDEFINED_HINTS), else maps that are constant everywhere."""
    from sanity_cli.runfiles import open_maps, read_info

    metrics = (read_info(run_dir).get("settings") or {}).get("metrics") or {}
    try:
        with open_maps(run_dir) as maps:
            side = min(maps.images.shape[-2:])
    except Exception:  # noqa: BLE001 - no maps.npz, or a damaged one: the size is unknown
        return UNDEFINED_HINTS.get(metric, "")
    if metric == "ssim":
        needs = 2 * int(3.5 * float((metrics.get("ssim") or {}).get("sigma", 1.5)) + 0.5) + 1
    elif metric == "hog":
        hog = metrics.get("hog") or {}
        needs = int(hog.get("pixels_per_cell", 16)) * int(hog.get("cells_per_block", 3))
    else:
        needs = 0
    if side < needs:
        return UNDEFINED_HINTS.get(metric, "")
    return (f" (the maps, {side} pixels a side, are large enough for it: the maps compared were constant, which no "
            "similarity can score; see which methods give constant maps in figures/methods.png)")
