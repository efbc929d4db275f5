"""The run store: one owner per directory, nothing finished lost, damaged files read as
far as they go, and resume continuing only the same experiment. Runs are filled by hand
(no model), so every value is known."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from sanity_cli import rundir
from sanity_cli.errors import SanityError
from sanity_cli.models import PaperCNN
from sanity_cli.runfiles import check_maps, count_finished, read_results
from sanity_cli.runstore import RunStore, compact, settings_for_fingerprint, state_rows
from sanity_cli.summary import summarize

SETTINGS = {"test": {"name": "cascade"}, "seed": 0}
CONTEXT = {"test": "cascade", "model": "cnn", "dataset": "digits", "seed": 0, "init": "paper",
           "reset_bn_stats": False, "normalization": "paper"}
STATES, IMAGES = 4, 3
KEY = ["seed", "step", "method", "image", "metric"]


def value(step: int, image: int) -> float:
    return round(1.0 / (1 + step + 10 * image), 6)


def add(store: RunStore, step: int) -> None:
    scores = {"gradient": {"spearman": torch.tensor([value(step, i) for i in range(IMAGES)], dtype=torch.float64)}}
    labels = torch.zeros(IMAGES, dtype=torch.long)
    rows = state_rows(CONTEXT, step, f"block{step}", scores, torch.arange(IMAGES), labels, labels + 1)
    examples = {"gradient": torch.full((2, 1, 4, 4), float(step + 1))}
    store.add_state(0, step, f"block{step}", rows, examples, {"accuracy": 0.5, "weights": f"w{step}"})


def fill(run_dir, steps=range(STATES), settings=SETTINGS, resume=False) -> RunStore:
    """A run with the given states finished (those a resumed run has are skipped)."""
    store = RunStore(run_dir, settings, resume=resume)
    for step in steps:
        if not store.done(0, step):
            add(store, step)
    return store


def finish(store: RunStore) -> None:
    store.write_examples(torch.zeros(2, 1, 4, 4), {"methods": ["gradient"]})
    store.close()


def table(run_dir) -> pd.DataFrame:
    return read_results(run_dir).sort_values(KEY).reset_index(drop=True)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The rows of a run that was never interrupted."""
    run_dir = tmp_path_factory.mktemp("whole")
    finish(fill(run_dir))
    return table(run_dir)


def snapshot(run_dir) -> dict:
    return {p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}


def test_rows_states_and_receipts_as_written(tmp_path, whole):
    assert len(whole) == STATES * IMAGES
    assert whole["value"].tolist() == [value(s, i) for s in range(STATES) for i in range(IMAGES)]
    store = fill(tmp_path / "run", steps=range(2))
    states = pd.read_csv(tmp_path / "run" / "states.csv")
    assert states[["step", "block", "accuracy", "weights"]].values.tolist() == [[0, "block0", 0.5, "w0"],
                                                                                [1, "block1", 0.5, "w1"]]
    assert count_finished(tmp_path / "run") == 2
    store.close()


# --- one owner at a time ----------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from sanity_cli.runstore import RunStore
    store = RunStore(sys.argv[1], {})
    print("holding", flush=True)
    time.sleep(60)
