"""verdict_table on synthetic results with known answers; the bootstrap against scipy;
robustness_scores against compare(); the verdict settings and write_verdicts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from sanity_cli.bootstrap import bootstrap_interval
from sanity_cli.errors import SanityError
from sanity_cli.judging import VerdictSettings, judge, verdict_table
from sanity_cli.metrics import NORMALIZATIONS, compare
from sanity_cli.robustness import robustness_scores
from sanity_cli.runfiles import COLUMNS
from sanity_cli.validation import validate
from sanity_cli.verdict import parse_verdict_arguments, write_verdicts


def results(values_by_method: dict, *, test: str = "cascade", metric: str = "spearman_abs", steps: int = 2,
            seeds=(0,), blocks=None) -> pd.DataFrame:
    """A results table: step 0 (1.0 everywhere) and `steps` randomized steps; the last
    step (or, with `blocks`, every step) holds the given values. values_by_method:
    method -> list of values (one seed) or {seed: list} (several seeds) or
    {step: list} (with blocks)."""
    rows = []
    blocks = blocks or [f"block{k}" for k in range(1, steps + 1)]
    for method, spec in values_by_method.items():
        for seed in seeds:
            for step in range(0, len(blocks) + 1):
                if blocks and test == "independent":
                    values = spec.get(step, [0.9] * 4) if step else [1.0] * 4
                else:
                    last = spec[seed] if isinstance(spec, dict) else spec
                    values = last if step == len(blocks) else [1.0] * len(last) if step == 0 else [0.9] * len(last)
                for image, value in enumerate(values):
                    rows.append({"test": test, "model": "cnn", "dataset": "digits", "method": method, "seed": seed,
                                 "step": step, "block": "original" if step == 0 else blocks[step - 1],
                                 "image": image, "label": 0, "target": 0, "metric": metric, "value": value,
                                 "init": "paper", "reset_bn_stats": False, "normalization": "paper"})
    return pd.DataFrame(rows, columns=COLUMNS)


def spread(center: float, n: int = 40, width: float = 0.05, seed: int = 0) -> list[float]:
    return list(center + np.random.default_rng(seed).uniform(-width, width, n))


def row_of(table: pd.DataFrame, method: str, **where) -> pd.Series:
    rows = table[(table["method"] == method) & table["decides"]]
    for key, value in where.items():
        rows = rows[rows[key] == value]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_clearly_below_passes_clearly_above_fails_straddling_is_inconclusive():
    table = verdict_table(results({"low": spread(0.1), "high": spread(0.9), "mid": spread(0.5, width=0.3)}))
    assert row_of(table, "low")["verdict"] == "pass"
    assert row_of(table, "high")["verdict"] == "fail"
    mid = row_of(table, "mid")
    assert mid["verdict"] == "inconclusive" and mid["ci_low"] < 0.5 < mid["ci_high"]
    low = row_of(table, "low")
    assert low["ci_low"] < low["mean"] < low["ci_high"] < 0.5
    assert low["mean"] == pytest.approx(np.mean(spread(0.1)))
    assert (low["step"], low["block"], low["n"], low["n_nan"], low["change"]) == (2, "block2", 40, 0, "below")


def test_the_verdict_follows_the_threshold():
    values = {"m": spread(0.3)}
    assert row_of(verdict_table(results(values), threshold=0.5), "m")["verdict"] == "pass"
    assert row_of(verdict_table(results(values), threshold=0.1), "m")["verdict"] == "fail"
    assert row_of(verdict_table(results(values), threshold=0.3), "m")["verdict"] == "inconclusive"


def test_interval_of_two_values_is_exact():
    """Mean of a resample of {0, 1}: 0, 1/2 or 1 with probability 1/4, 1/2, 1/4,
    so the 95% percentile interval is [0, 1]; at 40% it is [1/2, 1/2]."""
    assert bootstrap_interval([np.array([0.0, 1.0])], level=0.95, resamples=4000, seed=0) == (0.0, 1.0)
    assert bootstrap_interval([np.array([0.0, 1.0])], level=0.4, resamples=4000, seed=0) == (0.5, 0.5)


def test_interval_matches_scipy_bootstrap():
    values = np.random.default_rng(3).normal(0.4, 0.2, 60)
    low, high = bootstrap_interval([values], level=0.9, resamples=20000, seed=1)
    reference = stats.bootstrap((values,), np.mean, confidence_level=0.9, n_resamples=20000, method="percentile",
                                random_state=2).confidence_interval
    width = reference.high - reference.low
    assert low == pytest.approx(reference.low, abs=0.03 * width)
    assert high == pytest.approx(reference.high, abs=0.03 * width)


def test_nans_are_left_out_and_counted():
    values = spread(0.1, n=20) + [math.nan] * 3
    row = row_of(verdict_table(results({"m": values})), "m")
    assert (row["n"], row["n_nan"]) == (20, 3)
    assert row["mean"] == pytest.approx(np.mean(spread(0.1, n=20)))
    assert row["verdict"] == "pass" and "3 of 23 values undefined" in row["note"]


def test_all_nan_is_undefined():
    row = row_of(verdict_table(results({"m": [math.nan] * 5})), "m")
    assert row["verdict"] == "undefined" and row["n"] == 0 and math.isnan(row["mean"])
    assert "every value is undefined (NaN): constant maps have no rank correlation" in row["note"]


def test_undefined_hog_says_the_maps_are_smaller_than_a_block():
    table = verdict_table(results({"m": [math.nan] * 5}, metric="hog"), metric="hog")
    assert "maps smaller than one HOG block" in row_of(table, "m")["note"]


def test_one_image_has_no_interval_and_is_not_valid():
    row = row_of(verdict_table(results({"m": [0.01]})), "m")
    assert row["outcome"] == "inconclusive" and math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
    assert row["verdict"] == "not valid" and row["note"].startswith("not valid: only 1 value")
    assert row["mean"] == pytest.approx(0.01)


def test_fewer_values_than_the_minimum_are_not_valid_however_clear():
    few = row_of(verdict_table(results({"m": spread(0.05, n=4, width=0.01)})), "m")
    assert (few["outcome"], few["verdict"]) == ("pass", "not valid") and "only 4 values" in few["note"]
    enough = row_of(verdict_table(results({"m": spread(0.05, n=5, width=0.01)})), "m")
    assert enough["verdict"] == "pass"


def test_few_images_are_noted():
    assert "only 5 values" in row_of(verdict_table(results({"m": spread(0.1, n=5)})), "m")["note"]
    assert "only" not in row_of(verdict_table(results({"m": spread(0.1, n=10)})), "m")["note"]


def test_several_seeds_weigh_each_seed_the_same_and_resample_seeds():
    """Seed means 0.1, 0.45, 0.8 with tiny noise within each: the pooled images would give a
    narrow interval; resampling seeds first gives one that contains the threshold."""
    per_seed = {0: spread(0.1, n=30, width=0.01), 1: spread(0.45, n=10, width=0.01, seed=1),
                2: spread(0.8, n=20, width=0.01, seed=2)}
    table = verdict_table(results({"m": per_seed}, seeds=(0, 1, 2)))
    row = row_of(table, "m")
    means = [np.mean(v) for v in per_seed.values()]
    assert row["mean"] == pytest.approx(np.mean(means))  # not the pooled mean of 60 images
    assert row["seed_std"] == pytest.approx(np.std(means, ddof=1))
    assert (row["n_seeds"], row["n"]) == (3, 60)
    assert row["ci_low"] < 0.3 and row["ci_high"] > 0.6 and row["verdict"] == "inconclusive"
    one_seed = row_of(verdict_table(results({"m": per_seed[0]})), "m")
    assert math.isnan(one_seed["seed_std"]) and one_seed["n_seeds"] == 1


def test_independent_gives_one_verdict_per_block():
    blocks = ["fc2", "fc1", "conv1"]
    values = {"m": {1: spread(0.05), 2: spread(0.95), 3: spread(0.5, width=0.3)}}
    table = verdict_table(results(values, test="independent", blocks=blocks))
    verdicts = {row["block"]: row["verdict"] for _, row in table[table["decides"]].iterrows()}
    assert verdicts == {"fc2": "pass", "fc1": "fail", "conv1": "inconclusive"}


def test_data_and_random_logit_decide_on_step_one():
    for test in ("data", "random_logit"):
        table = results({"m": spread(0.1)}, test=test, steps=1)
        row = row_of(verdict_table(table), "m")
        assert (row["step"], row["verdict"]) == (1, "pass")


def test_entropy_decides_by_a_rise_above_its_threshold():
    rise = pd.concat([results({"noisy": spread(0.4), "flat": spread(0.02, width=0.01), "mid": spread(0.1),
                               "random": spread(0.0, width=0.01)}, test="entropy", metric="entropy_rise"),
                      results({"noisy": spread(3.0)}, test="entropy", metric="entropy")])
    table = verdict_table(rise, rise_threshold=0.1, controls=["random"])
    assert "noise does not pass this check" in row_of(table, "random")["note"]  # unlike a similarity check
    assert row_of(table, "noisy")["verdict"] == "pass" and row_of(table, "noisy")["change"] == "above"
    assert row_of(table, "flat")["verdict"] == "fail"
    assert row_of(table, "mid")["verdict"] == "inconclusive"
    assert set(table["metric"]) == {"entropy_rise"}  # the raw entropy has no rule
    assert row_of(table, "noisy")["threshold"] == 0.1


def test_other_metrics_get_rows_and_only_the_chosen_one_decides():
    table = verdict_table(pd.concat([results({"m": spread(0.1)}), results({"m": spread(0.9)}, metric="ssim")]),
                          metric="ssim")
    assert table.set_index("metric")["decides"].to_dict() == {"spearman_abs": False, "ssim": True}
    assert row_of(table, "m")["verdict"] == "fail"


def test_a_metric_the_run_lacks_is_refused():
    with pytest.raises(SanityError, match="no 'hog' scores .*spearman_abs"):
        verdict_table(results({"m": spread(0.1)}), metric="hog")


def test_controls_are_marked_and_explained():
    table = verdict_table(results({"random": spread(0.0), "edge": [1.0] * 10, "gradient": spread(0.1)}),
                          controls=("random", "edge"))
    random, edge, gradient = (row_of(table, m) for m in ("random", "edge", "gradient"))
    assert random["is_control"] and random["verdict"] == "pass" and "passes trivially" in random["note"]
    assert edge["is_control"] and edge["verdict"] == "fail" and edge["ci_low"] == edge["ci_high"] == 1.0
    assert not gradient["is_control"] and gradient["note"] == ""


def test_uninformative_overrides_pass_but_not_for_controls():
    signal = pd.DataFrame({"method": ["noise", "gradient", "random", "random_reference"],
                           "informative": [False, True, False, False], "is_control": [False, False, True, True]})
    table = verdict_table(results({"noise": spread(0.0), "gradient": spread(0.1), "random": spread(0.0)}),
                          signal=signal)
    noise = row_of(table, "noise")
    assert (noise["outcome"], noise["verdict"]) == ("pass", "uninformative")
    assert "would say pass" in noise["note"]
    assert row_of(table, "gradient")["verdict"] == "pass"
    random = row_of(table, "random")
    assert random["is_control"] and random["verdict"] == "pass"  # controls are taken from signal.csv too


def test_signal_read_back_from_csv(tmp_path):
    pd.DataFrame({"method": ["noise"], "informative": [False], "is_control": [False]}).to_csv(tmp_path / "s.csv")
    table = verdict_table(results({"noise": spread(0.0)}), signal=pd.read_csv(tmp_path / "s.csv"))
    assert row_of(table, "noise")["verdict"] == "uninformative"


def robustness(outcomes: dict[tuple[str, str], float], method: str = "m") -> pd.DataFrame:
    """robustness.csv rows: (normalization, metric) -> the center of the last step's values."""
    parts = []
    for (scheme, metric), center in outcomes.items():
        part = results({method: spread(center)}, metric=metric)
        part["normalization"] = scheme
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def test_holds_in_counts_the_variants_with_the_same_outcome():
    variants = {(s, m): 0.1 for s in NORMALIZATIONS for m in ("spearman_abs", "spearman")}
    variants[("paper", "spearman")] = 0.9    # fail
    variants[("none", "spearman")] = 0.5     # inconclusive
    table = verdict_table(results({"m": spread(0.1)}), robustness=robustness(variants))
    assert row_of(table, "m")["holds_in"] == "6/8"
    assert table.loc[~table["decides"], "holds_in"].eq("").all()
    assert verdict_table(results({"m": spread(0.1)}))["holds_in"].eq("").all()


