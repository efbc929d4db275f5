"""The checks end to end through `pipeline.run`, with configs composed as the CLI does."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sanity_cli import pipeline
from sanity_cli.errors import SanityError
from sanity_cli.runstore import RunStore
from small_runs import quickly

FAST = ["n_images=4", "n_examples=2", "train.epochs=2", "device=cpu", "method=[gradient,guided_backprop,random]",
        "metrics.names=[spearman_abs,spearman,ssim]", "++test.seeds=1"]  # one randomization draw


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def run(make_cfg, cache, tmp_path):
    """pipeline.run without figures and report.html (small_runs.quickly)."""

    def run(overrides=(), name="run"):
        cfg = make_cfg([*FAST, f"cache_dir={cache}", f"data_dir={tmp_path / 'data'}", *overrides])
        with quickly():
            return pipeline.run(cfg, tmp_path / name)

    return run


def test_cascade_rows_policy_and_controls(run):
    result = run()
    rows = result.results
    assert set(rows["init"]) == {"paper"} and set(rows["normalization"]) == {"paper"}
    assert set(rows["reset_bn_stats"].astype(str)) == {"False"}
    assert (rows.loc[rows["step"] == 0, "value"] == 1.0).all()
    randomized = rows[rows["step"] > 0]
    # a new random map in every state: unrelated to the trained model's random map
    random_spearman = (randomized["method"] == "random") & (randomized["metric"] == "spearman")
    assert randomized.loc[random_spearman, "value"].abs().max() < 0.2
    summary = result.summary
    assert not summary[(summary["step"] > 0)]["mean"].eq(1.0).any()
    assert summary.loc[summary["step"] == 0, "train_accuracy"].notna().all()
    assert (result.run_dir / "maps.npz").is_file()


def test_several_seeds_and_independent(run):
    rows = run(["test=independent", "test.seeds=[0,1]"]).results
    assert set(rows["seed"]) == {0, 1} and set(rows["test"]) == {"independent"}
    assert (list(rows[rows["seed"] == 1].drop_duplicates("step")["block"])
            == ["original", "fc2", "fc1", "conv2", "conv1"])


def test_data_randomization_memorizes_shuffled_labels(run):
    result = run(["test=data", "test.shuffled_epochs=60", "test.shuffled_subset=200", "method=[gradient]",
                  "dataset.image_size=12"])
    summary = result.summary
    shuffled = summary[summary["step"] == 1].iloc[0]
    assert shuffled["block"] == "shuffled labels"
    assert shuffled["train_accuracy"] >= 0.9          # memorized its 200 random labels
    assert shuffled["test_accuracy"] < 0.25            # chance is 0.1 on ten classes
    assert summary[summary["step"] == 0].iloc[0]["test_accuracy"] > 0.8


def test_random_logit_explains_another_class_and_reports_both_signs(run):
    rows = run(["test=random_logit", "method=[gradient]"]).results
    first, second = (rows[(rows["step"] == s) & (rows["metric"] == "spearman")] for s in (0, 1))
    assert (first["target"].to_numpy() != second["target"].to_numpy()).all()
    assert {"ssim_positive", "ssim_negative"} <= set(rows["metric"])


def test_smooth_cascade_and_entropy(run):
    smooth = run(["test=smooth_cascade", "test.samples=2", "method=[gradient]"], name="smooth").results
    assert smooth["step"].max() == 4
    entropy = run(["test=entropy", "method=[gradient,random]"], name="entropy").results
    rise = entropy[entropy["metric"] == "entropy_rise"]
    assert (rise.loc[rise["step"] == 0, "value"] == 0).all()
    assert rise["step"].max() == 4 and rise["value"].notna().all()


def test_interrupted_run_resumes_to_the_same_csv(run, monkeypatch):
    whole = run(name="whole").results
    written = []
    original_finish = RunStore.finish_state

    def finish_then_die(self, *state):
        original_finish(self, *state)
        written.append(state)
        if len(written) == 2:
            with open(self.results, "a") as handle:  # a row of the next state, cut off mid-write
                handle.write("cascade,cnn,digits,gradient,0,2,fc1,1")
            raise KeyboardInterrupt

    monkeypatch.setattr(RunStore, "finish_state", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(name="cut")
    monkeypatch.setattr(RunStore, "finish_state", original_finish)
    resumed = run(["resume=true"], name="cut")
    key = ["seed", "step", "method", "image", "metric"]
    pd.testing.assert_frame_equal(resumed.results.sort_values(key).reset_index(drop=True),
                                  whole.sort_values(key).reset_index(drop=True))
    # resuming a finished run keeps every state's maps, merged from the previous maps.npz
    again = run(["resume=true"], name="cut")
    with np.load(again.run_dir / "maps.npz") as kept:
        steps = [state["step"] for state in json.loads(str(kept["meta"][()]))["states"]]
        assert sorted(steps) == [0, 1, 2, 3, 4] and "seed0_step4/gradient" in kept
    assert not (again.run_dir / "maps").exists()


def test_results_are_never_overwritten(run):
    run(name="same")
    with pytest.raises(SanityError, match="resume=true"):
        run(name="same")
    with pytest.raises(SanityError, match=r"other settings \(n_images\)"):
        run(["resume=true", "n_images=3"], name="same")
    run(["resume=true", "max_batch=2"], name="same")  # batching is not a setting of the results


def test_trained_weights_unchanged_after_a_run(make_cfg, cache, tmp_path, monkeypatch):
    """The very model object the run randomized holds its trained weights afterwards."""
    cfg = make_cfg([*FAST, f"cache_dir={cache}"])
    prepared = pipeline.prepare(cfg, torch.device("cpu"))
    model = prepared.models["trained"].model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(pipeline, "prepare", lambda *args: prepared)
    pipeline.run(cfg, tmp_path / "run")
    monkeypatch.undo()
    assert pipeline.prepare(cfg, torch.device("cpu")).models["trained"].source == "cache"
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_bad_settings_are_one_line_errors(run):
    for override, words in [("test.init=xavier", "unknown init"), ("metrics.normalization=l2", "normalization"),
                            ("target=logit", "unknown target"), ("method.random.seed=-1", "random")]:
        with pytest.raises(SanityError, match=words):
            run([override])


def test_target_choices(run):
    by_label = run(["target=label", "method=[gradient]"], name="label").results
    assert (by_label["target"] == by_label["label"]).all()
    original = run(["target=original", "method=[gradient]"], name="original").results
    first = original[original["step"] == 0].set_index(["image", "metric"])["target"]
    last = original[original["step"] == original["step"].max()].set_index(["image", "metric"])["target"]
    assert first.equals(last)  # the trained model's class, in every state


def test_a_run_that_fails_to_start_leaves_no_results(make_cfg, tmp_path):
    cfg = make_cfg([*FAST, "dataset=imagefolder", f"dataset.path={tmp_path / 'missing'}", "model=timm",
                    "model.pretrained=false"])
    with pytest.raises(SanityError, match="does not exist"):
        pipeline.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "results.csv").exists()


def test_kept_maps_survive_half_precision():
    import numpy as np

    from sanity_cli.runfiles import read_maps
    from sanity_cli.runstore import compact

    maps = torch.randn(3, 2, 5, 5, dtype=torch.float64) * torch.tensor([1e-9, 1.0, 1e9]).view(3, 1, 1, 1)
    maps[1] = 0.0
    values, scales = compact(maps)
    assert values.dtype == np.float16 and np.isfinite(values).all()
    npz = {"s/m": values, "s/m/scale": scales}
    np.testing.assert_allclose(read_maps(npz, "s/m"), maps.numpy(), rtol=1e-3, atol=0)


def test_signed_ssim_of_a_map_without_negative_values_is_undefined():
    from sanity_cli.checks.random_logit import signed_ssim
    from sanity_cli.metrics import compare

    paper = lambda a, b, **options: compare(a, b, normalization="paper", **options)  # noqa: E731
    positive = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    scores = signed_ssim(positive, positive.flip(-1), paper)
    assert scores["ssim_negative"].isnan().all() and scores["ssim_positive"].isfinite().all()
    signed = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    assert signed_ssim(signed, signed, paper)["ssim_negative"].eq(1.0).all()
    # a negative part on one side only is a difference, not a missing value
    one_sided = signed_ssim(positive, signed, paper)
    assert one_sided["ssim_negative"].isfinite().all() and (one_sided["ssim_negative"] < 1).all()


@pytest.mark.parametrize("chunks", [1, 2])
def test_a_states_reference_maps_are_ranked_once_per_method(run, monkeypatch, chunks):
    """Every state of the cascade compares its maps with step 0's: what compare_variants keeps
    of them (their ranks, SSIM terms) is computed once per method, seed and image chunk, not
    again in each state, also when step 0's maps wait on disk and are read back each state."""
    from sanity_cli import metrics

    ranked = []
    reference_values = metrics._reference_values
    monkeypatch.setattr(metrics, "_reference_values",
                        lambda maps, *args: ranked.append(maps.shape) or reference_values(maps, *args))
    rows = run([f"image_chunk={4 // chunks}"]).results
    states, methods = rows["step"].nunique(), rows["method"].nunique()
    assert states > 2 and methods == 3
    assert len(ranked) == methods * chunks, (len(ranked), states)
