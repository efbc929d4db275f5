"""Spurious-signal detection (Adebayo, Muelly, Abelson and Kim, ICLR 2022): a positive test.

An artifact (`sanity_cli.artifacts`: tag, stripes, blur) is planted in the training
images of one class (`test.aligned_class`, each with probability `test.rate`). The
*spurious* model is trained on that split, the *normal* model (the run's trained model)
on the clean one, with the same architecture and training. Then, per method:

* K-SSD (known spurious signal detection): the spurious model's maps of images with the
  artifact against the artifact's mask (tag and stripes; blur has no location);
* CCM (cause for concern): the spurious model's maps of clean images against the normal
  model's (high: the maps give no sign that anything is wrong);
* FAM (false alarm): the normal model's maps of images with the artifact against the
  spurious model's (high: the method shows the same where the model does not use it).

Similarity is the run's metrics, and `mask_mass` (`artifacts.mask_mass_ratio`) against
the mask. The states, each scored against the one named in `compare_with`:

    0 normal model, clean images
    1 spurious model, clean images      vs 0: CCM
    2 artifact mask (the known map)     (tag, stripes)
    3 normal model, artifact images     vs 2: K-SSD of the normal model (the baseline)
    4 spurious model, artifact images   vs 2: K-SSD
    5 spurious model, artifact images   vs 3: FAM
(blur: 0, 1, then 2 normal model and 3 spurious model on blurred images, 3 vs 2: FAM.)

The rules (`judge`), with bootstrap intervals over images (and seeds) at `verdict.level`:

* the model relies on the artifact (the paper's spurious score) when the share of
  other-class images that the artifact moves to the aligned class, spurious model
  minus normal model paired per image, has an interval whose lower end lies above
  `test.reliance_margin`; otherwise every verdict of the check is `not valid`;
* detects: the paired gain of K-SSD (spurious model's minus normal model's, by
  `verdict.metric`) has its interval entirely above `test.detect_margin`; does not
  detect: entirely below; else inconclusive. A control (edge, random) is never said to
  detect: its maps do not depend on what the model uses;
* false alarm: FAM's interval lies entirely above `verdict.threshold` (the normal
  model's maps look like the spurious model's); no false alarm: entirely below.
* CCM (no verdict of its own, an outcome): concern when its interval lies entirely
  below `verdict.threshold`, no concern when entirely above.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor

from sanity_cli.artifacts import Artifact, mask_mass_ratio, plant
from sanity_cli.checks.base import Check, Compare, Condition, ModelNeed, Subject
from sanity_cli.errors import SanityError
from sanity_cli.methods.registry import is_control
from sanity_cli.randomization import State

log = logging.getLogger(__name__)

NORMAL_CLEAN, SPURIOUS_CLEAN = "normal model, clean images", "spurious model, clean images"
MASK = "artifact mask"
NORMAL_ARTIFACT, SPURIOUS_ARTIFACT = "normal model, artifact images", "spurious model, artifact images"
SPURIOUS_VS_NORMAL = "spurious model, artifact images, vs normal model"
# the measures: (verdict block, the state whose scores they are)
KSSD, KSSD_NORMAL, KSSD_GAIN, CCM, FAM = "K-SSD", "K-SSD normal model", "K-SSD gain", "CCM", "FAM"
MEASURE_STATES = {KSSD: SPURIOUS_ARTIFACT, KSSD_NORMAL: NORMAL_ARTIFACT, CCM: SPURIOUS_CLEAN}
MASS = "mask_mass"
# which settings of the `test` config change the spurious model's weights, per artifact
WEIGHT_SETTINGS = {"tag": ("tag_size", "tag_position", "tag_value"), "stripes": ("stripes_period", "stripes_strength"),
                   "blur": ("blur_sigma",)}
RULE_SETTINGS = ("aligned_class", "rate")


def artifact_of(settings: Mapping, seed: int) -> Artifact:
    """The `test` config's artifact, its random positions following `seed`."""
    return Artifact.from_settings(settings, seed)


