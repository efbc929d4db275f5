"""Nothing lost, nothing mixed, one line for every bad input: the `sanity` command with
real processes started together, stopped, interrupted and signalled."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import sanity
from sanity_cli import cli
from sanity_cli.data import DatasetUnavailable
from sanity_cli.errors import SanityError

# The MLP on the digits: 4 blocks, so 5 states of 2 images x 1 method x 1 metric.
SMALL = ["device=cpu", "model=mlp", "train.epochs=1", "n_images=2", "n_examples=1", "method=[gradient]",
         "metrics.names=[spearman_abs]", "++test.seeds=1"]  # one randomization draw
ROWS = 5 * 2


@pytest.fixture(scope="module")
def env(tmp_path_factory, _tiny_models) -> dict:
    root = tmp_path_factory.mktemp("env")
    shutil.copytree(_tiny_models, root / "cache")  # the runs' MLP, trained already
    return {**os.environ, "SANITY_CACHE_DIR": str(root / "cache"), "SANITY_DATA_DIR": str(root / "data"),
            "SANITY_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}


def start(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """`sanity ARGS` in the background. Ctrl-C is restored to its default in the child, as
    in a terminal: a test session started in the background (`cmd &`, nohup) ignores
    SIGINT, its children inherit that, and Python then never raises KeyboardInterrupt."""
    return subprocess.Popen([sys.executable, "-m", "sanity_cli.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.02)


def states_done(run_dir: Path) -> int:
    states = run_dir / "states.csv"
    return len(states.read_text().splitlines()) - 1 if states.exists() else 0


def states_reached(run_dir: Path, count: int) -> Callable[[], bool]:
    """A condition for `wait_for`: the run has finished at least `count` states."""
    return lambda: states_done(run_dir) >= count


def snapshot(run_dir: Path) -> dict:
    return {p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("sanity:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.slow
def test_a_directory_is_one_runs_and_a_refused_run_touches_nothing(tmp_path, env):
    run_dir = tmp_path / "run"
    first = start(["run", *SMALL, f"hydra.run.dir={run_dir}"], tmp_path, env)
    wait_for(lambda: "process" in (run_dir / "run.lock").read_text() if (run_dir / "run.lock").exists() else False,
             first)
    first.send_signal(signal.SIGSTOP)  # holds the directory, accepted, before its first state
    try:
        second = sanity("run", *SMALL, "seed=5", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"is in use by another run (process {first.pid} on" in one_line(second.stderr)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = pd.read_csv(run_dir / "results.csv")
    assert len(rows) == ROWS and set(rows["seed"]) == {0} and not rows.duplicated().any()
    assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) == SMALL  # the first run's
    # a run started later into the finished directory is refused and changes nothing, .hydra/ included
    before = snapshot(run_dir)
    third = sanity("run", *SMALL, "seed=7", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert third.returncode == 2 and "already holds a run; add resume=true" in one_line(third.stderr)
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_runs_started_together_get_directories_of_their_own(tmp_path, env):
    """Two configs in the same second in one working directory: each keeps its own rows."""
    runs = [start(["run", *SMALL, f"seed={seed}"], tmp_path, {**env, "SANITY_CACHE_DIR": str(tmp_path / str(seed))})
            for seed in (1, 2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.communicate()
    directories = sorted((tmp_path / "outputs").glob("*/*"))
    assert len(directories) == 2
    seeds = []
    for run_dir in directories:
        rows = pd.read_csv(run_dir / "results.csv")
        assert len(rows) == ROWS and rows["seed"].nunique() == 1
        seeds.append(int(rows["seed"].iloc[0]))
        assert f"seed={seeds[-1]}" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert sorted(seeds) == [1, 2]


def continue_args(line: str) -> list[str]:
    """The arguments of the `sanity run ...` command that an interrupted run printed."""
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:2] == ["sanity", "run"] and command[-1] == "resume=true"
    return command[1:]


@pytest.mark.slow
def test_ctrl_c_and_sigterm_end_in_one_line_that_says_how_to_continue(tmp_path, env):
    run_dir = tmp_path / "run"
    args = ["run", *SMALL, f"hydra.run.dir={run_dir}"]
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        process = start(args, tmp_path, env)
        wait_for(states_reached(run_dir, 1 if signum == signal.SIGINT else 3), process)
        process.send_signal(signal.SIGSTOP)
        process.send_signal(signum)
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=120)
        assert process.returncode == code, err
        finished = states_done(run_dir)
        line = one_line(err)
        assert line.startswith(f"sanity: interrupted after {finished} state{'' if finished == 1 else 's'}; "
                               "continue with: sanity run ")
        args = continue_args(line)
        assert args == ["run", *SMALL, f'hydra.run.dir="{run_dir}"', "resume=true"]
    done = sanity(*args, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(run_dir / "results.csv")
    assert len(rows) == ROWS and not rows.duplicated(["step", "image", "metric"]).any()
    assert pd.read_csv(run_dir / "states.csv")["step"].tolist() == [0, 1, 2, 3, 4]


# --- bad input: one line, exit 2, before any work ----------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["+foo=1"], "unknown setting 'foo'; the settings are"),
    (["method=[]"], "no method selected"),
    (["seed=18446744073709551616"], "seed must be at most 4294967295"),
    (["test=data", "test.shuffled_subset=-5"], "test.shuffled_subset must be at least 1, not -5"),
    (["test=data", "test.shuffled_subset=half"], "test.shuffled_subset must be a whole number, not 'half'"),
    (["hydra.run.dir=/tmp/sanity-ü"], "write 'hydra.run.dir=\"/tmp/sanity-ü\"'"),
    (["dataset.path=/data/my photos (1)"], "Hydra reads this value only in quotes; "
                                           "write 'dataset.path=\"/data/my photos (1)\"'"),
])
def test_bad_settings_fail_in_one_line_before_any_directory(args, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "outputs").exists()


def test_a_run_directory_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["run", *SMALL, f"hydra.run.dir={tmp_path / 'file' / 'run'}"]) == 2
    assert cli.main(["run", "-m", *SMALL, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'file' / 'sweep'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"sanity: error: hydra.run.dir={tmp_path / 'file' / 'run'} cannot be created (Not a directory: "
                     f"{tmp_path / 'file' / 'run'}); choose another directory with hydra.run.dir=PATH",
                     f"sanity: error: hydra.sweep.dir={tmp_path / 'file' / 'sweep'} cannot be created (Not a "
                     f"directory: {tmp_path / 'file' / 'sweep'}); choose another directory with hydra.sweep.dir=PATH"]


def test_paper_stops_on_a_bad_override_and_skips_only_missing_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sanity_cli.paper._weights_cached", lambda name: False)

    def no_work(cfg, run_dir):
        raise AssertionError("an experiment started although an override is bad")

    monkeypatch.setattr("sanity_cli.pipeline.run", no_work)
    assert cli.main(["paper", "fig3", "n_images=abc", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "sanity: error: n_images must be a whole number, not 'abc'"
    assert not (tmp_path / "out").exists()  # refused before the first experiment
    assert cli.main(["paper", "fig2", "--out", str(tmp_path / "out")]) == 0  # the ImageNet weights are missing
    assert "fig3_cascade_inception           skipped" in capsys.readouterr().out


@pytest.mark.parametrize("error, code", [(DatasetUnavailable("cannot load MNIST; put its files in DIR"), 0),
                                         (SanityError("target=label but the dataset has no labels"), 2)])
def test_paper_skips_a_missing_dataset_and_stops_on_any_other_error(error, code, tmp_path, monkeypatch, capsys):
    def failing(cfg, run_dir):
        raise error

    monkeypatch.setattr("sanity_cli.pipeline.run", failing)
    assert cli.main(["paper", "fig5", "--out", str(tmp_path)]) == code
    captured = capsys.readouterr()
    assert str(error) in (captured.out if code == 0 else captured.err)