@pytest.mark.parametrize("single_channel", [True, False])
def test_robustness_scores_equal_compare(single_channel):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(3, 3, 32, 32, generator=generator) ** 3  # the 99th percentile clips ~10 pixels
    maps = reference + 0.8 * torch.randn(3, 3, 32, 32, generator=generator)
    scores = robustness_scores(reference, maps, single_channel=single_channel)
    assert set(scores) == set(NORMALIZATIONS)
    for scheme, per_metric in scores.items():
        expected = compare(reference, maps, ["spearman_abs", "spearman"], scheme, single_channel=single_channel)
        assert set(per_metric) == {"spearman_abs", "spearman"}
        for metric, values in per_metric.items():
            assert values.shape == (3,)
            torch.testing.assert_close(values, expected[metric])
    # A positive factor per map leaves the ranks alone: the rescaling schemes agree. The
    # paper's clipping of RGB maps at the 99th percentile ties the top 1% of pixels: a
    # difference, but a small one.
    torch.testing.assert_close(scores["none"]["spearman"], scores["second_moment"]["spearman"])
    torch.testing.assert_close(scores["none"]["spearman_abs"], scores["max_abs"]["spearman_abs"])
    if not single_channel:
        change = (scores["paper"]["spearman_abs"] - scores["none"]["spearman_abs"]).abs().max().item()
        assert 0 < change < 1e-3


