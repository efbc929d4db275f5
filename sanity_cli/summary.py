"""summary.csv: mean, std and count of a results table per (test, model, dataset, method,
seed, step, block, metric), with the accuracies of the models compared."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pandas as pd

from sanity_cli import checks
from sanity_cli.errors import SanityError
from sanity_cli.runfiles import NEW_DIRECTORY

log = logging.getLogger(__name__)

GROUP = ["test", "model", "dataset", "method", "seed", "step", "block", "metric"]


def summarize(results: pd.DataFrame, models: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """Mean, std and count per (test, model, dataset, method, seed, step, block, metric).

    Undefined scores (NaN: a constant map has no rank correlation) are left out of
    mean and std and counted in `n_nan`. Step 0, the reference compared with itself,
    is its own row and never part of another step's average. The accuracies of the
    models that whole steps explain (`Check.step_models`: step 0 the trained model, step 1
    of the data test the shuffled-label one) are added as columns. An image scored twice
    in one group is counted once when both rows agree, and refused when they do not (two
    runs' rows mixed in one table).
    """
    results = _once_each(results)
    grouped = results.groupby(GROUP, sort=False, dropna=False)["value"]
    summary = grouped.agg(mean="mean", std="std", n="count").reset_index()
    summary["n_nan"] = grouped.apply(lambda v: int(v.isna().sum())).to_numpy()
    models, names = models or {}, {}
    for test in summary["test"].unique():
        names.update(_step_models(str(test)))
    for column in ("train_accuracy", "test_accuracy"):
        by_step = {step: models.get(name, {}).get(column) for step, name in names.items()}
        summary[column] = summary["step"].map(by_step.get)
    return summary.sort_values(["test", "method", "metric", "seed", "step"], kind="stable").reset_index(drop=True)


def _step_models(test: str) -> Mapping[int, str]:
    """The check's step -> model name; the trained model at step 0 for a check this
    installation lacks."""
    try:
        return checks.get(test).step_models
    except SanityError:
        return {0: "trained"}


def _once_each(results: pd.DataFrame) -> pd.DataFrame:
    """`results` with each (group, image) once; SanityError when repeats disagree in value."""
    key = [*GROUP, "image"]
    repeated = results.duplicated(key, keep=False)
    if not repeated.any():
        return results
    values = results[repeated].groupby(key, dropna=False)["value"].nunique(dropna=False)
    if (values > 1).any():
        first = values[values > 1].index[0]
        raise SanityError(f"the results hold {int((values > 1).sum())} images scored twice with different values "
                          f"(e.g. method {first[3]}, seed {first[4]}, step {first[5]}, image {first[8]}): rows of "
                          f"two runs are mixed; {NEW_DIRECTORY}")
    extra = int(results.duplicated(key).sum())
    log.warning("the results repeat %d rows; each is counted once", extra)
    return results.drop_duplicates(key).reset_index(drop=True)
