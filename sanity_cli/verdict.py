"""A verdict per method, with its uncertainty: does the method's map change when the
model (or the data) is randomized, beyond what chance over the images explains?

Each check names the state that decides (`Check.decisive`: the fully randomized
model, each block of the independent test, the shuffled-label model, the random
class). At that state the similarity to the trained model's map is averaged over the
images, with a bootstrap confidence interval (seeds resampled first, then images
within each seed, when the randomization was repeated). The rule:

    pass          the interval lies entirely on the "changed" side of the threshold
                  (below it for similarities, above it for the entropy rise)
    fail          entirely on the other side: the map stays like the trained model's
    inconclusive  the interval contains the threshold, or there is one value only
    undefined     every value is NaN (e.g. a constant map has no rank correlation)
    uninformative the trained model's maps are no better than noise (signal.csv);
                  replaces any outcome, since a noise map "changes" whatever the model

A pass is necessary, not sufficient: a map with no information can pass (Binder et
al., CVPR 2023), and the outcome depends on the normalization and on the absolute
value (Hedström et al. 2023), hence `robustness_scores` and the `holds_in` column.

All functions here are pure functions of tables; `write_verdicts` is the one that
reads and writes a run directory.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sanity_cli import checks
from sanity_cli.errors import SanityError
from sanity_cli.metrics import METRICS, NORMALIZATIONS, compare

RANDOM_LOGIT_METRICS = ("ssim_positive", "ssim_negative")
VERDICT_METRICS = (*METRICS, *RANDOM_LOGIT_METRICS)
RISE_METRICS = ("entropy_rise",)  # a higher score is the change; no other metric of a run is judged so
ROBUSTNESS_METRICS = ("spearman_abs", "spearman")  # with and without absolute value
RESCALINGS = ("none", "max_abs", "second_moment")  # normalizations that multiply a map by a positive number
CONTROL_KINDS = ("edge", "random")
NOT_VALID = "not valid"  # a check's precondition failed (its rows say which in the note)
FEW_IMAGES = 10  # below this a percentile bootstrap interval is noticeably too narrow
KEYS = ["test", "model", "dataset", "method"]
COLUMNS = [*KEYS, "is_control", "step", "block", "metric", "decides", "n", "n_nan", "n_seeds", "mean", "ci_low",
           "ci_high", "seed_std", "level", "resamples", "threshold", "change", "outcome", "verdict", "holds_in", "note"]


@dataclass(frozen=True)
class VerdictSettings:
    """The `verdict` settings of a run (conf/config.yaml)."""

    metric: str = "spearman_abs"
    threshold: float = 0.5
    rise_threshold: float = 0.05
    level: float = 0.95
    resamples: int = 1000

    @classmethod
    def from_mapping(cls, values: Mapping | None) -> VerdictSettings:
        """Settings from a mapping (a config's `verdict` block), defaults for what it lacks;
        SanityError for an unknown key or a bad value."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise SanityError(f"unknown setting verdict.{unknown[0]}; choose from: "
                              f"{', '.join(cls.__dataclass_fields__)}")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """SanityError with one line for the first bad value."""
        if self.metric not in VERDICT_METRICS:
            raise SanityError(f"unknown verdict metric '{self.metric}'; choose one of: {', '.join(VERDICT_METRICS)}")
        for key, low, high in (("threshold", -1.0, 1.0), ("rise_threshold", -1.0, math.inf)):
            value = getattr(self, key)
            if not _is_number(value) or not low <= value <= high:
                span = f"between {low:g} and {high:g}" if math.isfinite(high) else f"at least {low:g}"
                raise SanityError(f"verdict.{key} must be a number {span}, not {value!r}")
        if not _is_number(self.level) or not 0 < self.level < 1:
            raise SanityError(f"verdict.level must be a number between 0 and 1 (exclusive), e.g. 0.95; "
                              f"not {self.level!r}")
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 1:
            raise SanityError(f"verdict.resamples must be a whole number of at least 1, e.g. 1000; "
                              f"not {self.resamples!r}")

    def check_run(self, metric_names: Collection[str], test: str) -> None:
        """The verdict's metric must be one the run computes (the entropy test decides by its own)."""
        if checks.get(test).verdict_metric is not None:
            return
        if self.metric in RANDOM_LOGIT_METRICS:
            if test != "random_logit":
                raise SanityError(f"verdict.metric={self.metric} exists only for test=random_logit; "
                                  f"choose one of: {', '.join(metric_names)}")
        elif self.metric not in metric_names:
            raise SanityError(f"verdict.metric={self.metric} is not among metrics.names "
                              f"[{', '.join(metric_names)}]; add it there or choose one of them")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- the verdict table


