"""Means and bootstrap intervals of scores: one group's (`summarize_scores`), every
state's (`interval_table`, for curves with bands), and how far an interval's ends could
move in another draw of the resamples (`monte_carlo_error`).

The bootstrap resamples seeds first, then images within each seed drawn, when the
randomization was repeated; with one seed, the images. Pure functions of tables.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd

MC_Z = 1.96  # the Monte Carlo error of an interval end: half-width of its 95% band over bootstrap draws


def summarize_scores(rows: pd.DataFrame, *, level: float, resamples: int, seed: int) -> dict:
    """Mean and bootstrap interval of one group's `value` column (its images, of one or more seeds).

    The mean is the mean of the per-seed means (each repetition of the randomization
    weighs the same); NaN values are left out and counted. Returns n, n_nan,
    n_seeds, mean, ci_low, ci_high, seed_std (std of the per-seed means; NaN with one seed),
    and mc_low, mc_high: the Monte Carlo error of each end (`monte_carlo_error`).
    """
    values, seeds = rows["value"].to_numpy(dtype=float), rows["seed"].to_numpy()
    finite = ~np.isnan(values)
    groups = [values[finite & (seeds == s)] for s in np.unique(seeds[finite])]
    seed_means = np.array([g.mean() for g in groups])
    means = bootstrap_means(groups, resamples=resamples, seed=seed)
    low, high = _ends(means, level)
    mc_low, mc_high = monte_carlo_error(means, level)
    return {"n": int(finite.sum()), "n_nan": int((~finite).sum()), "n_seeds": len(groups),
            "mean": float(seed_means.mean()) if len(groups) else math.nan, "ci_low": low, "ci_high": high,
            "seed_std": float(seed_means.std(ddof=1)) if len(groups) > 1 else math.nan,
            "mc_low": mc_low, "mc_high": mc_high}


def bootstrap_interval(groups: list[np.ndarray], *, level: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-seed means.

    groups: one (n_s,) array of finite values per seed. With one seed the images are
    resampled; with several, the seeds are resampled and then, independently for each
    seed drawn, its images (a two-stage bootstrap). NaN, NaN when there is one value
    in all (no spread can be estimated) or none.
    """
    return _ends(bootstrap_means(groups, resamples=resamples, seed=seed), level)


def _ends(means: np.ndarray | None, level: float) -> tuple[float, float]:
    if means is None:
        return math.nan, math.nan
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def monte_carlo_error(means: np.ndarray | None, level: float) -> tuple[float, float]:
    """How far each end of the percentile interval could move in another draw of the
    resamples: half the width of the band of order statistics that holds the end's
    quantile with 95% probability (the sample quantile's rank is binomial, R p (1 - p)
    its variance). (NaN, NaN) without resamples."""
    if means is None:
        return math.nan, math.nan
    ordered = np.sort(means)
    ranks = np.arange(len(ordered))
    errors = []
    for p in ((1 - level) / 2, (1 + level) / 2):
        rank, spread = p * (len(ordered) - 1), MC_Z * math.sqrt(len(ordered) * p * (1 - p))
        band = np.interp([rank - spread, rank + spread], ranks, ordered)  # clamped at the extremes
        errors.append(float(band[1] - band[0]) / 2)
    return errors[0], errors[1]


def bootstrap_means(groups: list[np.ndarray], *, resamples: int, seed: int) -> np.ndarray | None:
    """The (resamples,) bootstrap replicates of the mean of per-seed means (see
    bootstrap_interval); None when there is one value in all or none."""
    if sum(len(g) for g in groups) < 2:
        return None
    counts, picks = _resamples(tuple(len(g) for g in groups), resamples, seed)
    if picks is None:
        means = counts[0] @ groups[0] / len(groups[0])
    else:
        # per_seed[s, r, j]: seed s's mean in its own image resample, for draw j of replicate r
        per_seed = np.stack([(c.reshape(-1, len(g)) @ g).reshape(c.shape[:2]) / len(g) for c, g in zip(counts, groups)])
        means = per_seed[picks, np.arange(resamples)[:, None], np.arange(len(groups))].mean(axis=1)
    return means


@functools.lru_cache(maxsize=8)
def _resamples(sizes: tuple[int, ...], resamples: int, seed: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The bootstrap draws for groups of these sizes, as counts of each value, and the
    seeds picked (None for one group). Every group of the same sizes gets the same draws,
    so the table is reproducible and groups are compared on common draws; drawing them
    once is what keeps a table of hundreds of groups fast.

    One group of n: counts (R, n). S groups: counts[s] (R, S, n_s), picks (R, S).
    """
    rng = np.random.default_rng(seed)
    shape = (resamples,) if len(sizes) == 1 else (resamples, len(sizes))
    counts = [_counts(rng.integers(0, n, (*shape, n)), n) for n in sizes]
    picks = rng.integers(0, len(sizes), shape) if len(sizes) > 1 else None
    return counts, picks


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """(..., n) indices in [0, n) -> (..., n) how often each index was drawn, as floats."""
    flat = draws.reshape(-1, n)
    offsets = flat + n * np.arange(len(flat))[:, None]
    return np.bincount(offsets.ravel(), minlength=flat.size).reshape(draws.shape).astype(np.float64)


def interval_table(results: pd.DataFrame, metric: str, *, level: float = 0.95, resamples: int = 1000,
                   seed: int = 0) -> pd.DataFrame:
    """Mean and bootstrap interval of `metric` at every step: one row per
    (test, model, dataset, method, step, block), for curves with confidence bands."""
    rows = results[results["metric"] == metric]
    out = [{"test": test, "model": model, "dataset": dataset, "method": method, "step": int(step), "block": block,
            "metric": metric, **summarize_scores(part, level=level, resamples=resamples, seed=seed)}
           for (test, model, dataset, method, step, block), part in
           rows.groupby(["test", "model", "dataset", "method", "step", "block"], sort=False)]
    return pd.DataFrame(out)
