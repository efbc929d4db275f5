"""What a run keeps on disk, written so that nothing finished is ever lost or mixed.

run_dir/
  run.lock      held by the one process that writes the run (see sanity_cli.rundir)
  results.csv   one row per (seed, step, method, image, metric); a state's rows are
                appended and synced to disk as soon as each chunk of its images is scored
  robustness.csv  the rows of results.csv's Spearman metrics again under every normalization, for the verdict
  states.csv    one line per finished state with its receipt, written after its rows: the resume log
  run.json      the settings that determine the results, the models' accuracies, timing
  maps/         each finished state's maps of the example images (.npz), merged into
  maps.npz      at the end of the run (maps/ is then removed), with the example images and a description;
                maps are float16 over their max |value|, with the scales beside them
                (read_maps gives them back as float32)
  summary.csv   mean, std, n and n_nan per (method, step, block, metric)

A row counts only once its state's line is in states.csv. Reading a run back
(`read_results`, a resume) trusts nothing else: lines cut off or garbled, and rows of
states that never finished, are left out with a warning that says what is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import shutil
import weakref
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sanity_cli.errors import SanityError
from sanity_cli.rundir import (Scan, append_rows, csv_text, lock_run_dir, replace_atomically, scan_csv,
                               writing)

log = logging.getLogger(__name__)

COLUMNS = ["test", "model", "dataset", "method", "seed", "step", "block", "image", "label", "target", "metric",
           "value", "init", "reset_bn_stats", "normalization"]
GROUP = ["test", "model", "dataset", "method", "seed", "step", "block", "metric"]
STATE_COLUMNS = ["seed", "step", "block"]
# The receipt of each state: the explained model's accuracy on the chosen images, a
# fingerprint of its weights, and how much of it was re-initialized.
RECEIPT_COLUMNS = ["accuracy", "weights", "params_randomized", "tensors_left_trained"]
SCALE = "/scale"  # maps.npz: "{state}/{method}/scale" holds the (E,) scales of "{state}/{method}"
# Settings that do not change a run's numbers: where things are kept, how they are batched,
# and the device of the run (a resumed run may change those; see settings_for_fingerprint).
NOT_RESULTS = ("resume", "device", "max_batch", "batch", "image_chunk", "reuse_activations", "data_dir", "cache_dir",
               "hydra")
NEW_DIRECTORY = "rerun into a new directory with hydra.run.dir=PATH"


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
        self.results, self.states, self.info = (self.run_dir / name for name in ("results.csv", "states.csv",
                                                                                 "run.json"))
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
            info = _read_info(self.info)
        except SanityError as error:
            raise SanityError(f"{error}, so the run's settings cannot be checked; {NEW_DIRECTORY} "
                              "(its results.csv stays readable by `sanity figures`)") from None
        if info.get("fingerprint") != self.info_values["fingerprint"]:
            changed = _differences(info.get("settings", {}), self.info_values["settings"])
            raise SanityError(f"{self.run_dir} holds a run with other settings ({', '.join(changed) or 'unknown'});"
                              " resume it with the same overrides, or choose another directory with hydra.run.dir=PATH")
        self.info_values = {**info, **self.info_values}
        states, rows = _state_fields(read_states(self.states)), _scan_results(self.results)
        if rows.columns != COLUMNS:
            raise SanityError(f"{self.results} has other columns than this version of sanity writes; "
                              f"{NEW_DIRECTORY}")
        kept, incomplete = _rows_of(rows, set(states), repair=True)
        self.finished = set(states) - incomplete
        kept = [line for line in kept if _state_key(line[1]) in self.finished]
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
        rows = _scan_results(self.robustness)
        if rows.columns != COLUMNS:
            raise SanityError(f"{self.robustness} has other columns than this version of sanity writes; "
                              f"{NEW_DIRECTORY}")
        kept = {raw: None for _, values, raw in rows.good if _state_key(values) in self.finished}
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
        path = self.run_dir / "maps.npz"
        scan = read_states(self.states)
        arrays, described, lost = {}, [], []
        with _open_maps(path) as merged:
            for state, fields in _state_fields(scan).items():
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

    @staticmethod
    def models_of(run_dir: Path) -> dict:
        """The models' accuracies that run.json holds; {} (with a warning) when it is damaged."""
        try:
            return _read_info(Path(run_dir) / "run.json").get("models", {})
        except SanityError as error:
            log.warning("%s; the models' accuracies are left out of summary.csv", error)
            return {}

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


