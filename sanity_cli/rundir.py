"""The safety of a run directory: one owner at a time, writes that are whole or absent,
and CSV logs read without trusting them.

* `lock_run_dir` holds run_dir/run.lock (flock) for this process, so a second run or
  resume of the same directory is refused instead of mixing rows into it. The kernel
  drops the lock when the process ends, however it ends (kill -9 included).
* `replace_atomically` writes a whole file under a temporary name, syncs it, and
  renames it over the old one: a reader sees the old file or the new one, never half.
* `append_rows` appends CSV rows and syncs them to disk before returning, so a line
  written after them (the state's line in states.csv) never outlives them.
* `plain_name` refuses a name that would lead a file out of its directory (`..`, `/`,
  an absolute path, NUL) before it becomes part of a file name.
* `scan_csv` reads a CSV log line by line and sorts its lines into whole ones, garbled
  ones and a last line cut off mid-write, so a damaged file is reported, not fatal.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sanity_cli.errors import SanityError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
_HELD: dict[str, RunLock] = {}  # this process's locks, by resolved directory


class RunLock:
    """This process's hold on a run directory.

    Taking it again in the same process (the CLI, then the run store inside the
    pipeline) counts up; the directory is freed once every holder released it.
    Actions given to `when_accepted` run once, when a run store accepts the directory
    (nothing of a run that is refused is written).
    """

    def __init__(self, key: str, handle: io.TextIOWrapper | None):
        self._key, self._handle, self._holders = key, handle, 1
        self._on_accept: list[Callable[[], None]] = []

    def when_accepted(self, action: Callable[[], None]) -> None:
        self._on_accept.append(action)

    def accepted(self) -> None:
        """Record the owner in run.lock (for the message of a refused run) and run the actions."""
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            self._handle.flush()
        actions, self._on_accept = self._on_accept, []
        for action in actions:
            action()

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            _HELD.pop(self._key, None)
            if self._handle is not None:
                self._handle.close()  # closing the file drops the flock


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take run_dir (created if need be) for this process; SanityError when another holds it."""
    key = os.path.realpath(run_dir)
    held = _HELD.get(key)
    if held is not None:
        held._holders += 1
        return held
    with writing(run_dir, "choose another directory with hydra.run.dir=PATH"):
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")  # never truncates another's note
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise SanityError(f"{run_dir} is in use by another run{f' ({owner})' if owner else ''}; wait for it to "
                          "end, or choose another directory with hydra.run.dir=PATH") from None
    except OSError as error:  # a file system without locks (some network mounts)
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("cannot lock %s (%s): nothing stops a second run from writing into it", run_dir, error.strerror)
    lock = _HELD[key] = RunLock(key, handle)
    return lock


# What a name that becomes part of a file name must not hold: a separator or NUL, or be
# "." or ".." (each of which would put the file elsewhere than its directory); control
# characters (a newline) are refused too, as they would break the one-line messages.
_UNSAFE = ("/", "\\", "\0")


def plain_name(value: object, setting: str) -> str:
    """`value` as text that can be part of a file name inside its directory; SanityError
    naming `setting` when it is empty, holds a separator or NUL, or is "." or ".."."""
    text = str(value)
    if not text.strip() or text in (".", "..") or any(c in _UNSAFE or c < " " for c in text):
        raise SanityError(f"{setting}={text!r} cannot be part of a file name (it must be one plain name, without "
                          f"/, \\, NUL or another control character, and not . or ..); choose a plain name such "
                          f"as {setting}=my_name")
    return text


RESUME_FIX = "free some space or fix the directory, then continue the run with resume=true"


@contextlib.contextmanager
def writing(path: Path, fix: str = RESUME_FIX) -> Iterator[None]:
    """Turn a failed write (disk full, no permission, read-only) into one line that says what to do."""
    try:
        yield
    except OSError as error:
        raise SanityError(f"cannot write {path} ({error.strerror or error}); {fix}") from None


def replace_atomically(path: Path, data: bytes) -> None:
    """Write `data` as `path`: whole, synced, then renamed over the old file."""
    partial = path.with_name(f"{path.name}.partial")
    with writing(path):
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)


def csv_text(columns: list[str], rows: Iterable[Mapping], header: bool) -> str:
    """Rows as CSV text, with the header line first when `header`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def append_rows(path: Path, columns: list[str], rows: Iterable[Mapping]) -> None:
    """Append rows to a CSV file and sync them to disk before returning. A failed append
    (disk full) is cut back off, so that no half line stays behind."""
    data = memoryview(csv_text(columns, rows, header=False).encode("utf-8"))
    with writing(path):
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.lseek(descriptor, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(descriptor, data):]
                os.fsync(descriptor)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, size)
                raise
        finally:
            os.close(descriptor)


@dataclass
class Scan:
    """A CSV log sorted into its lines (raw bytes without the newline).

    good: (line number, fields by column, raw line) of each whole, well-formed line.
    damaged: line numbers of garbled lines; cut_off: the number of a last line that
    has no newline (the writer stopped mid-line), or None.
    """

    header: bytes
    columns: list[str]
    good: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)
    cut_off: int | None = None

    def text(self, lines: Iterable[bytes]) -> bytes:
        """The header and `lines` as the content of a CSV file."""
        return b"".join(line + b"\n" for line in (self.header, *lines))


def scan_csv(path: Path, required: list[str], well_formed: Callable[[dict[str, str]], bool]) -> Scan:
    """Read a CSV log without trusting it; SanityError when even its header is unusable."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SanityError(f"cannot read {path} ({error.strerror or error}); check the file's permissions") from None
    lines = data.split(b"\n")
    header = lines[0]
    try:
        columns = next(csv.reader([header.decode("utf-8")]))
    except (UnicodeDecodeError, StopIteration, csv.Error):
        columns = []
    if not set(required) <= set(columns):
        raise SanityError(f"{path} is damaged: its first line is not the header of a {path.name} "
                          f"({', '.join(required)}, ...); what it held is lost: rerun into a new directory "
                          "with hydra.run.dir=PATH")
    scan = Scan(header, columns)
    last = len(lines) - 1  # the piece after the final newline: empty unless a line was cut off
    for number, raw in enumerate(lines[1:], start=2):
        if number - 1 == last:
            if raw.strip():
                scan.cut_off = number
            break
        fields = _fields(raw, columns)
        if fields is None or not well_formed(fields):
            scan.damaged.append(number)
        else:
            scan.good.append((number, fields, raw))
    return scan


def _fields(raw: bytes, columns: list[str]) -> dict[str, str] | None:
    try:
        values = next(csv.reader([raw.decode("utf-8").rstrip("\r")]))
    except (UnicodeDecodeError, StopIteration, csv.Error):
        return None
    return dict(zip(columns, values)) if len(values) == len(columns) else None
