"""Every reader of a run directory (figures, report, collect) reads its files the same way:
what it had to leave out of a cut-off or garbled table is named once, with the file's
path; a damaged run.json is one line; `collect` never writes over a run."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY
from sanity_cli import cli
from sanity_cli.collect import collect
from sanity_cli.errors import SanityError
from sanity_cli.figures import describe_run
from sanity_cli.runfiles import read_results, read_run_file
from small_runs import Runs


@pytest.fixture(scope="module")
def runs(make_cfg_module, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("run_files"), make_cfg_module, (*TINY, "method=[gradient]", "n_examples=1"))


@pytest.fixture(scope="module")
def make_cfg_module():
    from hydra import compose, initialize_config_dir

    from sanity_cli.cli import config_dir

    def make(overrides=()):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return make


def _copy(runs: Runs, tmp_path: Path, name: str = "run", *overrides: str) -> Path:
    """A private copy of a finished TINY run (seed 0 unless overridden)."""
    return Path(shutil.copytree(runs(*overrides).dir, tmp_path / name))


def _edit_rows(path: Path, column: str, value: str, rows: slice) -> None:
    lines = list(csv.reader(path.open()))
    at = lines[0].index(column)
    for line in lines[rows]:
        line[at] = value
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(lines)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_collect_names_a_results_csv_cut_off_mid_row(runs, tmp_path, caplog):
    run = _copy(runs, tmp_path)
    whole = len(read_results(run))
    data = (run / "results.csv").read_bytes()
    (run / "results.csv").write_bytes(data[:-10])  # the last row loses its end and its newline
    with caplog.at_level(logging.WARNING):
        merged = collect([run], tmp_path / "out")
    assert len(merged.results) == whole - 1
    said = [w for w in _warnings(caplog) if str(run / "results.csv") in w]
    assert said and "cut off" in said[0], _warnings(caplog)


def test_report_names_a_damaged_signal_csv_and_goes_on(runs, tmp_path, capsys, caplog):
    run = _copy(runs, tmp_path)
    whole = read_run_file(run / "signal.csv")
    with (run / "signal.csv").open("a") as handle:
        handle.write('gradient,"4\nrandom,4,0.1')  # a garbled line, then one cut off
    with caplog.at_level(logging.WARNING):
        assert cli.main(["report", str(run)]) == 0, capsys.readouterr().err
    said = [w for w in _warnings(caplog) if str(run / "signal.csv") in w]
    assert len(said) == 1 and "left out" in said[0], _warnings(caplog)
    pd.testing.assert_frame_equal(read_run_file(run / "signal.csv"), whole)


@pytest.mark.parametrize("column, value", [("value", "abc"), ("step", "one"), ("seed", "x1")])
def test_figures_leaves_out_text_in_a_number_column_and_says_so_once(runs, tmp_path, capsys, caplog, column,
                                                                      value):
    run = _copy(runs, tmp_path)
    _edit_rows(run / "results.csv", column, value, slice(20, 22))  # lines 21 and 22: rows of step 1
    with caplog.at_level(logging.WARNING):
        assert cli.main(["figures", str(run)]) == 0, capsys.readouterr().err
    said = [w for w in _warnings(caplog) if str(run / "results.csv") in w]
    assert len(said) == 1 and "2 garbled lines (21, 22)" in said[0], said
    verdict = pd.read_csv(run / "verdict.csv")
    assert set(verdict["verdict"]) <= {"pass", "fail", "inconclusive", "undefined", "not valid"} and len(verdict)


@pytest.mark.parametrize("verb", ["figures", "report"])
@pytest.mark.parametrize("content", ["{bad", "[1, 2]", ""])
def test_a_corrupt_run_json_is_one_line(runs, tmp_path, capsys, verb, content):
    run = _copy(runs, tmp_path)
    (run / "run.json").write_text(content)
    assert cli.main([verb, str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run.json is damaged" in err and "restore it" in err, err


def test_collect_refuses_to_write_over_an_input(runs, tmp_path, capsys):
    """The sweep's command `sanity collect A B --out A` replaced A's own tables."""
    a, b = _copy(runs, tmp_path, "A"), _copy(runs, tmp_path, "B", "seed=1")
    before = {name: (a / name).read_bytes() for name in ("results.csv", "summary.csv", "verdict.csv")}
    for out in (a, tmp_path / "B" / ".." / "A", Path(str(a) + "/")):
        assert cli.main(["collect", str(a), str(b), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "would be replaced" in err and "--out" in err, err
    other = _copy(runs, tmp_path, "C", "seed=2")  # a run that is not an input is not written over either
    assert cli.main(["collect", str(a), str(b), "--out", str(other)]) == 2
    assert "the directory of a run" in capsys.readouterr().err
    assert {name: (a / name).read_bytes() for name in before} == before
    assert cli.main(["collect", str(a), "--out", str(tmp_path / "merged")]) == 0
    assert len(pd.read_csv(tmp_path / "merged" / "results.csv")) == len(read_results(a))


@pytest.mark.parametrize("test", ["../../x", "/abs/x", "a\\b", "a\0b", ".."])
def test_figure_names_read_from_a_run_stay_inside_its_figures(test):
    """The figures' file names start with the test's name, read from summary.csv or maps.npz."""
    summary = pd.DataFrame({"test": [test], "model": ["cnn"], "dataset": ["digits"], "method": ["gradient"],
                            "seed": [0]})
    with pytest.raises(SanityError, match="cannot be part of a file name"):
        describe_run(summary, None)
    with pytest.raises(SanityError, match="cannot be part of a file name"):
        describe_run(None, {"test": test, "title": "t", "methods": ["gradient"], "states": [{"seed": 0}]})


def test_collect_into_a_file_or_an_unwritable_place_is_one_line(runs, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    before = (run / "maps.npz").read_bytes()
    for out in (run / "maps.npz", Path("/proc/no/such/dir")):
        assert cli.main(["collect", str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "cannot write " + str(out)[:8] in err and "--out DIR" in err, err
    assert (run / "maps.npz").read_bytes() == before