def _read_info(path: Path) -> dict:
    """run.json as a dict; SanityError saying how it is missing or damaged."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SanityError(f"{path} is missing") from None
    except (OSError, ValueError) as error:
        raise SanityError(f"{path} is damaged ({type(error).__name__})") from None
    if not isinstance(info, dict):
        raise SanityError(f"{path} is damaged (not a run's record)")
    return info


_WARNED: set[str] = set()  # what the readers of run files have said in this process


def _warn_once(message: str, *args) -> None:
    """Log a reader's warning once per process: `sanity figures` reads results.csv for the
    summary, the verdict and the report, and its damage needs saying only once."""
    text = message % args
    if text not in _WARNED:
        _WARNED.add(text)
        log.warning(text)


def _whole_number(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _number(text: str) -> bool:
    try:
        float(text or "nan")
    except ValueError:
        return False
    return True


def _state_line(fields: dict[str, str]) -> bool:
    return _whole_number(fields["seed"]) and _whole_number(fields["step"])


def _result_line(fields: dict[str, str]) -> bool:
    return _state_line(fields) and _whole_number(fields["image"]) and _number(fields["value"])


def _scan_results(path: Path) -> Scan:
    return scan_csv(path, ["method", "seed", "step", "image", "metric", "value"], _result_line)


def read_states(path: Path) -> Scan | None:
    """states.csv scanned line by line (see rundir.Scan); None when there is no such file."""
    if not path.exists():
        return None
    scan = scan_csv(path, STATE_COLUMNS, _state_line)
    if scan.damaged or scan.cut_off:
        bad = [*scan.damaged, *([scan.cut_off] if scan.cut_off else [])]
        _warn_once("%s: line %s %s damaged; %s state%s counted as unfinished", path,
                    ", ".join(map(str, bad)), "is" if len(bad) == 1 else "are",
                    "that" if len(bad) == 1 else "those", "" if len(bad) == 1 else "s")
    return scan


def _state_key(fields: Mapping[str, str]) -> tuple[int, int]:
    return int(fields["seed"]), int(fields["step"])


def _state_fields(scan: Scan | None) -> dict[tuple[int, int], dict[str, str]]:
    """Each finished state's fields, the first line of a state repeated by an older run kept."""
    fields: dict[tuple[int, int], dict[str, str]] = {}
    for _, values, _ in scan.good if scan is not None else []:
        fields.setdefault(_state_key(values), values)
    return fields


def _rows_of(rows: Scan, finished: set[tuple[int, int]] | None, repair: bool,
             name: str | Path = "results.csv") -> tuple[list, set]:
    """The rows of finished states (all whole rows when `finished` is None), each once, and
    the finished states that damage left incomplete (to be computed again by a resume).

    Logs what is left out, naming the file `name`: garbled lines, a line cut off
    mid-write, rows of states that never finished, repeated rows.
    """
    if rows.cut_off:
        _warn_once("%s: its last line (%d) was cut off mid-write; left out", name, rows.cut_off)
    seen, kept, unfinished = set(), [], Counter()
    for line in rows.good:
        state = _state_key(line[1])
        if finished is not None and state not in finished:
            unfinished[state] += 1
        elif line[2] not in seen:
            seen.add(line[2])
            kept.append(line)
    if unfinished:
        _warn_once("%s: %d rows of unfinished states (%s) left out%s", name, sum(unfinished.values()),
                    ", ".join(f"seed {s} step {t}" for s, t in sorted(unfinished)),
                    "; the resume computes them again" if repair else "; continue the run with resume=true")
    repeated = len(rows.good) - len(kept) - sum(unfinished.values())
    if repeated:
        _warn_once("%s: %d rows repeat another row exactly; each is counted once", name, repeated)
    return kept, _incomplete(rows, kept, finished, repair, name)


def _incomplete(rows: Scan, kept: list, finished: set | None, repair: bool,
                name: str | Path = "results.csv") -> set[tuple[int, int]]:
    """Where garbled lines cost rows: the states with fewer rows than the fullest state."""
    if not rows.damaged:
        return set()
    counts = Counter({state: 0 for state in finished or ()})
    counts.update(_state_key(fields) for _, fields, _ in kept)
    short = {state for state, count in counts.items() if count < max(counts.values())}
    lines = ", ".join(map(str, rows.damaged[:5])) + (" ..." if len(rows.damaged) > 5 else "")
    _warn_once("%s: %d garbled line%s (%s) left out, lost from %s%s", name, len(rows.damaged),
                "" if len(rows.damaged) == 1 else "s", lines,
                ", ".join(f"seed {s} step {t}" for s, t in sorted(short)) or "states that cannot be told",
                "; the resume computes those states again" if repair and short else "")
    return short if repair else set()


def count_finished(run_dir: str | Path) -> int:
    """How many states the run in `run_dir` has finished (0 before its first)."""
    return len(_state_fields(read_states(Path(run_dir) / "states.csv")))