@pytest.mark.parametrize("values, message", [
    ({"metric": "pearson"}, "unknown verdict metric 'pearson'"),
    ({"threshold": 1.5}, "verdict.threshold must be a number between -1 and 1, not 1.5"),
    ({"threshold": "high"}, "verdict.threshold must be a number"),
    ({"level": 1.0}, "verdict.level must be a number between 0 and 1"),
    ({"level": 0}, "verdict.level must be a number between 0 and 1"),
    ({"resamples": 0}, "verdict.resamples must be a whole number of at least 1"),
    ({"resamples": 10.5}, "verdict.resamples must be a whole number"),
    ({"rise_threshold": -2}, "verdict.rise_threshold must be a number at least -1"),
    ({"colour": 1}, "unknown setting verdict.colour"),
])
def test_bad_settings_are_refused_in_one_line(values, message):
    with pytest.raises(SanityError, match=message) as error:
        VerdictSettings.from_mapping(values)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("verdict.threshold=2", "verdict.threshold must be a number between -1 and 1"),
    ("verdict.level=1.5", "verdict.level must be"),
    ("verdict.resamples=0", "verdict.resamples must be"),
    ("verdict.metric=pearson", "unknown verdict metric"),
    ("verdict.metric=hog", r"verdict.metric=hog is not among metrics.names \[spearman_abs, ssim\]"),
    ("verdict.metric=ssim_positive", "exists only for test=random_logit"),
])
def test_config_validation_refuses_bad_verdict_settings(make_cfg, override, message):
    with pytest.raises(SanityError, match=message):
        validate(make_cfg([override, "metrics.names=[spearman_abs,ssim]"]))


