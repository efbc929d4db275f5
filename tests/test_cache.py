"""The model cache under concurrent jobs, killed jobs, damaged entries and unwritable directories.

The other job of the concurrency tests is this file run as a script (see `job_process`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout
from omegaconf import OmegaConf
from torch import nn

from sanity_cli import training
from sanity_cli.data import load_digits
from sanity_cli.training import TrainedModel, train_or_load


class Slow(nn.Module):
    """SLOW_BATCH_S seconds per training batch: a job that trains long enough to be caught at it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get("SLOW_BATCH_S", "0")) if self.training else 0)
        return x


def train_job(cache: Path) -> TrainedModel:
    """What each job asks for: a linear model on all digits, one epoch (29 batches)."""
    data = load_digits(28, 0.2, seed=0)
    cfg = OmegaConf.create({"epochs": 1, "batch_size": 50, "lr": 1e-2, "optimizer": "adam"})
    return train_or_load(lambda: nn.Sequential(Slow(), nn.Flatten(), nn.Linear(784, 10)),
                         {"model": "linear", "dataset": "digits"}, data.train_x, data.train_y, data.test_x,
                         data.test_y, cfg, 0, cache, torch.device("cpu"))


def weight_sum(trained: TrainedModel) -> float:
    return sum(p.double().sum().item() for p in trained.model.parameters())


def job_process(cache: Path) -> None:
    """The other job, run as `python tests/test_cache.py CACHE`; with HANG_IN_SAVE its save
    writes half a file and hangs there (a job about to be killed)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.environ.get("HANG_IN_SAVE"):
        def hang(payload, path):
            Path(path).write_bytes(b"PK half of a file")
            time.sleep(600)

        training.torch.save = hang
    trained = train_job(cache)
    print("source", trained.source, weight_sum(trained), flush=True)


def _start(cache: Path, **env) -> subprocess.Popen:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "SANITY_PROGRESS": "0", **env}
    return subprocess.Popen([sys.executable, __file__, str(cache)], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_until_training(job: subprocess.Popen, cache: Path) -> None:
    """Until `job` holds the lock of a cache entry (it is training that model)."""
    deadline = time.time() + 240
    while True:
        assert job.poll() is None and time.time() < deadline, "the job never started training"
        for lock in map(FileLock, cache.glob("*.lock")):
            try:
                lock.acquire(timeout=0)
            except Timeout:
                return
            lock.release()
        time.sleep(0.05)


def _result(job: subprocess.Popen) -> tuple[str, float, str]:
    output, _ = job.communicate(timeout=240)
    assert job.returncode == 0, output
    _, source, total = next(line for line in output.splitlines() if line.startswith("source")).split()
    return source, float(total), output


def test_two_jobs_that_need_one_model_train_it_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cache = tmp_path / "cache"
    other = _start(cache, SLOW_BATCH_S="0.2")  # about 6 s of training
    _wait_until_training(other, cache)
    here = train_job(cache)  # needs the same model meanwhile
    there, there_sum, _ = _result(other)
    assert (here.source, there) == ("cache", "trained")
    assert weight_sum(here) == there_sum  # the waiting job loaded the very weights the other trained
    assert "another job is training this model" in caplog.text
    assert "training linear on digits" not in caplog.text
    assert len(list(cache.glob("*.pt"))) == 1
    assert not list(cache.glob("*.partial"))


def test_a_job_killed_while_saving_leaves_nothing_trusted(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cache = tmp_path / "cache"
    job = _start(cache, HANG_IN_SAVE="1")
    deadline = time.time() + 240
    while not list(cache.glob("*.partial")):
        assert job.poll() is None and time.time() < deadline, "the job never started saving"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not list(cache.glob("*.pt"))  # the half-written file was never renamed into place
    assert train_job(cache).source == "trained"
    assert "waiting" not in caplog.text  # the lock died with its holder
    assert not list(cache.glob("*.partial"))  # the killed job's leftovers are removed
    assert train_job(cache).source == "cache"


def _linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def _train(cache: Path) -> TrainedModel:
    """A linear model on 300 digits, one epoch: train accuracy about 0.66 (chance 0.11), in 0.05 s."""
    data = load_digits(28, 0.2, seed=0)
    cfg = OmegaConf.create({"epochs": 1, "batch_size": 50, "lr": 1e-2, "optimizer": "adam"})
    return train_or_load(_linear, {"model": "linear", "dataset": "digits"}, data.train_x[:300], data.train_y[:300],
                         data.test_x[:50], data.test_y[:50], cfg, 0, cache, torch.device("cpu"))


def _nan_weights(path: Path) -> None:
    entry = torch.load(path, weights_only=True)
    entry["state_dict"]["1.bias"][0] = float("nan")
    torch.save(entry, path)


def _other_fields(path: Path) -> None:
    entry = torch.load(path, weights_only=True)
    entry["fields"] = json.dumps({"model": "linear", "seed": 1})
    torch.save(entry, path)


def _other_architecture(path: Path) -> None:
    entry = torch.load(path, weights_only=True)
    entry["state_dict"] = nn.Sequential(nn.Flatten(), nn.Linear(784, 20), nn.ReLU(), nn.Linear(20, 10)).state_dict()
    torch.save(entry, path)


DAMAGES = {
    "empty": (lambda p: p.write_bytes(b""), "it cannot be read"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "it cannot be read"),
    "foreign": (lambda p: p.write_text("not a model\n"), "it cannot be read"),
    "pickled object": (lambda p: torch.save(_linear(), p), "it cannot be read"),
    "not a dict": (lambda p: torch.save(torch.zeros(3), p), "it holds a Tensor, not a cache entry"),
    "dict without weights": (lambda p: torch.save({"weights": 1}, p),
                             "it is a dict without a cache entry's state_dict"),
    "other settings": (_other_fields, "it was written for other settings"),
    "other architecture": (_other_architecture, "it holds weights of another architecture"),
    "non-finite": (_nan_weights, "it holds non-finite weights"),
    "a directory": (lambda p: (p.unlink(), p.mkdir()), "it cannot be read"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_an_unusable_entry_is_reported_with_its_path_and_trained_anew(tmp_path, caplog, damage):
    first = _train(tmp_path)
    spoil, reason = DAMAGES[damage]
    spoil(first.cache_file)
    again = _train(tmp_path)
    assert f"ignoring the cached model {first.cache_file}: {reason}" in caplog.text
    assert again.source == "trained"
    if damage != "a directory":  # a directory cannot be replaced by a file: that run keeps its model uncached
        assert _train(tmp_path).source == "cache"  # the entry is whole again
    for trained, retrained in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(trained, retrained)  # the same seed trains the same weights


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_unwritable_cache_is_reported_before_training_and_the_run_goes_on(tmp_path, caplog, where):
    caplog.set_level(logging.INFO)
    (tmp_path / "file").write_text("x")
    cache = tmp_path / "file" if where == "a file" else tmp_path / "file" / "models"
    trained = _train(cache)
    assert trained.source == "trained" and trained.cache_file is None
    warning = caplog.text.index(f"the model cache {cache} cannot be written")
    assert warning < caplog.text.index("training linear on digits")


def test_a_save_that_fails_keeps_the_trained_model(tmp_path, caplog, monkeypatch):
    def disk_full(payload, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sanity_cli.training.torch.save", disk_full)
    trained = _train(tmp_path)
    assert trained.source == "trained" and trained.cache_file is None and trained.train_accuracy > 0.5
    assert "could not cache the trained model" in caplog.text and "No space left on device" in caplog.text
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.partial"))


if __name__ == "__main__":
    job_process(Path(sys.argv[1]))
