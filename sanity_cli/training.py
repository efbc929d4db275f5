"""Training of the models that need it, with an on-disk cache.

The cache key is a hash of everything that determines the weights: architecture,
dataset, label permutation, seed and optimizer settings. A second run with the same
settings loads instead of training; any change to one of them trains anew.

The cache is shared by concurrent jobs (a sweep on one machine, or on a cluster's
shared disk): a lock file per entry makes the jobs that need one model train it
once, the others wait and load it. Entries appear by an atomic rename, so no job
reads a half-written file, and a job killed while training leaves only its partial
file, which no job trusts (the next one to hold the lock removes it). An entry that
cannot be used (unreadable, foreign, another architecture, non-finite) is reported
with its path and trained anew; a cache directory that cannot be written is
reported before training, and the run goes on without caching. A training that
diverges (non-finite loss or weights) is refused; a model whose train accuracy is
near chance is kept for the run with a warning, but never cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from sanity_cli.errors import SanityError
from sanity_cli.finite import bad_rows
from sanity_cli.rundir import plain_name

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when the meaning of cached weights changes
# A model is "near chance" when its train accuracy is less than this fraction of the way
# from always answering the most frequent class to a perfect score.
CHANCE_MARGIN = 0.1


@dataclass
class TrainedModel:
    """A model in eval mode with its accuracies and where its weights came from."""

    model: nn.Module
    train_accuracy: float | None
    test_accuracy: float | None
    source: str  # "trained", "cache", "checkpoint", "pretrained" or "random"
    cache_file: Path | None = None


def progress_disabled() -> bool:
    """SANITY_PROGRESS=0 turns the progress bars off (logs, CI)."""
    return os.environ.get("SANITY_PROGRESS", "1") == "0"


def cache_key(fields: dict) -> str:
    """A stable hash of the settings that determine a model's weights."""
    text = json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shuffled_labels(labels: Tensor, seed: int) -> Tensor:
    """One fixed, seeded permutation of the training labels."""
    generator = torch.Generator().manual_seed(seed)
    return labels[torch.randperm(len(labels), generator=generator)]


