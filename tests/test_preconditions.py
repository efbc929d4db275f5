"""Each check's preconditions: a verdict whose precondition fails is `not valid`, never
pass or fail, with the reason in its note; every warning of a run reaches run.json."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from sanity_cli import checks
from sanity_cli.checks.base import Evidence, above_chance
from small_runs import Runs

PAPER_SUBSET = "method=[gradient,guided_backprop,random]"


@pytest.fixture
def runs(make_cfg, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.getbasetemp() / "runs", make_cfg)


def verdicts(run) -> pd.DataFrame:
    table = pd.read_csv(run.dir / "verdict.csv")
    return table[table["decides"]]


def test_a_data_test_whose_shuffled_model_did_not_memorize_gives_no_pass_or_fail(runs):
    quick = runs("test=data", "test.shuffled_epochs=1", "test.shuffled_subset=100", PAPER_SUBSET)
    assert quick.info["models"]["shuffled"]["train_accuracy"] < 0.9
    table = verdicts(quick)
    methods = table[~table["is_control"]]
    assert (methods["verdict"] == "not valid").all() and set(methods["outcome"]) & {"pass", "fail"}
    assert methods["note"].str.startswith("not valid: the shuffled-label model reached train accuracy").all()
    assert (table.loc[table["is_control"], "verdict"] != "not valid").all()  # controls use no model
    assert any("not memorized" in line for line in quick.info["warnings"])  # the warning is in run.json


def test_a_data_test_whose_shuffled_model_memorized_is_judged(runs):
    longer = runs("test=data", "test.shuffled_epochs=80", "test.shuffled_subset=100", PAPER_SUBSET)
    assert longer.info["models"]["shuffled"]["train_accuracy"] >= 0.9
    assert not (verdicts(longer)["verdict"] == "not valid").any()


def test_random_weights_give_no_pass_or_fail(runs):
    run = runs("model=timm", "model.name=test_resnet", "model.pretrained=false", PAPER_SUBSET)
    assert run.info["models"]["trained"]["source"] == "random"
    table = verdicts(run)
    methods = table[~table["is_control"]]
    assert len(methods) and (methods["verdict"] == "not valid").all()
    assert methods["note"].str.contains("random weights").all()
    assert any("random weights" in line for line in run.info["warnings"])


def test_a_trained_model_is_judged_and_its_warnings_reach_run_json(runs):
    run = runs(PAPER_SUBSET)
    assert run.info["models"]["trained"]["source"] in ("trained", "cache")
    assert not (verdicts(run)["verdict"] == "not valid").any()
    assert run.info["warnings"] == run.warnings  # what the run logged as warnings, in order


def states(accuracy: float) -> pd.DataFrame:
    return pd.DataFrame({"seed": [0, 0], "step": [0, 1], "block": ["original", "fc"], "accuracy": [accuracy, 0.1],
                         "weights": ["a", "b"], "params_randomized": [0.0, 1.0], "tensors_left_trained": [3, 0]})


# P(X >= k) for X ~ Binomial(n, 1/classes), by hand: 3 of 8 at 0.1: 0.038; 2 of 8: 0.187;
# 9 of 20 at 0.5: 0.748; 15 of 20: 0.021; 1 of 32 at 0.1: 0.966
@pytest.mark.parametrize("hits, n, classes, holds", [(3, 8, 10, True), (2, 8, 10, False), (9, 20, 2, False),
                                                     (15, 20, 2, True), (1, 32, 10, False)])
def test_accuracy_above_chance_is_a_one_sided_binomial_test(hits, n, classes, holds):
    evidence = Evidence(models={"trained": {"outputs": classes}}, states=states(hits / n), images=n, level=0.95)
    condition = above_chance(evidence)
    assert condition.holds is holds
    if not holds:
        assert f"{hits} of the {n} explained images" in condition.reason


def test_without_labels_the_accuracy_is_not_checked():
    evidence = Evidence(models={"trained": {"outputs": 10}}, states=states(math.nan), images=8)
    assert above_chance(evidence).holds is None


def test_the_cascade_needs_every_tensor_randomized_at_its_last_state():
    left = states(1.0).assign(tensors_left_trained=[3, 2])
    found = {c.name: c for c in checks.get("cascade").preconditions(Evidence(states=left, images=8))}
    assert found["fully randomized"].holds is False and "2 parameter tensor(s)" in found["fully randomized"].reason
    found = {c.name: c for c in checks.get("cascade").preconditions(Evidence(states=states(1.0), images=8))}
    assert found["fully randomized"].holds is True
    independent = {c.name for c in checks.get("independent").preconditions(Evidence(states=left, images=8))}
    assert "fully randomized" not in independent  # each of its states leaves the other blocks trained on purpose