def test_config_defaults_are_valid_and_the_entropy_test_decides_by_its_own(make_cfg):
    cfg = make_cfg()
    validate(cfg)
    assert VerdictSettings.from_mapping(dict(cfg.verdict)) == VerdictSettings()
    validate(make_cfg(["test=entropy", "verdict.metric=hog", "metrics.names=[ssim]"]))
    validate(make_cfg(["test=random_logit", "verdict.metric=ssim_positive"]))


def test_parse_overrides():
    assert parse_verdict_arguments(["verdict.threshold=0.3", "verdict.metric=ssim"]) == {
        "verdict": {"threshold": 0.3, "metric": "ssim"}}
    with pytest.raises(SanityError, match="only verdict settings"):
        parse_verdict_arguments(["threshold=0.3"])


def test_write_verdicts_reads_the_run_and_its_settings(tmp_path):
    table = results({"gradient": spread(0.3), "edge": [1.0] * 10})
    table.to_csv(tmp_path / "results.csv", index=False)
    settings = {"verdict": {"threshold": 0.2}, "method": {"gradient": {}, "edge": {}}}
    (tmp_path / "run.json").write_text(json.dumps({"settings": settings}))
    written = write_verdicts(tmp_path)
    assert row_of(written, "gradient")["verdict"] == "fail"  # run.json's threshold 0.2
    assert row_of(written, "edge")["is_control"]
    on_disk = pd.read_csv(tmp_path / "verdict.csv")
    assert list(on_disk.columns) == list(written.columns)
    assert on_disk.loc[on_disk["method"] == "gradient", "verdict"].item() == "fail"
    again = write_verdicts(tmp_path, {"verdict": {"threshold": 0.5}})
    assert row_of(again, "gradient")["verdict"] == "pass"


