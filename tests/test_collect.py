"""`sanity collect`: a real two-job joblib sweep merged, and each kind of run it must refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from filelock import FileLock

from conftest import sanity
from sanity_cli import cli
from sanity_cli.collect import collect, decisive_rows
from sanity_cli.errors import SanityError
from sanity_cli.summary import summarize

SWEEP = ["-m", "hydra/launcher=joblib", "target=predicted,original", "method=gradient", "n_images=4",
         "++test.seeds=1", "train.epochs=1", "device=cpu", "n_examples=1", "hydra.sweep.dir=sweep"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, _tiny_models) -> Path:
    """A finished two-job sweep run by joblib workers (read-only: tests copy what they change)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher",
                        reason="the joblib launcher is not installed: pip install 'sanity-cli[joblib]'")
    root = tmp_path_factory.mktemp("collect")
    shutil.copytree(_tiny_models, root / "cache")  # the jobs' model, trained already
    env = {"SANITY_CACHE_DIR": str(root / "cache"), "SANITY_DATA_DIR": str(root / "data")}
    done = sanity("run", *SWEEP, cwd=root, env=env)
    assert done.returncode == 0, done.stderr
    return root / "sweep"


@pytest.mark.slow
def test_collect_merges_a_joblib_sweep_with_the_swept_setting_as_a_column(sweep, tmp_path):
    done = sanity("collect", str(sweep), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"collected 2 runs (swept: target) into {tmp_path / 'out'}" in done.stdout
    jobs = [pd.read_csv(sweep / job / "results.csv") for job in ("0", "1")]
    merged = pd.read_csv(tmp_path / "out" / "results.csv")
    # "target" is also the explained class of each row, so the setting is the column cfg.target
    assert list(merged.columns) == ["cfg.target", *jobs[0].columns]
    assert merged["cfg.target"].tolist() == ["predicted"] * len(jobs[0]) + ["original"] * len(jobs[1])
    pd.testing.assert_frame_equal(merged.drop(columns="cfg.target"), pd.concat(jobs, ignore_index=True))
    assert len(merged) == 2 * 4 * 5 * 3  # jobs x images x states x metrics (no HOG on 28x28 maps)

    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    models = json.loads((sweep / "0" / "run.json").read_text())["models"]
    expected = summarize(jobs[1], models)
    got = summary[summary["cfg.target"] == "original"].drop(columns="cfg.target").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)

    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert runs["cfg.target"].tolist() == ["predicted", "original"] and runs["rows"].tolist() == [60, 60]
    assert runs["train_accuracy"].tolist() == [models["trained"]["train_accuracy"]] * 2
    verdict = pd.read_csv(tmp_path / "out" / "verdict.csv")
    assert set(verdict["cfg.target"]) == {"predicted", "original"} and set(verdict["method"]) == {"gradient"}
    for metric in ("spearman_abs", "ssim"):
        assert (tmp_path / "out" / "figures" / f"compare_cascade_{metric}.png").stat().st_size > 0
    pooled = pd.read_csv(tmp_path / "out" / "pooled.csv")
    gradient = pooled[pooled["decides"]].iloc[0]
    assert gradient["n_draws"] == 2 and gradient["runs_agree"].endswith("/2")  # one draw in each run
    assert "pooled: gradient" in done.stdout and (tmp_path / "out" / "report.html").is_file()


def test_figures_compare_the_last_step_of_each_run(sweep, tmp_path):
    collected = collect([sweep], tmp_path)
    decisive = decisive_rows(collected.results, collected.swept)
    assert set(decisive["step"]) == {4} and set(decisive["block"]) == {"conv1"}  # all blocks random
    assert len(decisive) == len(collected.results) // 5
    names = {path.name for path in collected.figures}
    assert names == {"compare_cascade_spearman_abs.png", "compare_cascade_spearman.png", "compare_cascade_ssim.png"}


