"""What a run keeps on disk, written so that nothing finished is ever lost.

run_dir/
  results.csv   one row per (seed, step, method, image, metric); a state's rows are
                appended and flushed as soon as the state is scored
  states.csv    one line per finished state, written after its rows: the resume log
  run.json      the settings that determine the results, the models' accuracies, timing
  maps/         each finished state's maps of the example images (.npz), merged into
  maps.npz      at the end of the run (maps/ is then removed), with the example images and a description;
                maps are float16 over their max |value|, with the scales beside them
                (read_maps gives them back as float32)
  summary.csv   mean, std, n and n_nan per (method, step, block, metric)
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sanity_cli.errors import SanityError

COLUMNS = ["test", "model", "dataset", "method", "seed", "step", "block", "image", "label", "target", "metric",
           "value", "init", "reset_bn_stats", "normalization"]
GROUP = ["test", "model", "dataset", "method", "seed", "step", "block", "metric"]
STATE_COLUMNS = ["seed", "step", "block"]
SCALE = "/scale"  # maps.npz: "{state}/{method}/scale" holds the (E,) scales of "{state}/{method}"


def compact(maps: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(E, C, H, W) maps as float16 divided by each map's max |value|, and those (E,) scales.

    Half precision keeps maps.npz small; dividing first keeps it from overflowing
    (gradients of a randomized Inception v3 exceed float16's range).
    """
    values = maps.detach().float().cpu()
    scale = values.flatten(1).abs().amax(dim=1).nan_to_num(nan=1.0, posinf=1.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (values / scale.view(-1, 1, 1, 1)).numpy().astype(np.float16), scale.numpy()


def read_maps(npz, key: str) -> np.ndarray:
    """The maps stored under `key` ("{state}/{method}") of an open maps.npz, as float32 (E, C, H, W)."""
    scale = npz[f"{key}{SCALE}"] if f"{key}{SCALE}" in npz else np.ones(len(npz[key]), dtype=np.float32)
    return npz[key].astype(np.float32) * scale.reshape(-1, 1, 1, 1)


class RunStore:
    """The files of one run directory; `resume=True` continues an interrupted run."""

    def __init__(self, run_dir: Path, settings: dict, resume: bool = False):
        self.run_dir = run_dir
        self.results, self.states, self.info = run_dir / "results.csv", run_dir / "states.csv", run_dir / "run.json"
        self.parts = run_dir / "maps"
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        if self.results.exists() and not resume:
            raise SanityError(f"{run_dir} already holds a run; add resume=true to continue it, "
                              "or choose another directory with hydra.run.dir=PATH")
        self.finished: set[tuple[int, int]] = set()
        self.info_values = {"fingerprint": fingerprint, "settings": settings}
        self.started = resume and self.results.exists()
        if self.started:
            self._reopen()
        # else: the files appear with the first finished state, not for a run that fails before it

    def _start(self) -> None:
        if not self.started:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_rows(self.results, COLUMNS, [], mode="w")
            _write_rows(self.states, STATE_COLUMNS, [], mode="w")
            self._write_info()
            self.started = True

    def _reopen(self) -> None:
        """Keep the finished states and drop rows of a state that was cut off mid-way."""
        info = json.loads(self.info.read_text()) if self.info.exists() else {}
        if info.get("fingerprint") != self.info_values["fingerprint"]:
            changed = _differences(info.get("settings", {}), self.info_values["settings"])
            raise SanityError(f"{self.run_dir} holds a run with other settings ({', '.join(changed) or 'unknown'});"
                              " resume it with the same overrides, or choose another directory with hydra.run.dir=PATH")
        self.info_values = {**info, **self.info_values}
        states = pd.read_csv(self.states)
        self.finished = set(zip(states["seed"].astype(int), states["step"].astype(int)))
        with open(self.results, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if self._finished_row(row)]
        _write_rows(self.results, COLUMNS, rows, mode="w")

    def _finished_row(self, row: dict) -> bool:
        """A complete row (every field present) of a finished state; cut-off lines are not."""
        if None in row or any(row.get(column) is None for column in COLUMNS):
            return False
        try:
            return (int(row["seed"]), int(row["step"])) in self.finished
        except ValueError:
            return False

    def done(self, seed: int, step: int) -> bool:
        return (seed, step) in self.finished

    def add_state(self, seed: int, step: int, block: str, rows: list[dict], examples: Mapping[str, Tensor]) -> None:
        """Append one finished state: its rows, its example maps, then the resume log line."""
        self._start()
        _write_rows(self.results, COLUMNS, rows)
        self.parts.mkdir(exist_ok=True)
        arrays = {}
        for name, maps in examples.items():
            arrays[name], arrays[f"{name}{SCALE}"] = compact(maps)
        np.savez_compressed(self.parts / f"seed{seed}_step{step}.npz", **arrays)
        _write_rows(self.states, STATE_COLUMNS, [{"seed": seed, "step": step, "block": block}])
        self.finished.add((seed, step))

    def write_examples(self, images: Tensor, meta: dict) -> Path:
        """Merge the states' example maps into maps.npz: "meta" (JSON), "images" (E, C, H, W),
        one (E, C, H, W) array per "{state key}/{method}" and its (E,) scales (see `compact`).

        The per-state files are removed once merged; a state merged by an earlier
        (resumed) pass is read back from the previous maps.npz.
        """
        path = self.run_dir / "maps.npz"
        states = pd.read_csv(self.states).drop_duplicates(["seed", "step"])
        arrays, described = {}, []
        with (np.load(path) if path.exists() else contextlib.nullcontext({})) as merged:
            for seed, step, block in states[STATE_COLUMNS].itertuples(index=False):
                key = f"seed{seed}_step{step}"
                part = self.parts / f"{key}.npz"
                if part.exists():
                    with np.load(part) as arrays_of_state:
                        arrays.update({f"{key}/{name}": arrays_of_state[name] for name in arrays_of_state.files})
                else:
                    arrays.update({name: merged[name] for name in merged if name.startswith(f"{key}/")})
                described.append({"key": key, "seed": int(seed), "step": int(step), "block": block})
            partial = path.with_suffix(".partial.npz")
            np.savez_compressed(partial, meta=np.array(json.dumps({**meta, "states": described})),
                                images=images.float().cpu().numpy(), **arrays)
        partial.replace(path)
        shutil.rmtree(self.parts, ignore_errors=True)
        return path

    def record_models(self, accuracies: Mapping[str, tuple[float | None, float | None]]) -> None:
        self._update_info({"models": {name: {"train_accuracy": train, "test_accuracy": test}
                                      for name, (train, test) in accuracies.items()}})

    def record_timing(self, seconds: Mapping[str, float]) -> None:
        self._update_info({"timing_s": dict(seconds)})

    @staticmethod
    def models_of(run_dir: Path) -> dict:
        info = run_dir / "run.json"
        return json.loads(info.read_text()).get("models", {}) if info.exists() else {}

    def _update_info(self, values: dict) -> None:
        self.info_values.update(values)
        if self.started:
            self._write_info()

    def _write_info(self) -> None:
        partial = self.info.with_suffix(".partial")
        partial.write_text(json.dumps(self.info_values, indent=2, default=str))
        partial.replace(self.info)


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested settings dicts."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _write_rows(path: Path, columns: list[str], rows: Iterable[Mapping], mode: str = "a") -> None:
    with open(path, mode, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)
        handle.flush()


def state_rows(context: Mapping, step: int, block: str, scores: Mapping[str, Mapping[str, Tensor]],
               images: Tensor, labels: Tensor, targets: Tensor) -> list[dict]:
    """Rows for one state. scores: method -> metric -> (B,) values; images: (B,) indices."""
    image_ids, label_ids, target_ids = images.tolist(), labels.tolist(), targets.tolist()
    rows = []
    for method, per_metric in scores.items():
        for metric, values in per_metric.items():
            for i, value in enumerate(values.tolist()):
                rows.append({**context, "method": method, "step": step, "block": block, "image": image_ids[i],
                             "label": label_ids[i], "target": target_ids[i], "metric": metric,
                             "value": value if math.isfinite(value) else float("nan")})
    return rows


def summarize(results: pd.DataFrame, models: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """Mean, std and count per (test, model, dataset, method, seed, step, block, metric).

    Undefined scores (NaN: a constant map has no rank correlation) are left out of
    mean and std and counted in `n_nan`. Step 0, the reference compared with itself,
    is its own row and never part of another step's average. The accuracies of the
    models (step 0: the trained model; step 1 of the data test: the shuffled-label
    one) are added as columns.
    """
    grouped = results.groupby(GROUP, sort=False, dropna=False)["value"]
    summary = grouped.agg(mean="mean", std="std", n="count").reset_index()
    summary["n_nan"] = grouped.apply(lambda v: int(v.isna().sum())).to_numpy()
    models = models or {}
    for column in ("train_accuracy", "test_accuracy"):
        by_step = {0: models.get("trained", {}).get(column)}
        if (summary["test"] == "data").any():
            by_step[1] = models.get("shuffled", {}).get(column)
        summary[column] = summary["step"].map(lambda step: by_step.get(step))
    return summary.sort_values(["test", "method", "metric", "seed", "step"], kind="stable").reset_index(drop=True)
