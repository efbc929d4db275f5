"""A run directory read back, without trusting it: the one reader of each of its files.

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
  summary.csv   mean, std, n and n_nan per (method, step, block, metric)

`sanity_cli.runstore` writes them. A row counts only once its state's line is in
states.csv: reading a run back (`read_results`, a resume) trusts nothing else. Lines
cut off or garbled, and rows of states that never finished, are left out with a warning
that says what is lost. run.json is read by `read_info` (and `models_of`), maps.npz by
`open_maps` (and `read_meta`), every CSV table by `read_run_file`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sanity_cli.errors import SanityError
from sanity_cli.rundir import Scan, scan_csv

log = logging.getLogger(__name__)

COLUMNS = ["test", "model", "dataset", "method", "seed", "step", "block", "image", "label", "target", "metric",
           "value", "init", "reset_bn_stats", "normalization"]
STATE_COLUMNS = ["seed", "step", "block"]
# The receipt of each state: the explained model's accuracy on the chosen images, a
# fingerprint of its weights, and how much of it was re-initialized.
RECEIPT_COLUMNS = ["accuracy", "weights", "params_randomized", "tensors_left_trained"]
INFO, MAPS = "run.json", "maps.npz"
SCALE = "/scale"  # maps.npz: "{state}/{method}/scale" holds the (E,) scales of "{state}/{method}"
NEW_DIRECTORY = "rerun into a new directory with hydra.run.dir=PATH"
# What a reader of a finished run says to do about a damaged run.json
UNKNOWN_SETTINGS = ("so the run's settings are unknown; restore it from a copy, or rerun into a new directory "
                    "with hydra.run.dir=PATH")


# ---------------------------------------------------------------- run.json


def read_info(run_dir: str | Path, consequence: str = UNKNOWN_SETTINGS) -> dict:
    """A run's run.json as a dict, {} when there is none; SanityError in one line when it is
    damaged: what is wrong with the file, then `consequence` (what that means, and the fix)."""
    path = Path(run_dir) / INFO
    if not path.exists():
        return {}
    try:
        return info_file(path)
    except SanityError as error:
        raise SanityError(f"{error}, {consequence}") from None


def info_file(path: Path) -> dict:
    """The run.json at `path` as a dict; SanityError saying how it is missing or damaged."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SanityError(f"{path} is missing") from None
    except (OSError, ValueError) as error:
        raise SanityError(f"{path} is damaged ({type(error).__name__})") from None
    if not isinstance(info, dict):
        raise SanityError(f"{path} is damaged (not a run's record)")
    return info


def models_of(run_dir: str | Path) -> dict:
    """The models' accuracies that run.json holds; {} (with a warning) when it is missing or damaged."""
    try:
        return info_file(Path(run_dir) / INFO).get("models", {})
    except SanityError as error:
        log.warning("%s; the models' accuracies are left out of summary.csv", error)
        return {}


# ---------------------------------------------------------------- the CSV tables


_WARNED: set[str] = set()  # what the readers of run files have said in this process


def warn_once(message: str, *args) -> None:
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


def scan_results(path: Path) -> Scan:
    """results.csv (or robustness.csv) scanned line by line (see rundir.Scan)."""
    return scan_csv(path, ["method", "seed", "step", "image", "metric", "value"], _result_line)


def read_states(path: Path) -> Scan | None:
    """states.csv scanned line by line (see rundir.Scan); None when there is no such file."""
    if not path.exists():
        return None
    scan = scan_csv(path, STATE_COLUMNS, _state_line)
    if scan.damaged or scan.cut_off:
        bad = [*scan.damaged, *([scan.cut_off] if scan.cut_off else [])]
        warn_once("%s: line %s %s damaged; %s state%s counted as unfinished", path,
                  ", ".join(map(str, bad)), "is" if len(bad) == 1 else "are",
                  "that" if len(bad) == 1 else "those", "" if len(bad) == 1 else "s")
    return scan


def state_key(fields: Mapping[str, str]) -> tuple[int, int]:
    """(seed, step) of a line of results.csv or states.csv."""
    return int(fields["seed"]), int(fields["step"])


def state_fields(scan: Scan | None) -> dict[tuple[int, int], dict[str, str]]:
    """Each finished state's fields, the first line of a state repeated by an older run kept."""
    fields: dict[tuple[int, int], dict[str, str]] = {}
    for _, values, _ in scan.good if scan is not None else []:
        fields.setdefault(state_key(values), values)
    return fields