def model_key(settings: Mapping) -> dict:
    """Every setting that changes the spurious model's weights (for the cache key)."""
    kind = settings.get("artifact", "tag")
    names = (*RULE_SETTINGS, *WEIGHT_SETTINGS.get(kind, ()))
    return {"artifact": kind, **{name: settings.get(name) for name in names}}


class Spurious(Check):
    name = "spurious"
    targets = ("predicted",)  # the paper explains the model's own decision (the spurious score reads it)

    def models_needed(self, settings: Mapping) -> list[ModelNeed]:
        artifact_of(settings, 0)  # a bad choice is refused before any training
        aligned, rate = int(settings["aligned_class"]), float(settings["rate"])

        def change(images: Tensor, labels: Tensor, seed: int) -> Tensor:
            if not (labels == aligned).any():
                classes = sorted(set(labels.tolist()))
                raise SanityError(f"test.aligned_class={aligned} has no training images; choose one of the "
                                  f"classes {classes[0]}..{classes[-1]}")
            return plant(images, labels, artifact_of(settings, seed), aligned, rate)

        return [ModelNeed("spurious", model_key(settings), change)]

    def check_fit(self, subject: Subject) -> None:
        if "spurious" not in subject.models:
            raise SanityError("test=spurious trains its spurious model on the dataset's training split; "
                              "run it with `sanity run test=spurious`")
        aligned = int(subject.settings["aligned_class"])
        if not 0 <= aligned < subject.num_outputs:
            raise SanityError(f"test.aligned_class={aligned} is not one of the model's {subject.num_outputs} "
                              f"classes; choose 0..{subject.num_outputs - 1}")

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        normal, spurious = subject.models["trained"], subject.models["spurious"]
        artifact = artifact_of(subject.settings, seed)

        def planted(display: Tensor, ids: Tensor) -> Tensor:
            return artifact.apply(display, ids.cpu())

        def mask(display: Tensor, ids: Tensor) -> Tensor:
            return artifact.mask(display.shape, ids.cpu()).to(display.device, display.dtype)

        yield Condition(State(0, NORMAL_CLEAN, ()), normal)
        yield Condition(State(1, SPURIOUS_CLEAN, ()), spurious, compare_with=0)
        if artifact.located:
            yield Condition(State(2, MASK, ()), spurious, inputs=planted, truth=mask, compare_with=2, kept=True)
            yield Condition(State(3, NORMAL_ARTIFACT, ()), normal, inputs=planted, compare_with=2, kept=True)
            yield Condition(State(4, SPURIOUS_ARTIFACT, ()), spurious, inputs=planted, compare_with=2)
            yield Condition(State(5, SPURIOUS_VS_NORMAL, ()), spurious, inputs=planted, compare_with=3)
        else:
            yield Condition(State(2, NORMAL_ARTIFACT, ()), normal, inputs=planted, compare_with=2, kept=True)
            yield Condition(State(3, SPURIOUS_VS_NORMAL, ()), spurious, inputs=planted, compare_with=2)

    def n_states(self, subject: Subject) -> int:
        return 6 if artifact_of(subject.settings, 0).located else 4

    def score(self, reference: Tensor, maps: Tensor, compare: Compare, settings: Mapping) -> dict[str, Tensor]:
        """The run's metrics, and against a mask (a 0/1 reference) the mask mass ratio; NaN
        where the reference is a map."""
        mask = reference[:, :1]
        is_mask = ((mask == 0) | (mask == 1)).flatten(1).all(dim=1)
        mass = mask_mass_ratio(maps, mask).to(is_mask.device).masked_fill(~is_mask, float("nan"))
        return {**compare(reference, maps), MASS: mass}

    def decisive(self, results: pd.DataFrame) -> pd.DataFrame:
        return results

    # the deciding rows: K-SSD gain (found the planted cause or not) and FAM (a false alarm or not)
    meanings = {"detects": "pass", "does not detect": "fail", "no false alarm": "pass", "false alarm": "fail"}

    passes_mean = ("the map points at a signal planted in the training images, which the model was trained to "
                   "rely on, and does not for a model that never saw it")
    fails_mean = ("the map does not point at a signal planted in the training images that the model relies on, "
                  "or points at it for a model that never saw it (a false alarm)")

    def figures(self, run_dir: Path, verdicts: pd.DataFrame) -> list[Path]:
        from sanity_cli.spurious_figures import draw

        return draw(run_dir)

    def judge(self, decisive: pd.DataFrame, settings, seed: int, run: Mapping) -> list[dict]:
        rows = verdict_rows(decisive, settings, seed, run)
        reasons = {row["note"].split("; ")[0] for row in rows if row["verdict"] == "not valid"}
        for reason in reasons:  # the run says so in one line
            log.warning("test=spurious: %s; its verdicts are not valid", reason)
        return rows