def read_results(run_dir: str | Path) -> pd.DataFrame:
    """results.csv as a table of the rows of finished states (those states.csv lists; all
    whole rows when a run has no states.csv), each row once.

    A damaged file is read as far as it can be: what is left out is named in a warning.
    SanityError when results.csv is missing or is not a results table at all.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "results.csv").is_file():
        raise SanityError(f"'{run_dir}' has no results.csv; give the directory of a run")
    return read_run_file(run_dir / "results.csv")


# The tables of a run directory that hold one row per scored image: read as results.csv is.
SCORED_TABLES = ("results.csv", "robustness.csv")
# The column that any other table of a run directory must have to be read at all.
REQUIRED = {"signal.csv": ["method"], "verdict.csv": ["method", "verdict"], "summary.csv": ["method", "step"],
            "states.csv": STATE_COLUMNS}


def read_run_file(path: str | Path) -> pd.DataFrame | None:
    """A CSV table of a run directory, read without trusting it; None when there is no such file.

    What every reader of a run directory (figures, report, collect, the verdict) uses.
    results.csv and robustness.csv: the whole rows of finished states (those states.csv
    lists; all whole rows without it), each once. Any other table (signal.csv, ...): its
    whole lines. What is left out (a line cut off mid-write, garbled lines, rows of
    unfinished states) is named in a warning that gives the file's path; a file whose
    header is unusable is a SanityError.
    """
    path = Path(path)
    if not path.is_file():
        return None
    if path.name in SCORED_TABLES:
        rows = _scan_results(path)
        states = read_states(path.parent / "states.csv")
        kept, _ = _rows_of(rows, set(_state_fields(states)) if states is not None else None, repair=False,
                           name=path)
        return pd.read_csv(io.BytesIO(rows.text(raw for _, _, raw in kept)))
    scan = scan_csv(path, REQUIRED.get(path.name, []), lambda fields: True)
    if not any(scan.columns):
        raise SanityError(f"{path} is damaged: its first line is not a header; move it away to go on without it")
    bad = [*scan.damaged, *([scan.cut_off] if scan.cut_off else [])]
    if bad:
        _warn_once("%s: line%s %s damaged (cut off mid-write or garbled); left out", path,
                    "" if len(bad) == 1 else "s", ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else ""))
    return pd.read_csv(io.BytesIO(scan.text(raw for _, _, raw in scan.good)))


def read_info(run_dir: str | Path) -> dict:
    """A run's run.json as a dict, {} when there is none; SanityError in one line when it is damaged."""
    path = Path(run_dir) / "run.json"
    if not path.exists():
        return {}
    try:
        return _read_info(path)
    except SanityError as error:
        raise SanityError(f"{error}, so the run's settings are unknown; restore it from a copy, or rerun into a "
                          "new directory with hydra.run.dir=PATH") from None


def check_maps(run_dir: str | Path) -> None:
    """SanityError naming maps.npz and the way on when the file is damaged."""
    path = Path(run_dir) / "maps.npz"
    if not path.exists():
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            meta = "meta.npy" in archive.namelist()
            bad = bad or _unreadable_array(archive)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        bad, meta = str(error), True
    if bad or not meta:
        raise SanityError(f"{path} is damaged ({bad or 'no description'}): the example maps are lost; move it "
                          f"away (mv {path} {path}.damaged) to draw the other figures, or rerun the run to keep "
                          "them again")


def _unreadable_array(archive: zipfile.ZipFile) -> str | None:
    """The first member of a maps.npz that is not a plain numeric or text array (an
    object array needs pickle, which is never loaded), judged from its header alone."""
    for name in archive.namelist():
        try:
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                _, _, dtype = read_header(member)
        except (ValueError, OSError, EOFError, zlib.error) as error:
            return f"{name}: {error}"
        if dtype.hasobject:
            return f"{name} holds Python objects"
    return None


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


def summarize(results: pd.DataFrame, models: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """Mean, std and count per (test, model, dataset, method, seed, step, block, metric).

    Undefined scores (NaN: a constant map has no rank correlation) are left out of
    mean and std and counted in `n_nan`. Step 0, the reference compared with itself,
    is its own row and never part of another step's average. The accuracies of the
    models (step 0: the trained model; step 1 of the data test: the shuffled-label
    one) are added as columns. An image scored twice in one group is counted once when
    both rows agree, and refused when they do not (two runs' rows mixed in one table).
    """
    results = _once_each(results)
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


def _once_each(results: pd.DataFrame) -> pd.DataFrame:
    """`results` with each (group, image) once; SanityError when repeats disagree in value."""
    key = [*GROUP, "image"]
    repeated = results.duplicated(key, keep=False)
    if not repeated.any():
        return results
    values = results[repeated].groupby(key, dropna=False)["value"].nunique(dropna=False)
    if (values > 1).any():
        first = values[values > 1].index[0]
        raise SanityError(f"the results hold {int((values > 1).sum())} images scored twice with different values "
                          f"(e.g. method {first[3]}, seed {first[4]}, step {first[5]}, image {first[8]}): rows of "
                          f"two runs are mixed; {NEW_DIRECTORY}")
    extra = int(results.duplicated(key).sum())
    log.warning("the results repeat %d rows; each is counted once", extra)
    return results.drop_duplicates(key).reset_index(drop=True)
