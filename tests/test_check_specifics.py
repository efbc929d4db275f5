"""What a check says of itself is what the verdict, the summary, the figures and the card
use: a check registered later (here a stand-in, registered for the test alone) is judged,
summarized, drawn and described by its own attributes, with no list elsewhere to extend.
And a run directory is read through `runfiles` alone: run.json, maps.npz in their units."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from sanity_cli import card, checks
from sanity_cli.checks.base import Check
from sanity_cli.checks.cascade import Cascade
from sanity_cli.errors import SanityError
from sanity_cli.figures import Run, bars_figure, curves_figure, draw_all, verdict_figure
from sanity_cli.judging import verdict_table
from sanity_cli.runfiles import COLUMNS, models_of, open_maps, read_info, read_meta
from sanity_cli.runstore import compact
from sanity_cli.summary import summarize

NAME = "standin"


class StandIn(Cascade):
    """A check of its own scores: `growth` rises when the map changes; step 1 explains `other`."""

    name = NAME
    verdict_metric = "growth"
    higher_means_change = True
    step_models = {0: "trained", 1: "other"}
    pair_label = "similarity: one model vs the other"
    unbounded_metrics = ("growth",)
    verdict_label = "growth of the map"

    def axis_label(self, order: str) -> str:
        return f"stand-in states ({order})"

    def fail_meaning(self, order: str) -> str:
        return f"the stand-in's map does not grow ({order})"


@pytest.fixture
def standin(monkeypatch) -> StandIn:
    check = StandIn()
    monkeypatch.setitem(checks.CHECKS, NAME, check)
    return check


def results(values: dict[str, list[float]], metric: str = "growth", test: str = NAME) -> pd.DataFrame:
    """Step 0 (1.0) and step 1 holding `values` per method, one seed."""
    rows = [{"test": test, "model": "cnn", "dataset": "digits", "method": method, "seed": 3, "step": step,
             "block": "original" if step == 0 else "changed", "image": image, "label": 0, "target": 0,
             "metric": metric, "value": 1.0 if step == 0 else value, "init": "paper", "reset_bn_stats": False,
             "normalization": "paper"}
            for method, spread in values.items() for step in (0, 1) for image, value in enumerate(spread)]
    return pd.DataFrame(rows, columns=COLUMNS)


def spread(center: float, n: int = 30) -> list[float]:
    return list(center + np.random.default_rng(1).uniform(-0.03, 0.03, n))


# ---------------------------------------------------------------- the verdict


def test_the_verdict_reads_the_direction_of_the_checks_own_metric(standin, monkeypatch):
    table = verdict_table(results({"grows": spread(0.4), "flat": spread(0.01)}), rise_threshold=0.2)
    rows = table.set_index("method")
    assert rows.loc["grows", "verdict"] == "pass" and rows.loc["flat", "verdict"] == "fail"
    assert set(rows["change"]) == {"above"} and set(rows["threshold"]) == {0.2} and rows["decides"].all()
    # the same scores from a check whose metric falls with the change: no rule judges `growth`
    monkeypatch.setattr(standin, "higher_means_change", False)
    assert verdict_table(results({"grows": spread(0.4)}), rise_threshold=0.2).empty


# ---------------------------------------------------------------- summary.csv


def test_the_summary_takes_each_steps_model_from_the_check(standin):
    models = {"trained": {"train_accuracy": 0.9, "test_accuracy": 0.8},
              "other": {"train_accuracy": 0.25, "test_accuracy": 0.2}}
    summary = summarize(results({"m": spread(0.4)}), models).set_index("step")
    assert (summary.loc[0, "train_accuracy"], summary.loc[0, "test_accuracy"]) == (0.9, 0.8)
    assert (summary.loc[1, "train_accuracy"], summary.loc[1, "test_accuracy"]) == (0.25, 0.2)
    # a cascade's step 1 explains a randomized model, not a model of its own
    cascade = summarize(results({"m": spread(0.4)}, metric="spearman_abs", test="cascade"), models)
    assert cascade.loc[cascade["step"] == 1, "train_accuracy"].isna().all()


# ---------------------------------------------------------------- figures


def test_figures_draw_the_check_as_it_says(standin, tmp_path):
    run = Run(NAME, "stand-in", ["m", "edge"], ["edge"], standin.axis_label("top_down"))
    summary = summarize(results({"m": spread(3.0), "edge": spread(0.5)}))
    bars = bars_figure(summary, run)
    assert run.pair and bars.axes[0].get_ylabel() == "similarity: one model vs the other"
    assert bars.axes[0].get_ylim()[1] > 3.0  # growth is not a similarity: no cap at 1
    similarity = Run("cascade", "cascade", ["m"], [])
    capped = curves_figure(summary.assign(metric="spearman_abs", test="cascade"), similarity)
    assert not similarity.pair and capped.axes[0].get_ylim() == (-0.05, 1.05)
    # and the verdict figure's y-axis is the check's
    verdicts = verdict_table(results({"m": spread(0.4)}), rise_threshold=0.2)
    intervals = pd.DataFrame([{"method": "m", "step": step, "block": "b", "mean": 0.4, "ci_low": 0.3,
                               "ci_high": 0.5} for step in (0, 1)])
    assert verdict_figure(intervals, verdicts, run, 0.95).axes[0].get_ylabel() == "growth of the map"
    # a whole run: bars named after the check, not curves
    summary.to_csv(tmp_path / "summary.csv", index=False)
    (tmp_path / "run.json").write_text(json.dumps({"settings": {"test": {"order": "bottom_up"}}}))
    assert [p.name for p in draw_all(tmp_path)] == [f"{NAME}_similarity.png"]


# ---------------------------------------------------------------- the card


def test_the_card_describes_each_column_in_its_checks_words(standin):
    assert card.check_of_column("cascade_bottom_up") == (checks.CHECKS["cascade"], "bottom_up")
    assert card.check_of_column("smooth_cascade") == (checks.CHECKS["smooth_cascade"], "top_down")
    assert card.check_of_column("gone_bottom_up") is None and card.fail_meaning("gone") == ""
    assert card.fail_meaning("cascade") == ("the map stays the same when the model's weights are randomized from "
                                            "the logits down")
    assert card.fail_meaning("cascade_bottom_up").endswith("randomized from the input up")
    assert card.aside("cascade_bottom_up").startswith("Its verdict is at the fully randomized model")
    assert card.aside("cascade") == "" and card.fail_meaning("spurious").startswith("the map does not point at")
    assert card.fail_meaning(f"{NAME}_bottom_up") == "the stand-in's map does not grow (bottom_up)"
    table = pd.DataFrame([{"method": "m", "check": column, "verdict": "fail", "note": "", "is_control": False}
                          for column in (NAME, "gone")])
    text = card.reading("m", table)
    assert f"under {NAME}, the stand-in's map does not grow (top_down)" in text
    assert "under gone, the map does not change under the check's randomization" in text


def test_a_check_without_words_of_its_own_keeps_the_defaults():
    plain = Check()
    assert (plain.pair_label, plain.unbounded_metrics, plain.own_metrics, plain.higher_means_change) == \
        (None, (), (), False)
    assert plain.step_models == {0: "trained"} and plain.fail_meaning("top_down") == ""
    assert checks.get("random_logit").own_metrics == ("ssim_positive", "ssim_negative")
    assert checks.get("data").step_models == {0: "trained", 1: "shuffled"} and checks.get("data").pair_label


# ---------------------------------------------------------------- the run directory


def test_run_json_is_read_in_one_place_with_the_readers_consequence(tmp_path, caplog):
    assert read_info(tmp_path) == {}
    with caplog.at_level(logging.WARNING, logger="sanity_cli"):
        assert models_of(tmp_path) == {}
    assert "run.json is missing; the models' accuracies are left out of summary.csv" in caplog.text
    (tmp_path / "run.json").write_text('{"settings": {"seed": 3}, "models": {"trained": {}}}')
    assert read_info(tmp_path)["settings"] == {"seed": 3} and models_of(tmp_path) == {"trained": {}}
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(SanityError, match=r"run.json is damaged \(not a run's record\), so the run's settings are "
                                          r"unknown; restore it from a copy"):
        read_info(tmp_path)
    (tmp_path / "run.json").write_text("{cut")
    with pytest.raises(SanityError, match=r"run.json is damaged \(JSONDecodeError\), so the run cannot be "
                                          r"collected; rerun it"):
        read_info(tmp_path, "so the run cannot be collected; rerun it")


def test_maps_are_read_in_their_units_and_drawn_from_the_stored_ones(tmp_path):
    maps = torch.randn(3, 2, 5, 5, dtype=torch.float64) * torch.tensor([1e-6, 1.0, 300.0]).view(-1, 1, 1, 1)
    stored, scales = compact(maps)
    meta = {"test": "cascade", "controls": ["edge"], "states": [{"key": "seed0_step0"}]}
    np.savez_compressed(tmp_path / "maps.npz", meta=np.array(json.dumps(meta)), images=np.zeros((3, 1, 5, 5)),
                        **{"seed0_step0/m": stored, "seed0_step0/m/scale": scales})
    with open_maps(tmp_path) as kept:
        assert kept.meta == meta and "seed0_step0/m" in kept and "seed0_step0/x" not in kept
        np.testing.assert_allclose(kept.maps("seed0_step0/m"), maps.numpy(), rtol=1e-3, atol=0)
        unit = kept.unit_maps("seed0_step0/m")
        assert unit.dtype == np.float16 and np.abs(unit).reshape(3, -1).max(axis=1).tolist() == [1.0] * 3
        assert kept.images.shape == (3, 1, 5, 5)
    assert read_meta(tmp_path) == meta
    with open_maps(tmp_path / "none") as absent:
        assert absent is None
    assert read_meta(tmp_path / "none") is None