def verdict_rows(decisive: pd.DataFrame, settings, seed: int, run: Mapping) -> list[dict]:
    """The check's verdict rows (see the module's docstring for the rules)."""
    from sanity_cli.bootstrap import summarize_scores
    from sanity_cli.judging import judged_summary, seeds_agree

    test, methods = run.get("test") or {}, run.get("method") or {}
    if "aligned_class" not in test:
        raise SanityError("the run's test settings are missing (run.json): test=spurious needs its "
                          "aligned_class to judge; judge the run directory with `sanity report RUN_DIR`")

    def interval(rows: pd.DataFrame) -> dict:
        return summarize_scores(rows, level=settings.level, resamples=settings.resamples, seed=seed)

    reliance = reliance_rows(decisive, int(test["aligned_class"]))
    valid, reason = reliance_rule(reliance, float(test["reliance_margin"]), interval)
    located = MASK in set(decisive["block"])
    first = decisive.iloc[0]
    rows = []
    for method, part in decisive.groupby("method", sort=False):
        base = {"test": first["test"], "model": first["model"], "dataset": first["dataset"], "method": method,
                "level": settings.level, "resamples": settings.resamples}
        control = is_control(method, methods.get(method) or {})
        for block, metric, values, threshold, higher, words, decides in measures(part, settings, test, located):
            if words:  # a rule: the verdict's own interval, Monte Carlo error and agreement of the draws
                summary, outcome, borderline = judged_summary(values, threshold, higher, settings, seed)
                agree = seeds_agree(values, outcome, threshold, higher, settings, seed)
                outcome = words.get(outcome, outcome)
            else:
                summary, outcome, borderline, agree = interval(values), "", False, ""
            verdict, note = outcome, ""
            if block == KSSD_GAIN and not located:
                note = "blur changes the whole image: it has no mask, so K-SSD is undefined"
            if block == KSSD_GAIN and control and outcome == "detects":
                outcome = verdict = "does not detect"
                note = "a control's maps do not follow the model: never detects"
            if words and not valid:
                verdict, note = "not valid", "; ".join(p for p in (reason, note) if p)
            rows.append({**base, "step": int(values["step"].min()) if len(values) else 0, "block": block,
                         "metric": metric, "decides": decides, **summary, "threshold": threshold,
                         "change": "above" if higher else "below", "outcome": outcome, "borderline": borderline,
                         "seeds_agree": agree, "verdict": verdict, "note": note})
    return rows


def measures(part: pd.DataFrame, settings, test: Mapping, located: bool):
    """(block, metric, rows with seed/value, threshold, higher_is_yes, outcome words, decides)
    of one method's rows: the measures and, where a rule applies, its verdict."""
    metric = settings.metric
    by_state = {block: rows for block, rows in part.groupby("block", sort=False)}
    empty = part.iloc[0:0]
    words_detect = {"pass": "detects", "fail": "does not detect"}
    words_alarm = {"pass": "false alarm", "fail": "no false alarm"}
    words_concern = {"pass": "no concern", "fail": "concern"}
    for block in (KSSD, KSSD_NORMAL) if located else ():
        for name, rows in by_state.get(MEASURE_STATES[block], empty).groupby("metric", sort=False):
            yield block, name, rows, np.nan, True, None, False
    gain = paired_gain(by_state.get(SPURIOUS_ARTIFACT, empty), by_state.get(NORMAL_ARTIFACT, empty), metric) \
        if located else empty.assign(value=[])
    yield KSSD_GAIN, metric, gain, float(test["detect_margin"]), True, words_detect, True
    for block, state in ((CCM, SPURIOUS_CLEAN), (FAM, SPURIOUS_VS_NORMAL)):
        for name, rows in by_state.get(state, empty).groupby("metric", sort=False):
            if name == MASS:
                continue
            ruled = name == metric
            words = (words_alarm if block == FAM else words_concern) if ruled else None
            yield block, name, rows, settings.threshold, True, words, ruled and block == FAM