""")
TAKE = "import sys; from sanity_cli.rundir import lock_run_dir; lock_run_dir(__import__('pathlib').Path(sys.argv[1]))"


def test_a_directory_in_use_is_refused_until_its_owner_ends(tmp_path):
    run_dir = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "holding"
        with pytest.raises(SanityError, match=rf"in use by another run \(process {owner.pid} on .*hydra.run.dir=PATH"):
            RunStore(run_dir, {})
    finally:
        owner.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
        owner.wait()
    fill(run_dir).close()
    assert count_finished(run_dir) == STATES


def test_the_same_process_may_take_its_directory_again(tmp_path):
    """The CLI holds the directory around the pipeline, whose store takes it again."""
    outer = rundir.lock_run_dir(tmp_path)
    store = fill(tmp_path, steps=[0])
    store.close()
    outer.release()
    probe = subprocess.run([sys.executable, "-c", TAKE, str(tmp_path)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr  # released by both: another process gets it


def test_a_refused_run_leaves_every_file_alone(tmp_path):
    finish(fill(tmp_path))
    before = snapshot(tmp_path)
    with pytest.raises(SanityError, match="already holds a run; add resume=true"):
        RunStore(tmp_path, SETTINGS)
    with pytest.raises(SanityError, match=r"other settings \(seed\)"):
        RunStore(tmp_path, {**SETTINGS, "seed": 1}, resume=True)
    with pytest.raises(SanityError, match=r"other settings \(seed, test.name\);"):  # every one, named
        RunStore(tmp_path, {"test": {"name": "independent"}, "seed": 1}, resume=True)
    assert snapshot(tmp_path) == before


def test_accepted_actions_run_only_for_an_accepted_run(tmp_path):
    finish(fill(tmp_path))
    lock, written = rundir.lock_run_dir(tmp_path), []
    lock.when_accepted(lambda: written.append("refused"))
    with pytest.raises(SanityError):
        RunStore(tmp_path, SETTINGS)
    lock.when_accepted(lambda: written.append("resumed"))
    RunStore(tmp_path, SETTINGS, resume=True).close()
    lock.release()
    assert written == ["refused", "resumed"]  # both at the accepted resume, none at the refusal


# --- the fingerprint of resume ----------------------------------------------------------------


def test_fingerprint_covers_checkpoint_contents_and_training_device(make_cfg, tmp_path):
    weights = tmp_path / "cnn.pt"
    torch.save(PaperCNN().state_dict(), weights)
    cfg = make_cfg([f"model.checkpoint={weights}"])
    first = settings_for_fingerprint(cfg, torch.device("cpu"))
    assert first["model"]["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert settings_for_fingerprint(cfg, torch.device("cuda")) == first  # given weights: any device
    torch.manual_seed(1)
    torch.save(PaperCNN().state_dict(), weights)  # the same path, other weights
    second = settings_for_fingerprint(cfg, torch.device("cpu"))
    assert second["model"]["checkpoint_sha256"] != first["model"]["checkpoint_sha256"]
    trained = make_cfg([])  # trained here: the device changes the weights
    assert settings_for_fingerprint(trained, torch.device("cpu"))["training_device"] == "cpu"
    assert settings_for_fingerprint(trained, torch.device("cuda"))["training_device"] == "cuda"
    assert not {"resume", "device", "max_batch", "data_dir", "cache_dir"} & set(first)
    with pytest.raises(SanityError, match="cannot read model.checkpoint"):
        settings_for_fingerprint(make_cfg([f"model.checkpoint={tmp_path / 'gone.pt'}"]), torch.device("cpu"))


def test_resume_refuses_a_rewritten_checkpoint(make_cfg, tmp_path):
    weights = tmp_path / "cnn.pt"
    torch.save(PaperCNN().state_dict(), weights)
    cfg = make_cfg([f"model.checkpoint={weights}"])
    fill(tmp_path / "run", steps=[0], settings=settings_for_fingerprint(cfg, torch.device("cpu"))).close()
    torch.manual_seed(1)
    torch.save(PaperCNN().state_dict(), weights)  # the same path, other weights
    with pytest.raises(SanityError, match=r"other settings \(model.checkpoint_sha256\)"):
        RunStore(tmp_path / "run", settings_for_fingerprint(cfg, torch.device("cpu")), resume=True)


# --- a run that died at any point, resumed --------------------------------------------------


def test_resume_after_a_cut_off_state_line(tmp_path, whole, caplog):
    fill(tmp_path, steps=range(3)).close()
    states = tmp_path / "states.csv"
    states.write_bytes(states.read_bytes()[:-9])  # the line of step 2 cut mid-way
    with caplog.at_level(logging.WARNING):
        store = fill(tmp_path, resume=True)
    assert "states.csv: line 4 is damaged" in caplog.text
    assert "3 rows of unfinished states (seed 0 step 2) left out; the resume computes them again" in caplog.text
    finish(store)
    pd.testing.assert_frame_equal(table(tmp_path), whole)
    assert pd.read_csv(states)["step"].tolist() == [0, 1, 2, 3]


def test_resume_after_a_garbled_row_computes_its_state_again(tmp_path, whole, caplog):
    fill(tmp_path, steps=range(3)).close()
    results = tmp_path / "results.csv"
    lines = results.read_bytes().split(b"\n")
    lines[5] = b"\xff\xfe garbage"  # a row of step 1 (lines: header, 3 of step 0, 3 of step 1, ...)
    results.write_bytes(b"\n".join(lines))
    with caplog.at_level(logging.WARNING):
        store = fill(tmp_path, resume=True)
    assert "1 garbled line (6) left out, lost from seed 0 step 1; the resume computes those states again" in caplog.text
    finish(store)
    pd.testing.assert_frame_equal(table(tmp_path), whole)


def test_resume_after_a_kill_between_the_first_writes(tmp_path, whole):
    store = RunStore(tmp_path / "early", SETTINGS)
    store._write_info()  # killed after run.json, before results.csv: nothing finished, a new run may start
    store.close()
    fill(tmp_path / "early").close()
    assert count_finished(tmp_path / "early") == STATES
    fill(tmp_path / "late", steps=range(2)).close()
    (tmp_path / "late" / "states.csv").unlink()  # no line says which rows are whole: none is trusted
    finish(fill(tmp_path / "late", resume=True))
    pd.testing.assert_frame_equal(table(tmp_path / "late"), whole)


@pytest.mark.parametrize("damage, words", [("missing", "is missing"),
                                           (b'{"fingerprint": ', r"is damaged \(JSONDecodeError\)"),
                                           (b"[1, 2]", r"is damaged \(not a run's record\)")])
def test_resume_without_a_readable_run_json_says_what_to_do(tmp_path, damage, words):
    fill(tmp_path, steps=[0]).close()
    info = tmp_path / "run.json"
    info.unlink() if damage == "missing" else info.write_bytes(damage)
    with pytest.raises(SanityError, match=f"{words}, so the run's settings cannot be checked; rerun into a new "
                                          "directory with hydra.run.dir=PATH") as caught:
        RunStore(tmp_path, SETTINGS, resume=True)
    assert "\n" not in str(caught.value)
    assert len(read_results(tmp_path)) == IMAGES  # figures still read the rows


def test_disk_full_while_logging_a_state_loses_nothing(tmp_path, whole, monkeypatch):
    store = fill(tmp_path, steps=range(2))
    real_fsync, calls = os.fsync, []

    def full_on_the_state_line(descriptor):
        calls.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        if calls[-1].endswith("states.csv"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(rundir.os, "fsync", full_on_the_state_line)
    size = (tmp_path / "states.csv").stat().st_size
    with pytest.raises(SanityError, match=r"cannot write .*states.csv \(No space left on device\); free some space"
                                          r".*resume=true"):
        add(store, 2)
    # the rows (results, then robustness) were on disk before the state's line was written
    assert calls[-3].endswith("results.csv") and calls[-2].endswith("robustness.csv")
    assert (tmp_path / "states.csv").stat().st_size == size  # no half line left behind
    monkeypatch.undo()
    store.close()
    finish(fill(tmp_path, resume=True))
    pd.testing.assert_frame_equal(table(tmp_path), whole)


def test_a_resume_cut_off_while_rewriting_keeps_the_old_files(tmp_path, monkeypatch):
    fill(tmp_path, steps=range(2)).close()
    with open(tmp_path / "results.csv", "ab") as handle:
        handle.write(b"cascade,cnn,digits,gradient,0,2")  # a row cut off: the resume rewrites the file
    before = (tmp_path / "results.csv").read_bytes()

    def killed(*args):
        raise OSError(errno.EIO, "killed before the rename")

    monkeypatch.setattr(rundir.os, "replace", killed)
    with pytest.raises(SanityError, match="cannot write"):
        RunStore(tmp_path, SETTINGS, resume=True)
    assert (tmp_path / "results.csv").read_bytes() == before


# --- damaged maps.npz ----------------------------------------------------------------------------


def test_a_damaged_maps_npz_is_named_and_the_rest_kept(tmp_path, caplog):
    finish(fill(tmp_path, steps=range(2)))
    maps = tmp_path / "maps.npz"
    maps.write_bytes(maps.read_bytes()[:100])
    with pytest.raises(SanityError, match=r"maps.npz is damaged .*the example maps are lost; move it away \(mv "):
        check_maps(tmp_path)
    with caplog.at_level(logging.WARNING):
        finish(fill(tmp_path, resume=True))  # states 2 and 3 are new; 0 and 1 were kept in the damaged file
    assert "the example maps of seed0_step0, seed0_step1 are lost" in caplog.text
    check_maps(tmp_path)
    with np.load(maps) as kept:
        meta = json.loads(str(kept["meta"][()]))
        assert [state["step"] for state in meta["states"]] == [2, 3]
        assert kept["seed0_step3/gradient"].max() == 1.0 and kept["seed0_step3/gradient/scale"][0] == 4.0


# --- reading a run back ------------------------------------------------------------------------


def test_read_results_keeps_only_rows_of_finished_states(tmp_path, whole, caplog):
    fill(tmp_path, steps=range(3)).close()
    states = tmp_path / "states.csv"
    states.write_bytes(b"\n".join(states.read_bytes().split(b"\n")[:3]) + b"\n")  # step 2 never logged
    with open(tmp_path / "results.csv", "ab") as handle:
        handle.write(b"cascade,cnn,digits,gradient,0,3,block3,0,0,1,spearman,0.")
    with caplog.at_level(logging.WARNING):
        rows = table(tmp_path)
    pd.testing.assert_frame_equal(rows, whole[whole["step"] < 2].reset_index(drop=True))
    assert "its last line (11) was cut off mid-write" in caplog.text
    assert "3 rows of unfinished states (seed 0 step 2) left out; continue the run with resume=true" in caplog.text
    states.unlink()  # a table without a log (e.g. merged runs): every whole row counts
    assert sorted(read_results(tmp_path)["step"].unique()) == [0, 1, 2]


def test_a_file_that_is_no_results_table_is_one_line(tmp_path):
    (tmp_path / "results.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(SanityError, match="results.csv is damaged: its first line is not the header"):
        read_results(tmp_path)


def test_summaries_count_a_repeated_row_once_and_refuse_mixed_runs(whole, caplog):
    with caplog.at_level(logging.WARNING):
        twice = summarize(pd.concat([whole, whole]))
    assert "the results repeat 12 rows; each is counted once" in caplog.text
    pd.testing.assert_frame_equal(twice, summarize(whole))
    assert (twice["n"] == IMAGES).all()
    other = whole.assign(value=whole["value"] + 1.0)
    with pytest.raises(SanityError, match=r"12 images scored twice with different values .*rows of two runs are mixed"):
        summarize(pd.concat([whole, other]))


def test_a_kept_map_with_an_infinite_value_keeps_its_finite_values():
    """An overflowing map is scaled by 1, not by the largest float, which would zero the rest."""
    maps = torch.tensor([[[[0.5, float("inf"), -0.25, 0.0]]]])
    kept, scale = compact(maps)
    assert scale.tolist() == [1.0]
    restored = kept.astype(np.float32) * scale.reshape(-1, 1, 1, 1)
    assert restored[0, 0, 0].tolist() == [0.5, float("inf"), -0.25, 0.0]
