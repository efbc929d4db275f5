"""The batch that reaches the floor on the machine at hand, chosen by measurement.

The time of one forward + backward per input falls as the batch grows, until the
device is busy, and then stays flat or rises again (caches overflow). Where that
happens differs between machines and models, so `batch=auto` measures it: one
input repeated to each candidate batch (powers of two up to `max_batch`, and
`max_batch` itself), the best of a few timed passes each, and the smallest batch
whose time per input is within TOLERANCE of the best is used as the run's
`max_batch`. The measurement stops early once a bigger batch no longer helps, and
is kept per machine and model in `cache_dir/batch/` so that it runs once.

A fixed `max_batch` (`batch=fixed`, the default) is used as it is. The batch never
changes a run's numbers beyond float rounding (the maps are per image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from sanity_cli.rundir import replace_atomically

log = logging.getLogger(__name__)

BATCH_CHOICES = ("fixed", "auto")
# A batch within 5% of the best time per input counts as at the floor: the smallest such
# batch holds the least memory and leaves the fewest images padding a last, short batch.
TOLERANCE = 1.05
SMALLEST = 8            # below this no device is busy, and the timing is mostly overhead
TIMED_PASSES = 3        # the best of these per candidate (after one warm-up pass)
# Stop after this many bigger batches in a row that did not beat the best by TOLERANCE.
PATIENCE = 2


def candidates(max_batch: int) -> list[int]:
    """Powers of two from SMALLEST (or max_batch, if smaller) up to max_batch, and max_batch."""
    sizes = [2**k for k in range(int(math.log2(SMALLEST)), int(math.log2(max_batch)) + 1) if 2**k <= max_batch]
    return sorted({*sizes, max_batch})


def pass_time(model: nn.Module, example: Tensor, batch: int) -> float:
    """Seconds per input of one forward and backward (the gradient of one logit with respect
    to the input, what a one-pass method does) at `batch` inputs: the best of TIMED_PASSES."""
    inputs = example[:1].expand(batch, *example.shape[1:]).contiguous()
    best = math.inf
    for attempt in range(TIMED_PASSES + 1):  # the first one warms up
        _synchronize(inputs.device)
        start = time.perf_counter()
        leaf = inputs.detach().requires_grad_(True)
        logits = model(leaf)
        torch.autograd.grad(logits[:, 0].sum(), leaf)
        _synchronize(inputs.device)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best / batch


def measure(model: nn.Module, example: Tensor, max_batch: int) -> tuple[int, dict[int, float]]:
    """(chosen batch, {batch: seconds per input}) for `model` on inputs shaped like
    example (1, C, H, W). A candidate that runs out of device memory ends the search."""
    times: dict[int, float] = {}
    stale = 0
    for batch in candidates(max_batch):
        try:
            times[batch] = pass_time(model, example, batch)
        except torch.OutOfMemoryError:
            break
        best_before = min((t for b, t in times.items() if b < batch), default=math.inf)
        stale = stale + 1 if times[batch] * TOLERANCE >= best_before else 0
        if stale >= PATIENCE:
            break
    if not times:
        raise torch.OutOfMemoryError(f"one forward and backward of {candidates(max_batch)[0]} inputs does not fit")
    best = min(times.values())
    return min(b for b, t in times.items() if t <= best * TOLERANCE), times


def machine_key(device: torch.device) -> dict:
    """What makes one machine's timing another's: the processor or GPU, threads, and torch."""
    key = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device.type,
           "machine": platform.machine(), "processor": _processor_name()}
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


def model_key(model: nn.Module, example: Tensor) -> dict:
    """What makes one model's timing another's: its modules, parameter shapes and input shape."""
    parameters = [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    return {"model": type(model).__name__, "parameters": hashlib.sha256(repr(parameters).encode()).hexdigest()[:16],
            "input": list(example.shape[1:]), "dtype": str(example.dtype)}


def chosen_batch(model: nn.Module, example: Tensor, max_batch: int, cache_dir: str | Path) -> int:
    """The batch for `model` on this machine, from cache_dir/batch/ or measured now (and kept there).

    example: (1, C, H, W), one input as the run gives them. A cache that cannot be written
    is skipped (the batch is then measured in every run)."""
    fields = {**machine_key(example.device), **model_key(model, example), "max_batch": max_batch,
              "tolerance": TOLERANCE}
    name = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir).expanduser() / "batch" / f"{name}.json"
    kept = _read(path, fields)
    if kept is not None:
        return kept
    was_training = model.training
    model.eval()
    try:
        batch, times = measure(model, example, max_batch)
    except Exception as error:  # noqa: BLE001 - the run's own passes report a model that fails
        log.warning("batch=auto: the measurement failed (%s); using max_batch=%d", error, max_batch)
        return max_batch
    finally:
        model.train(was_training)
    log.info("batch=auto: %d inputs per pass (seconds per input: %s)", batch,
             ", ".join(f"{b}: {t:.2e}" for b, t in times.items()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, json.dumps({"fields": fields, "batch": batch,
                                             "seconds_per_input": {str(b): t for b, t in times.items()}},
                                            indent=1).encode())
    except Exception as error:  # noqa: BLE001 - a cache that cannot be written only costs a measurement
        log.warning("batch=auto: cannot keep the measurement in %s (%s)", path, error)
    return batch


def _read(path: Path, fields: dict) -> int | None:
    """The kept batch for these fields, or None (no file, another machine's, or unreadable)."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("fields") != json.loads(json.dumps(fields)):
        return None
    batch = kept.get("batch")
    return batch if isinstance(batch, int) and 1 <= batch <= fields["max_batch"] else None


def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or os.uname().machine


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