def fit(model: nn.Module, x: Tensor, y: Tensor, train_cfg, seed: int, device: torch.device,
        description: str = "training") -> None:
    """Train `model` in place on (N, C, H, W) images and labels, then put it in eval mode.

    SanityError as soon as an epoch's loss or the weights are not finite (diverged).
    """
    if train_cfg.optimizer != "adam":
        raise SanityError(f"unknown optimizer '{train_cfg.optimizer}'; choose: adam")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr)
    model.to(device).train()
    bar = tqdm(range(train_cfg.epochs), desc=description, unit="epoch", leave=False,
               disable=progress_disabled())
    for epoch in bar:
        order = torch.randperm(len(y), generator=generator)
        correct, total_loss = 0, 0.0
        for index, batch in enumerate(order.split(train_cfg.batch_size)):
            inputs, targets = x[batch].to(device), y[batch].to(device)
            logits = model(inputs)
            if epoch == 0 and index == 0:  # before any step: what is wrong is the model, not train.lr
                _refuse_nonfinite_start(logits, description)
            loss = nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += (logits.argmax(1) == targets).sum().item()
            total_loss += loss.item() * len(batch)
        accuracy = correct / len(y)
        bar.set_postfix(loss=f"{total_loss / len(y):.3f}", train_acc=f"{accuracy:.3f}")
        _refuse_divergence(model, total_loss / len(y), epoch, description, train_cfg.lr)
    model.eval()
    for parameter in model.parameters():
        parameter.grad = None


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` (in eval mode) on (N, C, H, W) images."""
    model.eval()
    correct = sum((model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / max(len(y), 1)


def _refuse_nonfinite_start(logits: Tensor, description: str) -> None:
    """SanityError when the untrained model's (B, K) logits of its first batch are not finite."""
    bad, kind = bad_rows(logits)
    if bad:
        raise SanityError(f"{description}: the model gives {kind} logits for {bad} of {len(logits)} images of its "
                          "first batch, before any training step (so not because of train.lr); check its forward")


def _refuse_divergence(model: nn.Module, loss: float, epoch: int, description: str, lr: float) -> None:
    bad = "loss" if not math.isfinite(loss) else next(
        (name for name, value in model.state_dict().items() if not torch.isfinite(value).all()), None)
    if bad:
        raise SanityError(f"{description} diverged: {bad} is not finite after epoch {epoch + 1} (train.lr={lr}); "
                          "lower train.lr")


def train_or_load(build, key_fields: dict, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                  train_cfg, seed: int, cache_dir: str | Path, device: torch.device) -> TrainedModel:
    """Load the model that `key_fields` determine from the cache, or train and cache it.

    `build()` returns a freshly initialized model; it is called under the run's seed
    so that the initial weights are part of what the key determines. Concurrent
    callers with the same key train once (see the module's docstring).
    """
    fields = {**key_fields, "seed": seed, "train": _train_fields(train_cfg)}
    name = plain_name(key_fields.get("model", "model"), "model.name")  # the entry stays inside cache_dir
    cache = ModelCache(Path(cache_dir).expanduser(), f"{name}-{cache_key(fields)}",
                       json.dumps(fields, default=str))
    torch.manual_seed(seed)
    model = build()
    with cache.locked():
        saved = cache.load(model)
        if saved is not None:
            log.info("loaded cached model %s", cache.file)
            return TrainedModel(model.to(device).eval(), saved["train_accuracy"], saved["test_accuracy"],
                                "cache", cache.file)
        trained = _train(model, key_fields, train_x, train_y, test_x, test_y, train_cfg, seed, device)
        if near_chance(trained.train_accuracy, train_y):
            log.warning("not caching the model: its train accuracy %.3f is near chance (%.3f); raise the epochs "
                        "or check the learning rate", trained.train_accuracy, majority_rate(train_y))
        elif cache.save(trained):
            trained.cache_file = cache.file
        return trained


def _train_fields(train) -> dict:
    """The training settings (`settings.TrainSettings`, or a config's `train` group) as a plain dict."""
    return dataclasses.asdict(train) if dataclasses.is_dataclass(train) else OmegaConf.to_container(train, resolve=True)


def _train(model: nn.Module, key_fields: dict, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
           train_cfg, seed: int, device: torch.device) -> TrainedModel:
    dataset = key_fields.get("dataset")
    dataset = dataset.get("name") if isinstance(dataset, dict) else dataset
    description = f"training {key_fields.get('model')} on {dataset} ({key_fields.get('labels')} labels)"
    log.info("%s: %d images, %d epochs", description, len(train_y), train_cfg.epochs)
    fit(model, train_x, train_y, train_cfg, seed, device, description)
    train_accuracy = evaluate(model, train_x, train_y, device)
    test_accuracy = evaluate(model, test_x, test_y, device)
    log.info("train accuracy %.4f, test accuracy %.4f", train_accuracy, test_accuracy)
    return TrainedModel(model, train_accuracy, test_accuracy, "trained")


def majority_rate(labels: Tensor) -> float:
    """The accuracy of always answering the most frequent label: chance for (N,) labels."""
    return torch.bincount(labels).max().item() / max(len(labels), 1)


def near_chance(accuracy: float, labels: Tensor) -> bool:
    """Whether `accuracy` on (N,) labels is within CHANCE_MARGIN of chance (see CHANCE_MARGIN)."""
    chance = majority_rate(labels)
    return accuracy < chance + CHANCE_MARGIN * (1 - chance)


class ModelCache:
    """One cache entry `directory/name.pt`, its lock `name.lock` and its writers' `name.PID.partial` files.

    `fields` is the JSON text of the settings the entry was trained with; an entry
    whose recorded fields differ (a foreign file under this name) is not used.
    """

    def __init__(self, directory: Path, name: str, fields: str):
        self.directory, self.name, self.fields = directory, name, fields
        self.file = directory / f"{name}.pt"
        self.unwritable = _unwritable(directory)
        if self.unwritable:
            log.warning("the model cache %s cannot be written (%s): a model trained now is not cached; set "
                        "cache_dir=PATH (or SANITY_CACHE_DIR) to a writable directory", directory, self.unwritable)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the entry's lock (waiting while another job trains it); without a
        writable directory there is nothing to guard."""
        if self.unwritable:
            yield
            return
        lock = FileLock(self.directory / f"{self.name}.lock")
        try:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("another job is training this model (it holds %s); waiting for it", lock.lock_file)
                lock.acquire()
        except (OSError, NotImplementedError) as error:  # a file system without locks
            log.warning("cannot lock %s (%s): concurrent jobs may train this model twice", lock.lock_file, error)
            yield
            return
        try:
            for stale in self.directory.glob(f"{self.name}.*.partial"):  # left by a killed job
                stale.unlink(missing_ok=True)
            yield
        finally:
            lock.release()

    def load(self, model: nn.Module) -> dict | None:
        """Load the entry into `model`; None when there is none or it cannot be used (reported)."""
        if not self.file.exists():
            return None
        saved, problem = _read_entry(self.file, self.fields, model)
        if problem:
            log.warning("ignoring the cached model %s: %s; training it anew", self.file, problem)
            return None
        model.load_state_dict(saved["state_dict"])
        return saved

    def save(self, trained: TrainedModel) -> bool:
        """Store a trained model; False (and a warning) when it cannot be written: the run keeps the model."""
        if self.unwritable:
            return False
        payload = {"state_dict": trained.model.state_dict(), "train_accuracy": trained.train_accuracy,
                   "test_accuracy": trained.test_accuracy, "fields": self.fields}
        try:
            _save_atomically(self.file, payload)
        except OSError as error:
            log.warning("could not cache the trained model in %s (%s); this run goes on with it", self.file, error)
            return False
        return True


def _unwritable(directory: Path) -> str | None:
    """Why no file can be created in `directory` (made if missing), or None. Tried, not
    inferred from permission bits, which do not bind root and miss read-only mounts."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def _read_entry(path: Path, fields: str, model: nn.Module) -> tuple[dict | None, str | None]:
    """(entry, None) when `path` holds a usable cache entry for `model`, else (None, why not)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - empty, truncated, foreign or pickled objects: all unusable
        first_line = next(iter(str(error).splitlines()), "")[:120]
        return None, f"it cannot be read ({type(error).__name__}: {first_line})"
    if not isinstance(saved, dict):
        return None, f"it holds a {type(saved).__name__}, not a cache entry"
    if not {"state_dict", "train_accuracy", "test_accuracy"} <= set(saved):
        return None, "it is a dict without a cache entry's state_dict and accuracies"
    if saved.get("fields") != fields:
        return None, "it was written for other settings"
    weights, expected = saved["state_dict"], model.state_dict()
    if not isinstance(weights, dict) or {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()} != {
            k: tuple(v.shape) for k, v in expected.items()}:
        return None, "it holds weights of another architecture"
    if not all(torch.is_tensor(v) and (not v.is_floating_point() or torch.isfinite(v).all()) for v in weights.values()):
        return None, "it holds non-finite weights"
    return saved, None


def _save_atomically(path: Path, payload: dict) -> None:
    """Write to a temporary file first so an interrupted save never leaves a broken cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        torch.save(payload, partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