def test_write_verdicts_without_results_is_a_one_line_error(tmp_path):
    with pytest.raises(SanityError, match="has no results.csv"):
        write_verdicts(tmp_path)


def test_a_run_without_its_decisive_state_has_no_verdict_yet():
    started = results({"m": spread(0.1)})
    table = verdict_table(started[started["step"] == 0])
    assert table.empty and list(table.columns)[:4] == ["test", "model", "dataset", "method"]


def test_an_interval_end_at_the_threshold_within_monte_carlo_error_is_borderline():
    """The threshold placed just under the lower end of the interval: by the interval alone
    a fail, but another draw of the resamples could put the end either side."""
    values = spread(0.6, n=32, width=0.2)
    low, high = bootstrap_interval([np.array(values)], level=0.95, resamples=20000, seed=0)
    threshold = low - 1e-5
    row = row_of(verdict_table(results({"m": values}), threshold=threshold), "m")
    assert row["ci_low"] > threshold and judge(row["ci_low"], row["ci_high"], threshold, False, row["n"]) == "fail"
    assert (row["verdict"], row["borderline"]) == ("inconclusive", True) and "borderline" in row["note"]
    assert row["resamples"] == 20000 and 0 < row["mc_error"] < 0.01  # tried again with more resamples
    clear = row_of(verdict_table(results({"m": values}), threshold=high + 0.05), "m")
    assert (clear["verdict"], clear["borderline"], clear["resamples"]) == ("pass", False, 1000)


def test_more_resamples_settle_an_end_that_was_only_near_the_threshold_by_chance():
    values = spread(0.6, n=32, width=0.2)
    low, _ = bootstrap_interval([np.array(values)], level=0.95, resamples=1000, seed=0)
    row = row_of(verdict_table(results({"m": values}), threshold=low), "m")  # at 1000 resamples: on the end
    assert row["resamples"] > 1000
    assert row["borderline"] == (abs(row["ci_low"] - low) <= row["mc_error"])


def test_monte_carlo_error_matches_the_spread_of_interval_ends_over_bootstrap_draws():
    """monte_carlo_error is a 95% half-width: about 1.96 standard deviations of the end's
    value over independent draws of the resamples."""
    from sanity_cli.bootstrap import bootstrap_means, monte_carlo_error

    values = [np.random.default_rng(5).normal(0.5, 0.2, 40)]
    lows = [bootstrap_interval(values, level=0.95, resamples=500, seed=s)[0] for s in range(1, 301)]
    errors = np.array([monte_carlo_error(bootstrap_means(values, resamples=500, seed=s), 0.95)
                       for s in range(301, 331)])
    assert errors[:, 0].mean() == pytest.approx(1.96 * np.std(lows), rel=0.15)
    assert (errors > 0).all()
