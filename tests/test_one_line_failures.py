"""Failures of the run directory that end in one line, not a traceback: maps.npz deleted,
cut short or holding Python objects; a run directory or file system that cannot be
written; a disk that fills while a chunked run writes its reference maps."""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from sanity_cli import cli

RUN = [*TINY, "method=gradient", "n_examples=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, _tiny_models) -> Path:
    """A finished TINY run (read-only for the tests: each copies it)."""
    root = tmp_path_factory.mktemp("one_line")
    cache = shutil.copytree(_tiny_models, root / "cache")
    done = _sanity("run", *RUN, f"cache_dir={cache}", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert done.returncode == 0, done.stderr
    return root / "run"


def _sanity(*args: str, cwd: Path, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sanity_cli.cli", *args], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=preexec, env={**os.environ, "SANITY_PROGRESS": "0"}, timeout=300)


def _copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _resume(run: Path, cache: Path) -> subprocess.CompletedProcess:
    return _sanity("run", *RUN, f"cache_dir={cache}", f"hydra.run.dir={run}", "resume=true", cwd=run.parent)


def _error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("sanity: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_resume_of_a_finished_run_whose_maps_npz_is_lost(finished, tmp_path, damage):
    """The sweep's case: IndexError in the map figures once every state's maps were lost."""
    run = _copy(finished, tmp_path)
    maps = run / "maps.npz"
    if damage == "deleted":
        maps.unlink()
    else:
        maps.write_bytes(maps.read_bytes()[:3000])
    before = (run / "results.csv").read_bytes()
    shutil.rmtree(run / "figures")
    done = _resume(run, finished.parent / "cache")
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr  # Hydra's log handler writes to stdout
    assert "the example maps of seed0_step0" in said and "are lost" in said, said
    assert (run / "results.csv").read_bytes() == before  # the results stay intact
    assert (run / "figures" / "cascade_curves.png").is_file()
    assert not list((run / "figures").glob("cascade_grid_*.png"))


@pytest.mark.parametrize("verb", ["figures", "report"])
@pytest.mark.parametrize("member", ["meta", "seed0_step1/gradient"])
def test_an_object_array_in_maps_npz_is_the_damaged_maps_line(finished, tmp_path, verb, member):
    run = _copy(finished, tmp_path)
    with np.load(run / "maps.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays[member] = np.array([{"payload": 1}, None], dtype=object)
    np.savez(run / "maps.npz", **arrays)
    line = _error_line(_sanity(verb, str(run), cwd=tmp_path))
    assert f"maps.npz is damaged ({member}.npy holds Python objects)" in line and "move it away" in line, line


def _read_only(monkeypatch, run: Path) -> None:
    """Opening any file under `run` for writing fails as it does in a read-only directory."""
    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and \
                str(Path(file).absolute()).startswith(str(run.absolute())):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


@pytest.mark.parametrize("verb", ["figures", "report"])
def test_a_run_directory_that_cannot_be_written_is_one_line(finished, tmp_path, monkeypatch, capsys, verb):
    run = _copy(finished, tmp_path)
    _read_only(monkeypatch, run)
    with caplog_silenced():
        assert cli.main([verb, str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("sanity: error:")]) == 1, err
    assert f"{run}" in err[-1] and "Permission denied" in err[-1] and "make the directory writable" in err[-1]
    assert f"sanity {verb} NEW_DIR" in err[-1], err[-1]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories: the check above simulates it")
@pytest.mark.parametrize("verb", ["figures", "report"])
def test_a_read_only_run_directory_is_one_line(finished, tmp_path, verb):
    run = _copy(finished, tmp_path)
    for path in (run, *run.rglob("*")):
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        line = _error_line(_sanity(verb, str(run), cwd=tmp_path))
    finally:
        for path in (run, *run.rglob("*")):
            path.chmod(path.stat().st_mode | 0o200)
    assert "make the directory writable" in line, line


def test_a_run_directory_on_a_read_only_file_system_is_refused_before_hydra_writes(finished, tmp_path, monkeypatch,
                                                                                   capsys):
    """Hydra opens its log in the run directory before the job starts: on a read-only file
    system (where access(W_OK) fails even for root) that was a traceback."""
    run = _copy(finished, tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if Path(path) == run and mode == os.W_OK
                        else real_access(path, mode, *a, **k))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert cli.main(["run", *RUN, f"hydra.run.dir={run}", "resume=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be written" in err and "read-only" in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def _disk_full_at(size: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_full_disk_while_a_chunked_run_writes_its_reference_maps(finished, tmp_path):
    """image_chunk=2: step 0's maps wait on disk; a file that cannot grow (here a file size
    limit, as a full disk does) was torch's `enforce fail at inline_container.cc`."""
    run = tmp_path / "run"
    done = _sanity("run", *RUN, "image_chunk=2", f"cache_dir={finished.parent / 'cache'}", f"hydra.run.dir={run}",
                   cwd=tmp_path, preexec=_disk_full_at(4096))
    line = _error_line(done)
    assert f"cannot write {run / '.reference' / '0_0.pt'}" in line and "resume=true" in line, line


class caplog_silenced:
    """Keep the CLI's logging.basicConfig from reaching pytest's handlers twice."""

    def __enter__(self):
        self.level = logging.getLogger().level
        return self

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)