def test_the_default_output_is_the_first_directorys_collected(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    assert collect([copy]).out == copy / "collected"
    assert (copy / "collected" / "results.csv").is_file()
    assert len(collect([copy]).runs) == 2  # its own output is not taken for a run


def _copy_job(sweep: Path, tmp_path: Path, job: str, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(sweep / job, target)
    return target


def _edit_settings(run: Path, **changes) -> None:
    info = json.loads((run / "run.json").read_text())
    info["settings"].update(changes)
    (run / "run.json").write_text(json.dumps(info))


def _refusal(dirs: list[Path], capsys) -> str:
    assert cli.main(["collect", *map(str, dirs), "--out", str(dirs[0].parent / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sanity: error: ") and err.count("\n") == 1
    return err


def test_runs_that_differ_in_an_unswept_setting_are_refused(sweep, tmp_path, capsys):
    a, b = _copy_job(sweep, tmp_path, "0", "a"), _copy_job(sweep, tmp_path, "1", "b")
    _edit_settings(b, n_images=8)
    err = _refusal([a, b], capsys)
    assert f"cannot merge {a} and {b}: they differ in n_images (4 vs 8), which no sweep varies" in err


def test_the_same_experiment_twice_is_refused(sweep, tmp_path, capsys):
    a, b = _copy_job(sweep, tmp_path, "0", "a"), _copy_job(sweep, tmp_path, "0", "b")
    assert f"{a} and {b} are the same experiment" in _refusal([a, b], capsys)


def test_unfinished_and_failed_runs_are_refused(sweep, tmp_path, capsys):
    no_summary = _copy_job(sweep, tmp_path, "0", "no_summary")
    (no_summary / "summary.csv").unlink()
    assert f"{no_summary} is unfinished (no summary yet)" in _refusal([no_summary], capsys)

    short = _copy_job(sweep, tmp_path, "0", "short")
    info = json.loads((short / "run.json").read_text())
    (short / "run.json").write_text(json.dumps({**info, "states_expected": 7}))
    assert f"{short} is unfinished: 5 of 7 states" in _refusal([short], capsys)

    running = _copy_job(sweep, tmp_path, "0", "running")
    with FileLock(running / "run.lock"):
        assert f"{running} is still running (its lock run.lock is held)" in _refusal([running], capsys)

    failed = _copy_job(sweep, tmp_path, "0", "failed")
    (failed / "run.json").unlink()
    (failed / "error.txt").write_text("unknown method 'x'\n")
    assert f"{failed} failed: unknown method 'x'" in _refusal([failed], capsys)

    started = _copy_job(sweep, tmp_path, "0", "started")
    (started / "run.json").unlink()
    assert f"{started} has no run.json" in _refusal([started], capsys)


def test_a_sweep_with_jobs_not_yet_started_is_refused(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    shutil.rmtree(copy / "1")  # a job still queued has no directory yet
    assert f"the sweep {copy} has 2 jobs but only 1 have started" in _refusal([copy], capsys)


def test_a_directory_without_runs_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert "holds no run (no run.json below it)" in _refusal([tmp_path / "empty"], capsys)
    assert cli.main(["collect"]) == 2 and "name at least one directory" in capsys.readouterr().err


def _split_into_shards(job: Path, tmp_path: Path, count: int) -> list[Path]:
    """The job's run cut into `count` shards by image, as `shard=K/N` runs write them."""
    results = pd.read_csv(job / "results.csv")
    images = list(dict.fromkeys(results["image"]))
    shards = []
    for index in range(count):
        shard = _copy_job(job.parent, tmp_path, job.name, f"shard{index}")
        part = images[index * len(images) // count:(index + 1) * len(images) // count]
        results[results["image"].isin(part)].to_csv(shard / "results.csv", index=False)
        _edit_settings(shard, shard=f"{index}/{count}")
        shards.append(shard)
    return shards


def test_shards_merge_back_into_the_whole_run(sweep, tmp_path):
    shards = _split_into_shards(sweep / "1", tmp_path, 2)
    collected = collect(list(reversed(shards)), tmp_path / "out")
    assert collected.swept == []
    pd.testing.assert_frame_equal(collected.results, pd.read_csv(sweep / "1" / "results.csv"))
    assert pd.read_csv(tmp_path / "out" / "runs.csv")["shard"].tolist() == ["0/2", "1/2"]


def test_missing_repeated_or_overlapping_shards_are_refused(sweep, tmp_path, capsys):
    shards = _split_into_shards(sweep / "1", tmp_path, 3)
    assert f"shard 1/3 of {tmp_path} is missing (2 of 3 found)" in _refusal([shards[0], shards[2]], capsys)
    _edit_settings(shards[2], shard="0/3")
    assert f"shard 0/3 appears twice: {shards[0]} and {shards[2]}" in _refusal(shards, capsys)
    _edit_settings(shards[2], shard="2/3")
    shutil.copy(shards[0] / "results.csv", shards[1] / "results.csv")
    assert "both explain image" in _refusal(shards, capsys)
    with pytest.raises(SanityError, match="split the images differently"):
        _edit_settings(shards[1], shard="1/2")
        collect(shards, tmp_path / "out")


def decisive_table(values: list[float], seed: int = 0) -> pd.DataFrame:
    """A cascade run's results: step 0 (1.0) and one randomized step holding `values`, one per image."""
    rows = [{"test": "cascade", "model": "cnn", "dataset": "digits", "method": "gradient", "seed": seed, "step": step,
             "block": "original" if step == 0 else "conv1", "image": image, "label": 0, "target": 0,
             "metric": "spearman_abs", "value": 1.0 if step == 0 else value, "init": "paper",
             "reset_bn_stats": False, "normalization": "paper"}
            for step in (0, 1) for image, value in enumerate(values)]
    return pd.DataFrame(rows)


def test_the_pooled_verdict_resamples_the_runs_draws_first(tmp_path):
    """Two runs of 8 images, each run's values constant (0.2 and 0.6), both seed 0. The
    draws are resampled first: a replicate's mean is 0.2, 0.4 or 0.6 with probability
    1/4, 1/2, 1/4, so the 95% interval is [0.2, 0.6] and the verdict inconclusive. Had the
    16 images been pooled as one sample, the interval would be about [0.3, 0.5]."""
    from sanity_cli.collect import FoundRun, pooled_verdicts
    from sanity_cli.judging import verdict_table

    tables = [decisive_table([0.2] * 8), decisive_table([0.6] * 8)]
    combos = [[FoundRun(tmp_path / name, {}, {}, {}, {}, None)] for name in ("a", "b")]
    per_run = pd.concat([verdict_table(t).assign(run=name) for t, name in zip(tables, "ab")], ignore_index=True)
    assert per_run.loc[per_run["decides"], "verdict"].tolist() == ["pass", "fail"]
    pooled = pooled_verdicts(combos, tables, per_run, [])
    row = pooled[pooled["decides"]].iloc[0]
    assert row["n_draws"] == 2 and row["n"] == 16
    assert row["mean"] == pytest.approx(0.4) and (row["ci_low"], row["ci_high"]) == pytest.approx((0.2, 0.6))
    assert row["verdict"] == "inconclusive" and row["runs_agree"] == "0/2" and row["draws_agree"] == "0/2"
    one_sample = verdict_table(decisive_table([0.2] * 8 + [0.6] * 8))
    assert one_sample.loc[one_sample["decides"], "ci_high"].item() < 0.55  # what seeds-last would give


def test_a_run_not_valid_makes_the_pooled_verdict_not_valid(tmp_path):
    from sanity_cli.collect import FoundRun, pooled_verdicts
    from sanity_cli.judging import verdict_table

    tables = [decisive_table([0.1, 0.12, 0.11, 0.13, 0.1, 0.12]), decisive_table([0.1, 0.12, 0.11])]
    combos = [[FoundRun(tmp_path / name, {}, {}, {}, {}, None)] for name in ("a", "b")]
    per_run = pd.concat([verdict_table(t).assign(run=name) for t, name in zip(tables, "ab")], ignore_index=True)
    row = pooled_verdicts(combos, tables, per_run, []).query("decides").iloc[0]
    assert row["verdict"] == "not valid" and row["note"].startswith("not valid in 1 of 2 runs (not valid: only 3")


@pytest.mark.slow
def test_a_setting_swept_over_lists_is_a_column_of_its_json_text(sweep, tmp_path):
    """test.seeds=[0] against test.seeds=[1]: the swept value is a list, collected as its JSON
    text (a table cell that can be grouped), not a crash in the grouping."""
    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    for job, seeds in (("0", [0]), ("1", [1])):
        info = json.loads((runs / job / "run.json").read_text())
        info["settings"]["target"] = "predicted"
        info["settings"]["test"]["seeds"] = seeds
        (runs / job / "run.json").write_text(json.dumps(info))
        (runs / job / ".hydra" / "overrides.yaml").write_text(f"- test.seeds=[{seeds[0]}]\n")
    collected = collect([runs], tmp_path / "out")
    merged = pd.read_csv(tmp_path / "out" / "results.csv")
    column = next(c for c in merged.columns if c.endswith("test.seeds"))
    assert set(merged[column]) == {"[0]", "[1]"} and collected is not None