def rows_of(rows: Scan, finished: set[tuple[int, int]] | None, repair: bool,
            name: str | Path = "results.csv") -> tuple[list, set]:
    """The rows of finished states (all whole rows when `finished` is None), each once, and
    the finished states that damage left incomplete (to be computed again by a resume).

    Logs what is left out, naming the file `name`: garbled lines, a line cut off
    mid-write, rows of states that never finished, repeated rows.
    """
    if rows.cut_off:
        warn_once("%s: its last line (%d) was cut off mid-write; left out", name, rows.cut_off)
    seen, kept, unfinished = set(), [], Counter()
    for line in rows.good:
        state = state_key(line[1])
        if finished is not None and state not in finished:
            unfinished[state] += 1
        elif line[2] not in seen:
            seen.add(line[2])
            kept.append(line)
    if unfinished:
        warn_once("%s: %d rows of unfinished states (%s) left out%s", name, sum(unfinished.values()),
                  ", ".join(f"seed {s} step {t}" for s, t in sorted(unfinished)),
                  "; the resume computes them again" if repair else "; continue the run with resume=true")
    repeated = len(rows.good) - len(kept) - sum(unfinished.values())
    if repeated:
        warn_once("%s: %d rows repeat another row exactly; each is counted once", name, repeated)
    return kept, _incomplete(rows, kept, finished, repair, name)


def _incomplete(rows: Scan, kept: list, finished: set | None, repair: bool,
                name: str | Path = "results.csv") -> set[tuple[int, int]]:
    """Where garbled lines cost rows: the states with fewer rows than the fullest state."""
    if not rows.damaged:
        return set()
    counts = Counter({state: 0 for state in finished or ()})
    counts.update(state_key(fields) for _, fields, _ in kept)
    short = {state for state, count in counts.items() if count < max(counts.values())}
    lines = ", ".join(map(str, rows.damaged[:5])) + (" ..." if len(rows.damaged) > 5 else "")
    warn_once("%s: %d garbled line%s (%s) left out, lost from %s%s", name, len(rows.damaged),
              "" if len(rows.damaged) == 1 else "s", lines,
              ", ".join(f"seed {s} step {t}" for s, t in sorted(short)) or "states that cannot be told",
              "; the resume computes those states again" if repair and short else "")
    return short if repair else set()


def count_finished(run_dir: str | Path) -> int:
    """How many states the run in `run_dir` has finished (0 before its first)."""
    return len(state_fields(read_states(Path(run_dir) / "states.csv")))


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
        rows = scan_results(path)
        states = read_states(path.parent / "states.csv")
        kept, _ = rows_of(rows, set(state_fields(states)) if states is not None else None, repair=False,
                          name=path)
        return pd.read_csv(io.BytesIO(rows.text(raw for _, _, raw in kept)))
    scan = scan_csv(path, REQUIRED.get(path.name, []), lambda fields: True)
    if not any(scan.columns):
        raise SanityError(f"{path} is damaged: its first line is not a header; move it away to go on without it")
    bad = [*scan.damaged, *([scan.cut_off] if scan.cut_off else [])]
    if bad:
        warn_once("%s: line%s %s damaged (cut off mid-write or garbled); left out", path,
                  "" if len(bad) == 1 else "s", ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else ""))
    return pd.read_csv(io.BytesIO(scan.text(raw for _, _, raw in scan.good)))


# ---------------------------------------------------------------- maps.npz


def read_maps(npz, key: str) -> np.ndarray:
    """The maps stored under `key` ("{state}/{method}") of an open maps.npz (or any mapping
    of its arrays), as float32 (E, C, H, W) in their own units: the stored maps times their scales."""
    scale = npz[f"{key}{SCALE}"] if f"{key}{SCALE}" in npz else np.ones(len(npz[key]), dtype=np.float32)
    return npz[key].astype(np.float32) * scale.reshape(-1, 1, 1, 1)


class Maps:
    """An open maps.npz. `meta`: its description (a dict: test, model, dataset, title, methods,
    controls, states [{key, seed, step, block}], image_ids, labels, classes). Each array is
    decompressed when asked for, never all at once (a full Inception run holds hundreds of MB)."""

    def __init__(self, npz):
        self._npz = npz
        self.meta: dict = json.loads(str(npz["meta"][()]))

    def __contains__(self, key: str) -> bool:
        """Whether maps of `key` ("{state key}/{method}") were kept."""
        return key in self._npz

    @property
    def images(self) -> np.ndarray:
        """The example images (E, C, H, W) in [0, 1]."""
        return self._npz["images"]

    def maps(self, key: str) -> np.ndarray:
        """The maps of `key` ("{state key}/{method}"), (E, C, H, W) float32 in their own units."""
        return read_maps(self._npz, key)

    def unit_maps(self, key: str) -> np.ndarray:
        """The maps of `key` as stored, each over its own max |value| (float16): for drawing,
        where every tile is scaled on its own and the units do not show."""
        return self._npz[key]


@contextlib.contextmanager
def open_maps(run_dir: str | Path) -> Iterator[Maps | None]:
    """run_dir/maps.npz open as `Maps`, None without the file."""
    path = Path(run_dir) / MAPS
    if not path.exists():
        yield None
        return
    with np.load(path) as npz:
        yield Maps(npz)


def read_meta(run_dir: str | Path) -> dict | None:
    """maps.npz's description (see `Maps`), None without the file."""
    if not (Path(run_dir) / MAPS).is_file():
        return None
    with open_maps(run_dir) as maps:
        return maps.meta


def check_maps(run_dir: str | Path) -> None:
    """SanityError naming maps.npz and the way on when the file is damaged."""
    path = Path(run_dir) / MAPS
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