def verdict_table(results: pd.DataFrame, *, metric: str = "spearman_abs", threshold: float = 0.5,
                  level: float = 0.95, resamples: int = 1000, seed: int = 0, signal: pd.DataFrame | None = None,
                  robustness: pd.DataFrame | None = None, controls: Collection[str] = (),
                  rise_threshold: float = 0.05, run_settings: Mapping | None = None) -> pd.DataFrame:
    """One row per (test, model, dataset, method, block, metric) at each check's decisive state.

    results: a results.csv table (one or more tests). `metric` decides, unless the
    check decides by a metric of its own (entropy: entropy_rise, judged against
    `rise_threshold`); that row has decides=True. Metrics without a rule (the raw
    entropy) get no row. `signal` (signal.csv) marks uninformative methods;
    `robustness` (robustness.csv) gives `holds_in`; `controls` names control methods;
    `run_settings` (run.json's) reach a check with a rule of its own (`Check.verdict_rows`).
    Columns: see COLUMNS; `change` says on which side of the threshold a change lies.
    """
    settings = VerdictSettings(metric, threshold, rise_threshold, level, resamples)
    settings.check()
    if results.empty:
        raise SanityError("the results table is empty: no finished state to judge; finish the run first")
    controls = set(controls) | _controls_of(signal)
    rows = [row for decisive in _decisive_parts(results)
            for row in _judge_all(decisive, settings, seed, run_settings, controls)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["is_control"] = table["method"].isin(controls)
    table["holds_in"] = _holds_in(table, robustness, settings, seed)
    return _annotate(table, _uninformative(signal)).reset_index(drop=True)


def _decisive_parts(results: pd.DataFrame):
    """Each (test, model, dataset)'s rows at its check's decisive state(s), step 0 never among
    them; nothing for a run whose decisive state has not finished."""
    for (test, _, _), rows in results.groupby(["test", "model", "dataset"], sort=False):
        decisive = checks.get(str(test)).decisive(rows)
        decisive = decisive[decisive["step"] > 0]
        if len(decisive):
            yield decisive


def _judge_all(decisive: pd.DataFrame, settings: VerdictSettings, seed: int, run_settings: Mapping | None = None,
               controls: Collection[str] = ()) -> list[dict]:
    """The verdict rows of one (test, model, dataset)'s decisive rows."""
    check = checks.get(str(decisive["test"].iloc[0]))
    own = check.verdict_rows(decisive, settings, seed, {**(run_settings or {}), "controls": sorted(controls)})
    if own is not None:
        return own
    deciding = check.verdict_metric or settings.metric
    if deciding not in decisive["metric"].unique():
        raise SanityError(f"the results of test {check.name} have no '{deciding}' scores (they have "
                          f"{', '.join(decisive['metric'].unique())}); choose one of those with verdict.metric=NAME")
    rows = []
    for (test, model, dataset, method, block, metric), part in decisive.groupby([*KEYS, "block", "metric"],
                                                                               sort=False):
        rule = _rule(metric, settings)
        if rule is None:
            continue
        threshold, higher = rule
        summary = summarize_scores(part, level=settings.level, resamples=settings.resamples, seed=seed)
        outcome = judge(summary["ci_low"], summary["ci_high"], threshold, higher, summary["n"])
        rows.append({"test": test, "model": model, "dataset": dataset, "method": method,
                     "step": int(part["step"].min()), "block": block, "metric": metric, "decides": metric == deciding,
                     **summary, "level": settings.level, "resamples": settings.resamples, "threshold": threshold,
                     "change": "above" if higher else "below", "outcome": outcome, "verdict": outcome})
    return rows


def _rule(metric: str, settings: VerdictSettings) -> tuple[float, bool] | None:
    """(threshold, higher_means_change) for a metric; None when no rule judges it."""
    if metric in RISE_METRICS:
        return settings.rise_threshold, True
    if metric in VERDICT_METRICS:
        return settings.threshold, False
    return None


def judge(ci_low: float, ci_high: float, threshold: float, higher_means_change: bool, n: int) -> str:
    """pass / fail / inconclusive / undefined from an interval and a threshold.

    A tie with the threshold counts as containing it (inconclusive).
    """
    if n == 0:
        return "undefined"
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "inconclusive"
    above, below = ci_low > threshold, ci_high < threshold
    if above or below:
        return "pass" if above == higher_means_change else "fail"
    return "inconclusive"


# ---------------------------------------------------------------- intervals


def summarize_scores(rows: pd.DataFrame, *, level: float, resamples: int, seed: int) -> dict:
    """Mean and bootstrap interval of one group's `value` column (its images, of one or more seeds).

    The mean is the mean of the per-seed means (each repetition of the randomization
    weighs the same); NaN values are left out and counted. Returns n, n_nan,
    n_seeds, mean, ci_low, ci_high, seed_std (std of the per-seed means; NaN with one seed).
    """
    values, seeds = rows["value"].to_numpy(dtype=float), rows["seed"].to_numpy()
    finite = ~np.isnan(values)
    groups = [values[finite & (seeds == s)] for s in np.unique(seeds[finite])]
    seed_means = np.array([g.mean() for g in groups])
    low, high = bootstrap_interval(groups, level=level, resamples=resamples, seed=seed)
    return {"n": int(finite.sum()), "n_nan": int((~finite).sum()), "n_seeds": len(groups),
            "mean": float(seed_means.mean()) if len(groups) else math.nan, "ci_low": low, "ci_high": high,
            "seed_std": float(seed_means.std(ddof=1)) if len(groups) > 1 else math.nan}


def bootstrap_interval(groups: list[np.ndarray], *, level: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-seed means.

    groups: one (n_s,) array of finite values per seed. With one seed the images are
    resampled; with several, the seeds are resampled and then, independently for each
    seed drawn, its images (a two-stage bootstrap). NaN, NaN when there is one value
    in all (no spread can be estimated) or none.
    """
    if sum(len(g) for g in groups) < 2:
        return math.nan, math.nan
    counts, picks = _resamples(tuple(len(g) for g in groups), resamples, seed)
    if picks is None:
        means = counts[0] @ groups[0] / len(groups[0])
    else:
        # per_seed[s, r, j]: seed s's mean in its own image resample, for draw j of replicate r
        per_seed = np.stack([(c.reshape(-1, len(g)) @ g).reshape(c.shape[:2]) / len(g) for c, g in zip(counts, groups)])
        means = per_seed[picks, np.arange(resamples)[:, None], np.arange(len(groups))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


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
           rows.groupby([*KEYS, "step", "block"], sort=False)]
    return pd.DataFrame(out)


# ---------------------------------------------------------------- robustness


@torch.no_grad()
def robustness_scores(reference: Tensor, maps: Tensor, *, single_channel: bool) -> dict[str, dict[str, Tensor]]:
    """The same comparison under every normalization, with and without absolute value.

    reference, maps: (B, C, H, W) maps of the trained model and of one state.
    Returns normalization -> metric (spearman_abs, spearman) -> (B,) float64 scores,
    for the run's maps as they are (no second explanation pass). The rescalings
    (none, max_abs, second_moment) multiply each map by a positive number, which
    changes no rank: their scores are computed once.
    """
    scores: dict[str, dict[str, Tensor]] = {}
    for scheme in NORMALIZATIONS:
        shared = next((scores[done] for done in RESCALINGS if done in scores), None)
        if scheme in RESCALINGS and shared is not None:
            scores[scheme] = dict(shared)
        else:
            scores[scheme] = compare(reference, maps, ROBUSTNESS_METRICS, scheme, single_channel=single_channel)
    return scores


def variant_outcomes(robustness: pd.DataFrame, *, threshold: float = 0.5, level: float = 0.95,
                     resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The similarity rule applied to each variant of robustness.csv at the decisive state:
    one row per (test, model, dataset, method, block, normalization, metric)
    with n, mean, ci_low, ci_high and outcome."""
    rows = []
    for decisive in _decisive_parts(robustness):
        for (test, model, dataset, method, block, scheme, metric), part in decisive.groupby(
                [*KEYS, "block", "normalization", "metric"], sort=False):
            summary = summarize_scores(part, level=level, resamples=resamples, seed=seed)
            rows.append({"test": test, "model": model, "dataset": dataset, "method": method, "block": block,
                         "normalization": scheme, "metric": metric, **summary,
                         "outcome": judge(summary["ci_low"], summary["ci_high"], threshold, False, summary["n"])})
    return pd.DataFrame(rows)


def _holds_in(table: pd.DataFrame, robustness: pd.DataFrame | None, settings: VerdictSettings,
              seed: int) -> pd.Series:
    """'k/N' on each deciding row: in how many of the N variants the outcome is the same."""
    holds = pd.Series("", index=table.index, dtype=object)
    if robustness is None or robustness.empty:
        return holds
    variants = variant_outcomes(robustness, threshold=settings.threshold, level=settings.level,
                                resamples=settings.resamples, seed=seed)
    if variants.empty:
        return holds
    by_row = variants.groupby([*KEYS, "block"], sort=False)["outcome"].agg(list)
    for index, row in table[table["decides"] & (table["outcome"] != "undefined")].iterrows():
        outcomes = by_row.get(tuple(row[[*KEYS, "block"]]))
        if outcomes:
            holds[index] = f"{sum(o == row['outcome'] for o in outcomes)}/{len(outcomes)}"
    return holds


# ---------------------------------------------------------------- signal, controls, notes


def _truthy(column: pd.Series) -> pd.Series:
    """A bool column as read back from CSV (True/False, true/false, 1/0)."""
    return column.astype(str).str.strip().str.lower().isin(("true", "1", "1.0", "yes"))


def _controls_of(signal: pd.DataFrame | None) -> set[str]:
    if signal is None or "is_control" not in signal:
        return set()
    return set(signal.loc[_truthy(signal["is_control"]), "method"])


def _uninformative(signal: pd.DataFrame | None) -> set[str]:
    """Methods whose trained-model maps signal.csv does not tell apart from noise."""
    if signal is None or "informative" not in signal:
        return set()
    return set(signal.loc[~_truthy(signal["informative"]), "method"])


def _annotate(table: pd.DataFrame, uninformative: set[str]) -> pd.DataFrame:
    """Uninformative methods (controls aside) get that verdict where the check compares maps
    (a noise map changes whatever the model); every row gets its note."""
    comparing = table["test"].map(lambda test: checks.get(str(test)).compares_maps).astype(bool)
    noise = (table["method"].isin(uninformative) & ~table["is_control"] & (table["outcome"] != "undefined")
             & (table["verdict"] != NOT_VALID) & comparing)
    table.loc[noise, "verdict"] = "uninformative"
    table["note"] = [_note(row) for row in table.itertuples(index=False)]
    return table


def _note(row) -> str:
    """A short note on what this row's verdict does and does not show; a note the check
    wrote itself (its own rule) comes first and says what its controls mean."""
    own = row.note if isinstance(row.note, str) else ""
    notes = [own] if own else []
    if own:
        pass
    elif row.is_control and row.method == "random":
        notes.append("noise control: passes trivially, so a pass is necessary, not sufficient" if row.outcome == "pass"
                     else "noise control: noise does not pass this check")
    elif row.is_control:
        notes.append("control without model or data: what no change looks like")
    if row.verdict == "uninformative":
        notes.append(f"maps no better than noise on the trained model (signal.csv); alone the randomization "
                     f"would say {row.outcome}")
    if row.n == 0:
        notes.append("every value is undefined (NaN), e.g. constant maps have no rank correlation")
    elif row.n == 1:
        notes.append("one value: no interval can be estimated; explain more images (n_images)")
    elif row.n < FEW_IMAGES:
        notes.append(f"only {row.n} values: the interval is optimistic; explain more images (n_images)")
    if row.n_nan and row.n:
        notes.append(f"{row.n_nan} of {row.n + row.n_nan} values undefined (NaN), left out")
    return "; ".join(notes)


# ---------------------------------------------------------------- a run directory


def write_verdicts(run_dir: Path, cfg: Mapping | None = None) -> pd.DataFrame:
    """Judge a run from its files and write run_dir/verdict.csv; return the table.

    Reads results.csv, and robustness.csv, signal.csv, run.json and maps.npz's list
    of controls where present. The verdict settings are run.json's, overridden by
    `cfg["verdict"]` (a config or any mapping with a `verdict` block) when given.
    """
    run_dir = Path(run_dir)
    results_path = run_dir / "results.csv"
    if not results_path.is_file():
        raise SanityError(f"'{run_dir}' has no results.csv; give the directory of a run")
    run_settings = run_info(run_dir).get("settings", {})
    settings = settings_of(run_settings, cfg)
    table = verdict_table(pd.read_csv(results_path), **asdict(settings), signal=_read(run_dir / "signal.csv"),
                          robustness=_read(run_dir / "robustness.csv"), controls=controls_of_run(run_dir),
                          run_settings=run_settings)
    table.to_csv(run_dir / "verdict.csv", index=False)
    return table


def settings_of(run_settings: Mapping, cfg: Mapping | None = None) -> VerdictSettings:
    """The verdict settings: defaults, then those the run recorded, then `cfg`'s."""
    values = dict(run_settings.get("verdict") or {})
    override = cfg.get("verdict") if cfg is not None else None
    if override is not None:
        values.update(_plain(override))
    return VerdictSettings.from_mapping(values)


def parse_overrides(args: Sequence[str]) -> dict:
    """`verdict.KEY=VALUE` arguments as {"verdict": {KEY: value}}, values read as YAML
    (0.3 a number, spearman a string): what may follow the run directory of
    `sanity report` and `sanity figures`."""
    values = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key.startswith("verdict.") or key.count(".") != 1:
            raise SanityError(f"unexpected argument '{arg}'; only verdict settings may follow the run directory, "
                              "e.g. verdict.threshold=0.3")
        try:
            values[key.removeprefix("verdict.")] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise SanityError(f"cannot read the value of {arg}; e.g. {key}=0.3") from None
    VerdictSettings.from_mapping(values)  # refuse a bad value before any work
    return {"verdict": values}


def _plain(values) -> dict:
    """A plain dict of a DictConfig or mapping."""
    return OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)


def run_info(run_dir: Path) -> dict:
    """run.json as a dict ({} when absent)."""
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def controls_of_run(run_dir: Path) -> set[str]:
    """The control methods of a run: maps.npz's list, signal.csv's, and the selected
    methods of the kinds edge and random (from run.json's settings)."""
    found: set[str] = set()
    maps = Path(run_dir) / "maps.npz"
    if maps.is_file():
        with np.load(maps) as npz:
            found |= set(json.loads(str(npz["meta"][()])).get("controls", []))
    found |= _controls_of(_read(Path(run_dir) / "signal.csv"))
    methods = run_info(run_dir).get("settings", {}).get("method") or {}
    found |= {name for name, options in methods.items() if ((options or {}).get("method") or name) in CONTROL_KINDS}
    return found


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None