def paired_gain(spurious: pd.DataFrame, normal: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (seed, image): the spurious model's score minus the normal model's, of `metric`."""
    keys = ["seed", "image"]
    a = spurious[spurious["metric"] == metric].set_index(keys)
    b = normal[normal["metric"] == metric].set_index(keys)["value"]
    joined = a.join(b.rename("normal"), how="inner")
    joined["value"] = joined["value"] - joined["normal"]
    return joined.reset_index()


def reliance_rows(decisive: pd.DataFrame, aligned: int) -> pd.DataFrame:
    """Per (seed, image) of another class than `aligned`: moved_spurious, moved_normal (1.0 when the
    model explains, i.e. predicts, the aligned class on the image with the artifact) and their
    paired difference as `value`. Images without a label are left out."""
    one = decisive[decisive["metric"] == decisive["metric"].iloc[0]]
    one = one[one["method"] == one["method"].iloc[0]]
    spurious_state = SPURIOUS_ARTIFACT if MASK in set(decisive["block"]) else SPURIOUS_VS_NORMAL
    keys = ["seed", "image"]
    moved = {}
    for name, state in (("spurious", spurious_state), ("normal", NORMAL_ARTIFACT)):
        rows = one[(one["block"] == state) & (one["label"] >= 0) & (one["label"] != aligned)]
        moved[name] = rows.set_index(keys)["target"].eq(aligned).astype(float).rename(f"moved_{name}")
    table = pd.concat(moved.values(), axis=1, join="inner").reset_index()
    table["value"] = table["moved_spurious"] - table["moved_normal"]
    return table


def reliance_rule(reliance: pd.DataFrame, margin: float, interval) -> tuple[bool, str]:
    """(valid, reason): the model relies on the artifact when the interval of the paired share
    moved (spurious minus normal model) lies above `margin`."""
    if reliance.empty:
        return False, "no labelled image of another class than the aligned one: the spurious score is unknown"
    spurious = reliance["moved_spurious"].mean()
    normal = reliance["moved_normal"].mean()
    gain = interval(reliance)
    said = (f"spurious score {spurious:.2f} against the normal model's {normal:.2f} (gain {gain['mean']:.2f}, "
            f"interval [{gain['ci_low']:.2f}, {gain['ci_high']:.2f}])")
    if not gain["ci_low"] > margin:
        return False, f"the spurious model does not rely on the artifact: {said}, not above {margin:g}"
    return True, said


def spurious_score_table(results: pd.DataFrame, aligned: int, margin: float, *, level: float = 0.95,
                         resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row: the spurious score of both models with intervals, their paired gain and validity."""
    from sanity_cli.bootstrap import summarize_scores

    reliance = reliance_rows(results, aligned)
    interval = lambda rows: summarize_scores(rows, level=level, resamples=resamples, seed=seed)  # noqa: E731
    valid, reason = reliance_rule(reliance, margin, interval)
    row = {"n": len(reliance), "valid": valid, "reason": reason}
    for name in ("spurious", "normal"):
        stats = interval(reliance.assign(value=reliance[f"moved_{name}"])) if len(reliance) else {}
        row.update({f"{name}_{k}": stats.get(k, np.nan) for k in ("mean", "ci_low", "ci_high")})
    gain = interval(reliance) if len(reliance) else {}
    row.update({f"gain_{k}": gain.get(k, np.nan) for k in ("mean", "ci_low", "ci_high")})
    return pd.DataFrame([row])


CHECK = Spurious()
