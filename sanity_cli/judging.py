"""The verdict table of a results table: does each method's map change when the model
(or the data) is randomized, beyond what chance over the images explains?

Each check names the state that decides (`Check.decisive`: the fully randomized
model, each block of the independent test, the shuffled-label model, the random
class). At that state the similarity to the trained model's map is averaged over the
images, with a bootstrap confidence interval (seeds resampled first, then images
within each seed, when the randomization was repeated). The rule:

    pass          the interval lies entirely on the "changed" side of the threshold
                  (below it for similarities, above it where the check's own metric rises
                  with the change, `Check.higher_means_change`: the entropy rise)
    fail          entirely on the other side: the map stays like the trained model's
    inconclusive  the interval contains the threshold, or there is one value only; or an
                  end lies within the bootstrap's own Monte Carlo error of the threshold
                  (then `borderline`: another draw of the resamples could put it either side)
    undefined     every value is NaN (e.g. a constant map has no rank correlation)
    uninformative the trained model's maps are no better than noise (signal.csv);
                  replaces any outcome, since a noise map "changes" whatever the model
    not valid     a precondition of the check failed (`Check.preconditions`: the model is
                  random weights or no better than chance, the shuffled-label model did not
                  memorize, tensors were left trained, too few values): the outcome shows
                  nothing, and the note says why

A pass is necessary, not sufficient: a map with no information can pass (Binder et
al., CVPR 2023), and the outcome depends on the normalization and on the absolute
value (Hedström et al. 2023), hence robustness.csv and the `holds_in` column.

All functions here are pure functions of tables (and of the check registry, which says
each check's decisive state, rule and preconditions); `sanity_cli.verdict` judges a run
directory with them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import pandas as pd

from sanity_cli import checks
from sanity_cli.bootstrap import summarize_scores
from sanity_cli.checks.base import Check, Evidence, Precondition
from sanity_cli.errors import SanityError
from sanity_cli.metrics import METRICS

# metrics of a check's own that verdict.metric may name (random_logit's SSIM of each sign), by check
OWN_METRICS = {metric: check.name for check in checks.CHECKS.values() for metric in check.own_metrics}
VERDICT_METRICS = (*METRICS, *OWN_METRICS)
NOT_VALID = "not valid"  # a check's precondition failed (its rows say which in the note)
FEW_IMAGES = 10  # below this a percentile bootstrap interval is noticeably too narrow
# Below this many values the percentile bootstrap's 95% interval covers the mean far less often
# than it says (about 80% at 5 normal values, less below): no verdict rests on so few.
MIN_VALUES = 5
MAX_RESAMPLES = 20000  # a borderline verdict is recomputed with 10x the resamples, up to this many
UNDEFINED_WHY = {  # why every value of a metric can be NaN, for the note
    "hog": "maps smaller than one HOG block (pixels_per_cell x cells_per_block) have no HOG features; lower "
           "metrics.hog.pixels_per_cell",
    "ssim": "maps smaller than the SSIM window have no SSIM; lower metrics.ssim.sigma",
    "spearman": "constant maps have no rank correlation",
    "spearman_abs": "constant maps have no rank correlation",
}
KEYS = ["test", "model", "dataset", "method"]
COLUMNS = [*KEYS, "is_control", "step", "block", "metric", "decides", "n", "n_nan", "n_seeds", "mean", "ci_low",
           "ci_high", "seed_std", "level", "resamples", "mc_error", "threshold", "change", "outcome", "borderline",
           "seeds_agree", "verdict", "holds_in", "note"]


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
        """The verdict's metric must be one the run computes (a check with a `verdict_metric`
        decides by its own; a check's `own_metrics` exist only in its runs)."""
        check = checks.get(test)
        if check.verdict_metric is not None:
            return
        if self.metric in OWN_METRICS:
            if self.metric not in check.own_metrics:
                raise SanityError(f"verdict.metric={self.metric} exists only for test={OWN_METRICS[self.metric]}; "
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
                  rise_threshold: float = 0.05, evidence: Evidence | None = None,
                  run_settings: Mapping | None = None) -> pd.DataFrame:
    """One row per (test, model, dataset, method, block, metric) at each check's decisive state.

    results: a results.csv table (one or more tests). `metric` decides, unless the
    check decides by a metric of its own (entropy: entropy_rise, judged against
    `rise_threshold`); that row has decides=True. Metrics without a rule (the raw
    entropy) get no row. `signal` (signal.csv) marks uninformative methods;
    `robustness` (robustness.csv) gives `holds_in`; `controls` names control methods;
    `evidence` (what the run recorded of its models and states) lets each check test its
    preconditions (without it only those of the table itself are tested: enough values);
    `run_settings` (run.json's settings) go to a check with a rule of its own.
    Columns: see COLUMNS; `change` says on which side of the threshold a change lies;
    `mc_error` is the Monte Carlo error of the interval end nearest the threshold;
    `seeds_agree` says with several seeds how many of them alone give the same outcome.
    """
    settings = VerdictSettings(metric, threshold, rise_threshold, level, resamples)
    settings.check()
    if results.empty:
        raise SanityError("the results table is empty: no finished state to judge; finish the run first")
    controls = set(controls) | controls_of_signal(signal)
    rows = [row for decisive in _decisive_parts(results)
            for row in _judge_all(decisive, settings, seed, run_settings, controls)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["is_control"] = table["method"].isin(controls)
    table["holds_in"] = _holds_in(table, robustness, settings, seed)
    table = _annotate(table, _uninformative(signal))
    return apply_preconditions(table, evidence).reset_index(drop=True)


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
    # a check with a rule of its own (spurious, manifold)
    own = check.judge(decisive, settings, seed, {**(run_settings or {}), "controls": sorted(controls)})
    if own is not None:
        return own
    deciding = check.verdict_metric or settings.metric
    if deciding not in decisive["metric"].unique():
        raise SanityError(f"the results of test {check.name} have no '{deciding}' scores (they have "
                          f"{', '.join(decisive['metric'].unique())}); choose one of those with verdict.metric=NAME")
    rows = []
    for (test, model, dataset, method, block, metric), part in decisive.groupby([*KEYS, "block", "metric"],
                                                                               sort=False):
        rule = _rule(metric, check, settings)
        if rule is None:
            continue
        threshold, higher = rule
        summary, outcome, borderline = judged_summary(part, threshold, higher, settings, seed)
        rows.append({"test": test, "model": model, "dataset": dataset, "method": method,
                     "step": int(part["step"].min()), "block": block, "metric": metric, "decides": metric == deciding,
                     **summary, "level": settings.level, "threshold": threshold,
                     "change": "above" if higher else "below", "outcome": outcome, "borderline": borderline,
                     "seeds_agree": seeds_agree(part, outcome, threshold, higher, settings, seed), "verdict": outcome})
    return rows


def judged_summary(part: pd.DataFrame, threshold: float, higher: bool, settings: VerdictSettings,
                   seed: int) -> tuple[dict, str, bool]:
    """The summary of one group's scores, its outcome, and whether it is borderline.

    An interval end within its Monte Carlo error of the threshold could fall either side
    in another draw of the resamples: such a verdict is computed again with ten times
    the resamples (up to MAX_RESAMPLES), and if an end is still that close it is
    inconclusive and borderline. summary: summarize_scores's, with `resamples` and
    `mc_error` (the error of the end nearest the threshold)."""
    resamples = settings.resamples
    while True:
        summary = summarize_scores(part, level=settings.level, resamples=resamples, seed=seed)
        ends = [(abs(summary["ci_low"] - threshold), summary["mc_low"]),
                (abs(summary["ci_high"] - threshold), summary["mc_high"])]
        distance, error = min(ends, key=lambda end: end[0]) if summary["n"] > 1 else (math.nan, math.nan)
        outcome = judge(summary["ci_low"], summary["ci_high"], threshold, higher, summary["n"], margin=error)
        borderline = bool(distance <= error)  # NaN compares False: no interval, no borderline
        if not borderline or resamples >= MAX_RESAMPLES or settings.resamples >= MAX_RESAMPLES:
            break
        resamples = min(10 * resamples, MAX_RESAMPLES)
    summary = {key: value for key, value in summary.items() if key not in ("mc_low", "mc_high")}
    return {**summary, "resamples": resamples, "mc_error": error}, outcome, borderline


def seeds_agree(part: pd.DataFrame, outcome: str, threshold: float, higher: bool, settings: VerdictSettings,
                seed: int) -> str:
    """'k/S': of the S seeds of the randomization, how many alone (their images bootstrapped)
    give `outcome`; '' with one seed."""
    seeds = part["seed"].unique()
    if len(seeds) < 2:
        return ""
    agree = 0
    for one in seeds:
        summary = summarize_scores(part[part["seed"] == one], level=settings.level, resamples=settings.resamples,
                                   seed=seed)
        agree += judge(summary["ci_low"], summary["ci_high"], threshold, higher, summary["n"],
                       margin=_error_near(summary, threshold)) == outcome
    return f"{agree}/{len(seeds)}"


def _error_near(summary: dict, threshold: float) -> float:
    """The Monte Carlo error of the interval end nearest the threshold."""
    if not summary["n"] > 1:
        return math.nan
    low_nearer = abs(summary["ci_low"] - threshold) <= abs(summary["ci_high"] - threshold)
    return summary["mc_low"] if low_nearer else summary["mc_high"]


def _rule(metric: str, check: Check, settings: VerdictSettings) -> tuple[float, bool] | None:
    """(threshold, higher_means_change) for a metric of `check`'s rows; None when no rule judges it.
    A check whose own verdict metric rises with the change (`Check.higher_means_change`,
    the entropy rise) is judged against verdict.rise_threshold, similarities against
    verdict.threshold."""
    if check.higher_means_change and metric == check.verdict_metric:
        return settings.rise_threshold, True
    if metric in VERDICT_METRICS:
        return settings.threshold, False
    return None


def judge(ci_low: float, ci_high: float, threshold: float, higher_means_change: bool, n: int,
          margin: float = 0.0) -> str:
    """pass / fail / inconclusive / undefined from an interval and a threshold.

    A tie with the threshold counts as containing it (inconclusive), and so does an end
    within `margin` of it (the interval ends' own Monte Carlo error).
    """
    if n == 0:
        return "undefined"
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "inconclusive"
    margin = margin if math.isfinite(margin) else 0.0
    above, below = ci_low > threshold + margin, ci_high < threshold - margin
    if above or below:
        return "pass" if above == higher_means_change else "fail"
    return "inconclusive"



def variant_outcomes(robustness: pd.DataFrame, *, threshold: float = 0.5, level: float = 0.95,
                     resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The similarity rule applied to each variant of robustness.csv at the decisive state:
    one row per (test, model, dataset, method, block, normalization, metric)
    with n, mean, ci_low, ci_high and outcome."""
    rows = []
    for decisive in _decisive_parts(robustness):
        for (test, model, dataset, method, block, scheme, metric), part in decisive.groupby(
                [*KEYS, "block", "normalization", "metric"], sort=False):
            # judged as the verdict's own rows are (more resamples for an end near the threshold)
            settings = VerdictSettings(threshold=threshold, level=level, resamples=resamples)
            summary, outcome, _ = judged_summary(part, threshold, False, settings, seed)
            rows.append({"test": test, "model": model, "dataset": dataset, "method": method, "block": block,
                         "normalization": scheme, "metric": metric, **summary, "outcome": outcome})
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


def controls_of_signal(signal: pd.DataFrame | None) -> set[str]:
    """The methods signal.csv marks as controls."""
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
    table["note"] = ["; ".join(part for part in (row.note if isinstance(row.note, str) else "", _note(row)) if part)
                     for row in table.itertuples(index=False)]
    return table


def apply_preconditions(table: pd.DataFrame, evidence: Evidence | None) -> pd.DataFrame:
    """Rows whose check's preconditions failed on this run (`Check.preconditions`, not for
    controls, which use neither model nor data), or that rest on fewer than MIN_VALUES
    values, get the verdict `not valid`; the reasons open their note."""
    found = {test: checks.get(str(test)).preconditions(evidence) if evidence is not None else []
             for test in table["test"].unique()}
    verdicts, notes = list(table["verdict"]), list(table["note"])
    for i, row in enumerate(table.itertuples(index=False)):
        reasons = [] if row.is_control else [c.reason for c in found[row.test]
                                               if c.holds is False and c.concerns(row.method)]
        if 0 < row.n < MIN_VALUES:
            reasons.append(f"only {row.n} value{'s' if row.n > 1 else ''}: too few for a bootstrap interval "
                           f"(at least {MIN_VALUES}); explain more images (n_images)")
        if reasons and row.verdict != "undefined":
            verdicts[i] = NOT_VALID
            notes[i] = "; ".join([f"not valid: {reasons[0]}", *reasons[1:], *([notes[i]] if notes[i] else [])])
    table["verdict"], table["note"] = verdicts, notes
    return table


def failed_preconditions(evidence: Evidence | None, tests: Collection[str]) -> list[Precondition]:
    """The preconditions of these checks that the run failed, each once."""
    failed: dict[tuple[str, str], Precondition] = {}
    for test in tests:
        for condition in (checks.get(str(test)).preconditions(evidence) if evidence is not None else []):
            if condition.holds is False:
                failed.setdefault((condition.name, condition.reason), condition)
    return list(failed.values())


def _note(row) -> str:
    """A short note on what this row's verdict does and does not show."""
    notes = []
    if row.borderline is True:
        end = "lower" if abs(row.ci_low - row.threshold) <= abs(row.ci_high - row.threshold) else "upper"
        value = row.ci_low if end == "lower" else row.ci_high
        notes.append(f"borderline: the interval's {end} end {value:.4f} lies within the bootstrap's Monte Carlo "
                     f"error (±{row.mc_error:.4f}) of the threshold {row.threshold:g}, even with {row.resamples} "
                     "resamples: too close to call")
    # the control notes speak of the similarity rule, not of a check with a rule of its own (spurious)
    similarity_rule = not isinstance(row.note, str) and row.outcome in ("pass", "fail", "inconclusive", "undefined")
    if row.is_control and similarity_rule and row.method == "random":
        notes.append("noise control: passes trivially, so a pass is necessary, not sufficient" if row.outcome == "pass"
                     else "noise control: noise does not pass this check")
    elif row.is_control and similarity_rule:
        notes.append("control without model or data: what no change looks like")
    if row.verdict == "uninformative":
        notes.append(f"maps no better than noise on the trained model (signal.csv); alone the randomization "
                     f"would say {row.outcome}")
    if row.n == 0:
        notes.append(f"every value is undefined (NaN): {UNDEFINED_WHY.get(row.metric, 'e.g. constant maps')}")
    elif MIN_VALUES <= row.n < FEW_IMAGES:
        notes.append(f"only {row.n} values: the interval is optimistic; explain more images (n_images)")
    if row.n_nan and row.n:
        notes.append(f"{row.n_nan} of {row.n + row.n_nan} values undefined (NaN), left out")
    return "; ".join(notes)
