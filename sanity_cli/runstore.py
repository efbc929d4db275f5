"""Writing a run directory so that nothing finished is ever lost or mixed (the files are
described in `sanity_cli.runfiles`, which reads them back).

`RunStore` owns one run directory from construction to `close()`: it appends each
state's rows, closes the state with its example maps and its line in states.csv (the
resume log), keeps run.json's record, and merges the example maps into maps.npz at the
end. `settings_for_fingerprint` says what makes two runs the same experiment (a resume
continues only that); `state_rows` turns one state's scores into results.csv's rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import weakref
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sanity_cli.errors import SanityError
from sanity_cli.rundir import append_rows, csv_text, lock_run_dir, replace_atomically, writing
from sanity_cli.runfiles import (
    COLUMNS,
    INFO,
    MAPS,
    NEW_DIRECTORY,
    RECEIPT_COLUMNS,
    SCALE,
    STATE_COLUMNS,
    info_file,
    read_states,
    rows_of,
    scan_results,
    state_fields,
    state_key,
)

log = logging.getLogger(__name__)

# Settings that do not change a run's numbers: where things are kept, how they are batched,
# and the device of the run (a resumed run may change those; see settings_for_fingerprint).
NOT_RESULTS = ("resume", "device", "max_batch", "batch", "image_chunk", "reuse_activations", "data_dir", "cache_dir",
               "hydra")


def compact(maps: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(E, C, H, W) maps as float16 divided by each map's max |value|, and those (E,) scales.

    Half precision keeps maps.npz small; dividing first keeps it from overflowing
    (gradients of a randomized Inception v3 exceed float16's range).
    """
    values = maps.detach().float().cpu()
    scale = values.flatten(1).abs().amax(dim=1).nan_to_num(nan=1.0, posinf=1.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (values / scale.view(-1, 1, 1, 1)).numpy().astype(np.float16), scale.numpy()


def settings_for_fingerprint(cfg: DictConfig, device: torch.device) -> dict:
    """What determines a run's numbers, for `RunStore` to tell the same experiment from another.

    The config but NOT_RESULTS, plus what the config names without holding: the SHA-256
    of the contents of model.checkpoint (a file rewritten in place gives other weights),
    and, where the models are trained here, the device they are trained on (GPU and CPU
    training give other weights). Explaining pretrained weights on another device changes
    the numbers only within float error, so a run may be resumed there.
    """
    from sanity_cli.models import TRAINABLE_KINDS

    values = OmegaConf.to_container(cfg, resolve=True)
    settings = {key: value for key, value in values.items() if key not in NOT_RESULTS}
    checkpoint = OmegaConf.select(cfg, "model.checkpoint")
    if checkpoint:
        settings["model"]["checkpoint_sha256"] = file_sha256(Path(str(checkpoint)).expanduser())
    elif OmegaConf.select(cfg, "model.kind") in TRAINABLE_KINDS:
        settings["training_device"] = device.type
    return settings


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's contents, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for piece in iter(lambda: handle.read(1 << 20), b""):
                digest.update(piece)
    except OSError as error:
        raise SanityError(f"cannot read model.checkpoint {path} ({error.strerror or error}); "
                          "pass model.checkpoint=PATH to a weights file") from None
    return digest.hexdigest()


class RunStore:
    """The files of one run directory; `resume=True` continues an interrupted run.

    The directory is this process's from construction to `close()` (a second run or
    resume of it is refused); a refused run writes nothing into it.
    """

    def __init__(self, run_dir: str | Path, settings: dict, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.results, self.states, self.info = (self.run_dir / name for name in ("results.csv", "states.csv", INFO))
        self.robustness = self.run_dir / "robustness.csv"
        self.parts = self.run_dir / "maps"
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        self.info_values = {"fingerprint": fingerprint, "settings": settings}
        self.finished: set[tuple[int, int]] = set()
        self.lock = lock_run_dir(self.run_dir)
        self.close = weakref.finalize(self, self.lock.release)  # also when the store is dropped
        try:
            self.started = self._open(resume)
        except BaseException:
            self.close()
            raise
        self.lock.accepted()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, resume: bool) -> bool:
        """Whether the run goes on from finished states; refuses what must not be overwritten."""
        if not self.results.exists():
            return False  # the files appear with the first finished state, not for a run that fails before it
        if not resume:
            raise SanityError(f"{self.run_dir} already holds a run; add resume=true to continue it, "
                              "or choose another directory with hydra.run.dir=PATH")
        self._reopen()
        return True

    def _start(self) -> None:
        """Create the files; results.csv, which marks a started run, comes last."""
        if not self.started:
            self._write_info()
            replace_atomically(self.states, csv_text(STATE_COLUMNS + RECEIPT_COLUMNS, [], header=True).encode())
            replace_atomically(self.robustness, csv_text(COLUMNS, [], header=True).encode())
            replace_atomically(self.results, csv_text(COLUMNS, [], header=True).encode())
            self.started = True

    def _reopen(self) -> None:
        """Keep the finished states; drop the rows of a state that was cut off and any damage."""
        try:
            info = info_file(self.info)
        except SanityError as error:
            raise SanityError(f"{error}, so the run's settings cannot be checked; {NEW_DIRECTORY} "
                              "(its results.csv stays readable by `sanity figures`)") from None
        if info.get("fingerprint") != self.info_values["fingerprint"]:
            changed = _differences(info.get("settings", {}), self.info_values["settings"])
            raise SanityError(f"{self.run_dir} holds a run with other settings ({', '.join(changed) or 'unknown'});"
                              " resume it with the same overrides, or choose another directory with hydra.run.dir=PATH")
        self.info_values = {**info, **self.info_values}
        states, rows = state_fields(read_states(self.states)), scan_results(self.results)
        if rows.columns != COLUMNS:
            raise SanityError(f"{self.results} has other columns than this version of sanity writes; "
                              f"{NEW_DIRECTORY}")
        kept, incomplete = rows_of(rows, set(states), repair=True)
        self.finished = set(states) - incomplete
        kept = [line for line in kept if state_key(line[1]) in self.finished]
        columns = STATE_COLUMNS + RECEIPT_COLUMNS
        replace_atomically(self.states, csv_text(columns, [{c: states[s].get(c, "") for c in columns}
                                                           for s in sorted(self.finished)], header=True).encode())
        replace_atomically(self.results, rows.text(raw for _, _, raw in kept))
        self._keep_finished_robustness()

    def _keep_finished_robustness(self) -> None:
        """robustness.csv keeps the whole rows of finished states (a resume adds the others)."""
        if not self.robustness.exists():
            replace_atomically(self.robustness, csv_text(COLUMNS, [], header=True).encode())
            return
        rows = scan_results(self.robustness)
        if rows.columns != COLUMNS:
            raise SanityError(f"{self.robustness} has other columns than this version of sanity writes; "
                              f"{NEW_DIRECTORY}")
        kept = {raw: None for _, values, raw in rows.good if state_key(values) in self.finished}
        replace_atomically(self.robustness, rows.text(kept))

    def done(self, seed: int, step: int) -> bool:
        return (seed, step) in self.finished

    def add_state(self, seed: int, step: int, block: str, rows: list[dict], examples: Mapping[str, Tensor],
                  receipt: Mapping | None = None, robustness: list[dict] = ()) -> None:
        """Append one finished state whole: `add_rows`, then `finish_state`."""
        self.add_rows(rows, robustness)
        self.finish_state(seed, step, block, examples, receipt)

    def add_rows(self, rows: list[dict], robustness: list[dict] = ()) -> None:
        """Append rows of the state being scored (all of them or one chunk of its images), and
        the verdict's robustness rows, scored under every normalization. They count once
        `finish_state` has written the state's line; a run cut off before then drops them."""
        self._start()
        append_rows(self.results, COLUMNS, rows)
        append_rows(self.robustness, COLUMNS, robustness)

    def finish_state(self, seed: int, step: int, block: str, examples: Mapping[str, Tensor],
                     receipt: Mapping | None = None) -> None:
        """Close a state whose rows are all written: its example maps, then the resume log
        line with the state's receipt (RECEIPT_COLUMNS). Each is on disk before the next."""
        self._start()
        arrays = {}
        for name, maps in examples.items():
            arrays[name], arrays[f"{name}{SCALE}"] = compact(maps)
        part = self.parts / f"seed{seed}_step{step}.npz"
        with writing(part):
            self.parts.mkdir(exist_ok=True)
            np.savez_compressed(part.with_suffix(".partial.npz"), **arrays)
            part.with_suffix(".partial.npz").replace(part)
        append_rows(self.states, STATE_COLUMNS + RECEIPT_COLUMNS,
                    [{"seed": seed, "step": step, "block": block, **(receipt or {})}])
        self.finished.add((seed, step))

    def write_examples(self, images: Tensor, meta: dict) -> Path:
        """Merge the states' example maps into maps.npz: "meta" (JSON), "images" (E, C, H, W),
        one (E, C, H, W) array per "{state key}/{method}" and its (E,) scales (see `compact`).

        The per-state files are removed once merged; a state merged by an earlier
        (resumed) pass is read back from the previous maps.npz. Maps that a damaged file
        lost are named in a warning, and the states without maps are left out of "meta".
        """
        path = self.run_dir / MAPS
        scan = read_states(self.states)
        arrays, described, lost = {}, [], []
        with _open_maps(path) as merged:
            for state, fields in state_fields(scan).items():
                key = f"seed{state[0]}_step{state[1]}"
                found = _part_arrays(self.parts / f"{key}.npz") or _merged_arrays(merged, key)
                if found is None:
                    lost.append(key)
                    continue
                arrays.update({f"{key}/{name}": value for name, value in found.items()})
                described.append({"key": key, "seed": state[0], "step": state[1], "block": fields["block"]})
        if lost:
            log.warning("the example maps of %s are lost (damaged files); the figures of maps leave them out",
                        ", ".join(lost))
        partial = path.with_suffix(".partial.npz")
        with writing(path):
            np.savez_compressed(partial, meta=np.array(json.dumps({**meta, "states": described})),
                                images=images.float().cpu().numpy(), **arrays)
            partial.replace(path)
        shutil.rmtree(self.parts, ignore_errors=True)
        return path

    def record_models(self, accuracies: Mapping[str, tuple[float | None, float | None]],
                      details: Mapping[str, Mapping] | None = None) -> None:
        """Each model's accuracies, and `details` of it (where its weights came from, its
        outputs) that the verdict's preconditions read back."""
        details = details or {}
        self._update_info({"models": {name: {"train_accuracy": train, "test_accuracy": test,
                                             **details.get(name, {})}
                                      for name, (train, test) in accuracies.items()}})

    @contextlib.contextmanager
    def recording_warnings(self):
        """Keep every warning the package logs meanwhile (`record_warnings` writes them to
        run.json), so that a run's files say what the terminal said. Nested use keeps each once."""
        if getattr(self, "_warning_log", None) is not None:
            yield
            return
        self._warning_log = _WarningLog()
        logger = logging.getLogger("sanity_cli")
        logger.addHandler(self._warning_log)
        try:
            yield
        finally:
            logger.removeHandler(self._warning_log)
            self._warning_log = None

    def record_warnings(self) -> list[str]:
        """run.json's `warnings`: those of earlier sessions of a resumed run, then this one's, each once."""
        found = list(self.info_values.get("warnings") or [])
        if getattr(self, "_warning_log", None) is not None:
            found += [text for text in self._warning_log.texts if text not in found]
        self._update_info({"warnings": found})
        return found

    def record_states_expected(self, count: int) -> None:
        """How many states the finished run holds (for `sanity collect` to tell a finished run)."""
        self._update_info({"states_expected": int(count)})

    def record_timing(self, seconds: Mapping[str, float]) -> None:
        self._update_info({"timing_s": dict(seconds)})

    def _update_info(self, values: dict) -> None:
        self.info_values.update(values)
        if self.started:
            self._write_info()

    def _write_info(self) -> None:
        replace_atomically(self.info, json.dumps(self.info_values, indent=2, default=str).encode())


class _WarningLog(logging.Handler):
    """The text of every WARNING (or worse) record it sees."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


@contextlib.contextmanager
def _open_maps(path: Path):
    """The previous maps.npz, open, or {} when there is none or it cannot be read."""
    try:
        merged = np.load(path) if path.exists() else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        log.warning("%s is damaged (%s); the maps it kept are lost", path, error)
        merged = None
    with merged if merged is not None else contextlib.nullcontext({}) as opened:
        yield opened


def _part_arrays(part: Path) -> dict[str, np.ndarray] | None:
    """The arrays of one state's part file, None when there is none or it is damaged."""
    if not part.exists():
        return None
    try:
        with np.load(part) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        log.warning("%s is damaged (%s)", part, error)
        return None


def _merged_arrays(merged, key: str) -> dict[str, np.ndarray] | None:
    """A state's arrays from the previous maps.npz, None when it has none or they are damaged."""
    names = [name for name in merged if name.startswith(f"{key}/")]
    try:
        found = {name[len(key) + 1:]: merged[name] for name in names}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        log.warning("maps.npz: the maps of %s are damaged (%s)", key, error)
        return None
    return found or None


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

