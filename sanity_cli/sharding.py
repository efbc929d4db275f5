"""Work split across jobs: image shards, each job's share of the machine, and the
failures of a sweep's jobs wherever they ran.

* `shard=K/N` explains the K-th of N disjoint, contiguous slices of the chosen test
  images (sizes differ by at most one). The slices in order are the chosen images in
  order, so the rows of shards 0/N .. N-1/N together are the unsharded run's rows.
* `job_resources(cfg)` wraps one Hydra job. Jobs of a joblib sweep share the machine:
  each gets cores // (jobs running at once) torch threads, and each leases a GPU of
  its own (a file lock per GPU in the sweep directory), waiting while all are taken;
  the run finds its lease through `leased_device()` (the config is left as given).
  A SLURM job uses the cores SLURM gave it (SLURM_CPUS_PER_TASK); its GPUs are the
  ones SLURM made visible (CUDA_VISIBLE_DEVICES).
* A job that fails with a bad setting leaves its one-line message in `error.txt` in
  its directory; `SweepFailures`, a Hydra callback, reads them when the sweep ends,
  whichever launcher (in-process, joblib workers, SLURM nodes) ran the jobs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sanity_cli.errors import SanityError

log = logging.getLogger(__name__)
ERROR_FILE = "error.txt"  # a failed job's one-line message, in the job's directory
SWEEP_FAILURES: list[str] = []  # filled by SweepFailures when a sweep ends, in the process that launched it
_LEASED: ContextVar[str | None] = ContextVar("leased_device", default=None)  # set inside job_resources


@dataclass(frozen=True)
class Shard:
    """The `index`-th (from 0) of `count` slices of the chosen images."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(value) -> Shard | None:
    """`shard` as given ("K/N", or None for all images) -> Shard; SanityError when malformed."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not match:
        raise SanityError(f"shard must be K/N with whole numbers 0 <= K < N, e.g. shard=0/4 "
                          f"(or shard=null for all images); got '{value}'")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise SanityError(f"shard={value}: N must be at least 1, e.g. shard=0/4")
    if index >= count:
        raise SanityError(f"shard={value}: K counts from 0 and must be below N; the shards of {count} are "
                          f"0/{count} .. {count - 1}/{count}")
    return Shard(index, count)


def shard_images(chosen: Tensor, shard: Shard | None) -> Tensor:
    """The shard's part of the chosen image indices (M,) -> (M_k,), in their order."""
    if shard is None:
        return chosen
    if shard.count > len(chosen):
        raise SanityError(f"shard={shard} splits {len(chosen)} images {shard.count} ways, so some shards are "
                          f"empty; use at most {len(chosen)} shards or raise n_images")
    return chosen.tensor_split(shard.count)[shard.index]


# -- each job's share of the machine ------------------------------------------------------------


@dataclass(frozen=True)
class JobShare:
    """What one job may use: torch threads (None: torch's default) and whether it
    leases a GPU of its own among the visible ones."""

    threads: int | None
    lease_gpu: bool


def job_share(launcher: str, n_jobs: int | None, sweep_jobs: int | None, cores: int, env: dict) -> JobShare:
    """The share of a job started by `launcher` (the launcher's `_target_`).

    joblib: n_jobs as joblib reads it (-1 all cores, -2 all but one, None one at a time);
    `sweep_jobs` the number of jobs of the sweep (None: unknown). SLURM: the cores
    SLURM gave the job. Elsewhere nothing changes.
    """
    slurm_cores = env.get("SLURM_CPUS_PER_TASK")
    if slurm_cores and slurm_cores.isdigit():
        return JobShare(int(slurm_cores), lease_gpu=False)
    if "joblib" not in launcher.lower():
        return JobShare(None, lease_gpu=False)
    workers = 1 if n_jobs is None else n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    at_once = min(workers, sweep_jobs) if sweep_jobs else workers
    return JobShare(max(1, cores // max(at_once, 1)), lease_gpu=True)


def sweep_size(sweep_dir: Path) -> int | None:
    """How many jobs the sweep in `sweep_dir` has, from the overrides in its multirun.yaml."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return math.prod(len(list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override())
    except Exception:  # noqa: BLE001 - no file, or a sweep only Hydra can expand: the launcher's n_jobs decides
        return None


@contextmanager
def job_resources(cfg: DictConfig) -> Iterator[None]:
    """Run one Hydra job within its share of the machine (see the module's docstring).

    A joblib job that would use a GPU (device auto or cuda) leases one, `cuda:I`, which
    `leased_device()` gives for the job's duration. Threads are restored on exit.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    launcher = hydra_cfg.launcher
    sweep_dir = Path(hydra_cfg.sweep.dir)
    sweep_jobs = sweep_size(sweep_dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    share = job_share(str(launcher.get("_target_", "")), launcher.get("n_jobs"), sweep_jobs,
                      len(os.sched_getaffinity(0)), dict(os.environ))
    threads = torch.get_num_threads()
    with ExitStack() as stack:
        if share.threads:
            torch.set_num_threads(share.threads)
            log.info("job %s: %d torch threads", hydra_cfg.job.num, share.threads)
        gpus = torch.cuda.device_count() if share.lease_gpu and str(cfg.device) in ("auto", "cuda") else 0
        if gpus:
            gpu = stack.enter_context(gpu_lease(sweep_dir / ".gpus", gpus))
            torch.cuda.set_device(gpu)
            stack.callback(_LEASED.reset, _LEASED.set(f"cuda:{gpu}"))
            log.info("job %s: GPU %d", hydra_cfg.job.num, gpu)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def leased_device() -> str | None:
    """The GPU (`cuda:I`) that this job of a sweep leased in `job_resources`; None outside
    a lease (the run then takes its `device` setting)."""
    return _LEASED.get()


@contextmanager
def gpu_lease(lock_dir: Path, gpus: int, poll_s: float = 1.0) -> Iterator[int]:
    """Hold the first free one of `gpus` GPUs (a lock file each in `lock_dir`) until exit;
    wait while all are held. The operating system releases the lock of a killed job."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    locks = [FileLock(lock_dir / f"gpu{index}.lock") for index in range(gpus)]
    said = False
    while True:
        for index, lock in enumerate(locks):
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                yield index
            finally:
                lock.release()
            return
        if not said:
            log.info("all %d GPUs are leased by other jobs of this sweep; waiting for one", gpus)
            said = True
        time.sleep(poll_s)


# -- failures of a sweep's jobs -----------------------------------------------------------------


def record_job_error(job_dir: Path, message: str) -> None:
    """Leave a failed job's one-line message in its directory, for the launching process."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / ERROR_FILE).write_text(message + "\n")


def clear_job_error(job_dir: Path) -> None:
    """A job that starts again is no longer the failure it was."""
    (job_dir / ERROR_FILE).unlink(missing_ok=True)


def job_errors(sweep_dir: Path, since: float = 0.0) -> list[str]:
    """'DIR: message' for each job under `sweep_dir` that failed (error.txt written after `since`)."""
    found = [path for path in sweep_dir.rglob(ERROR_FILE) if path.stat().st_mtime >= since]
    return [f"{path.parent}: {path.read_text().strip()}" for path in sorted(found)]


class SweepFailures(Callback):
    """Collects the failures of a sweep's jobs into SWEEP_FAILURES when the sweep ends."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time() - 1.0  # file times may be rounded to the second
        SWEEP_FAILURES.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        SWEEP_FAILURES.extend(job_errors(Path(config.hydra.sweep.dir), self.started))
