"""Training of the models that need it, with an on-disk cache.

The cache key is a hash of everything that determines the weights: architecture,
dataset, label permutation, seed and optimizer settings. A second run with the same
settings loads instead of training; any change to one of them trains anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from sanity_cli.errors import SanityError

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when the meaning of cached weights changes


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
    """Train `model` in place on (N, C, H, W) images and labels, then put it in eval mode."""
    if train_cfg.optimizer != "adam":
        raise SanityError(f"unknown optimizer '{train_cfg.optimizer}'; choose: adam")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr)
    model.to(device).train()
    bar = tqdm(range(train_cfg.epochs), desc=description, unit="epoch", leave=False,
               disable=progress_disabled())
    for _ in bar:
        order = torch.randperm(len(y), generator=generator)
        correct, total_loss = 0, 0.0
        for batch in order.split(train_cfg.batch_size):
            inputs, targets = x[batch].to(device), y[batch].to(device)
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += (logits.argmax(1) == targets).sum().item()
            total_loss += loss.item() * len(batch)
        accuracy = correct / len(y)
        bar.set_postfix(loss=f"{total_loss / len(y):.3f}", train_acc=f"{accuracy:.3f}")
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


def train_or_load(build, key_fields: dict, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                  train_cfg, seed: int, cache_dir: str | Path, device: torch.device) -> TrainedModel:
    """Load the model that `key_fields` determine from the cache, or train and cache it.

    `build()` returns a freshly initialized model; it is called under the run's seed
    so that the initial weights are part of what the key determines.
    """
    fields = {**key_fields, "seed": seed, "train": OmegaConf.to_container(train_cfg, resolve=True)}
    key = cache_key(fields)
    cache_file = Path(cache_dir).expanduser() / f"{key_fields.get('model', 'model')}-{key}.pt"
    torch.manual_seed(seed)
    model = build()
    if cache_file.is_file():
        saved = torch.load(cache_file, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        log.info("loaded cached model %s", cache_file)
        return TrainedModel(model.to(device).eval(), saved["train_accuracy"], saved["test_accuracy"],
                            "cache", cache_file)
    dataset = key_fields.get("dataset")
    dataset = dataset.get("name") if isinstance(dataset, dict) else dataset
    description = f"training {key_fields.get('model')} on {dataset} ({key_fields.get('labels')} labels)"
    log.info("%s: %d images, %d epochs", description, len(train_y), train_cfg.epochs)
    fit(model, train_x, train_y, train_cfg, seed, device, description)
    train_accuracy = evaluate(model, train_x, train_y, device)
    test_accuracy = evaluate(model, test_x, test_y, device)
    log.info("train accuracy %.4f, test accuracy %.4f", train_accuracy, test_accuracy)
    _save_atomically(cache_file, {"state_dict": model.state_dict(), "train_accuracy": train_accuracy,
                                  "test_accuracy": test_accuracy, "fields": json.dumps(fields, default=str)})
    return TrainedModel(model, train_accuracy, test_accuracy, "trained", cache_file)


def _save_atomically(path: Path, payload: dict) -> None:
    """Write to a temporary file first so an interrupted save never leaves a broken cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(payload, partial)
    partial.replace(path)
