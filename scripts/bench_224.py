"""sanity against Quantus at the size researchers use: ResNet-18 on 224-pixel inputs.

The same work for both tools, in one process, interleaved (``--reps`` times, the least
time kept): an untrained torchvision ResNet-18 (seeded weights, no download) on
``--images`` random inputs of ``--size`` pixels, their given labels explained, and the
full cascade, every module that holds parameters re-initialized with its own
``reset_parameters()`` from the logits down (batch norm statistics reset), which is what
Quantus's ``MPRT`` does (41 modules; the order is checked at start-up):

* ``mprt``: the gradient map of every state, compared with the trained model's.
* ``smprt``: the same cascade with every map averaged over ``--samples`` noisy copies of
  the input (noise std 0.1 x each input's range), Quantus's ``SmoothMPRT``.

sanity compares the way ``sanity run`` does: all four metrics (Spearman with and without
absolute value, SSIM, HOG) and the robustness scores (every normalization), and its
times are split into explaining and comparing (``compare_share``: comparing over
explaining). Quantus compares by its Spearman of the absolute value.

The floor is the forward and backward passes the work needs (one per image and state
for ``mprt``, ``--samples`` for ``smprt``) times the least time of one pass per image
with plain torch over ``--floor-batches``, measured at the start and before each
repetition. Peak memory: on the CPU the most bytes in use (glibc's ``mallinfo2``: heap
blocks in use and mapped blocks, sampled every 50 ms) during a tool's run over what was in
use before it; on a GPU ``torch.cuda.max_memory_allocated`` over what was allocated before.

    python scripts/bench_224.py --images 64 --size 224 --samples 50

Writes ``--out`` (JSON); prints one line per tool and item.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_vs_quantus import quantus_spearman
from sanity_cli import batching
from sanity_cli.checks.smooth_cascade import CHECK as SMOOTH_CASCADE
from sanity_cli.methods import explain_all
from sanity_cli.metrics import METRICS, kept_ranks
from sanity_cli.pipeline.score import state_scores
from sanity_cli.randomization import TrainedWeights, cascading_states, plan_blocks

ITEMS = ("mprt", "smprt")
SEED = 0
NOISE = 0.1  # sMPRT's noise (Hedström et al. 2023; Quantus's default)
# glibc's mallinfo2 takes the allocator's lock: sampled every 5 ms, it slowed comparing (many
# allocations of a few MiB) by about a quarter. The peaks that matter last seconds (every
# image's maps, the kept reference ranks).
SAMPLE_EVERY = 0.05
COMPARE_OPTIONS = {"metrics": list(METRICS), "normalization": "paper", "single_channel": False}


def resnet18(classes: int, device: torch.device) -> nn.Module:
    import torchvision

    torch.manual_seed(SEED)
    return torchvision.models.resnet18(weights=None, num_classes=classes).eval().to(device)


def inputs(n: int, size: int, classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    x = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
    y = torch.randint(0, classes, (n,), generator=generator)
    return x.to(device), y.to(device)


def quantus_order(model: nn.Module) -> list[str]:
    """The modules Quantus's MPRT re-initializes, top down: every module with reset_parameters,
    last registered first."""
    return [name for name, module in reversed(list(model.named_modules()))
            if name and hasattr(module, "reset_parameters")]


def check_same_states(model: nn.Module, x: Tensor) -> list[str]:
    """sanity's cascade (granularity=layer, top down) re-initializes the modules Quantus does,
    in the same order; exits otherwise."""
    blocks = list(plan_blocks(model, x[:1], "layer").names)
    if list(reversed(blocks)) != quantus_order(model):
        raise SystemExit(f"the cascades differ: sanity {list(reversed(blocks))[:5]}..., "
                         f"quantus {quantus_order(model)[:5]}...")
    return blocks


# --------------------------------------------------------------------------
# the two tools
# --------------------------------------------------------------------------


def sanity_run(model: nn.Module, x: Tensor, y: Tensor, item: str, samples: int, batch: int,
               parts: dict[str, float]) -> int:
    """sanity's cascade on (x, y); `parts` gets the seconds spent explaining and comparing.
    Returns the number of states compared."""
    blocks = plan_blocks(model, x[:1], "layer")
    trained = TrainedWeights(model)
    ids = torch.arange(len(x))

    def explain(m: nn.Module, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return explain_all(m, images, targets, {"gradient": {}}, max_batch=batch)

    reference: dict[str, Tensor] = {}
    compared = 0
    with kept_ranks():  # the reference's ranks are ranked once, as in a run
        for state in cascading_states(model, blocks, trained, SEED, init="default", reset_bn_stats=True):
            start = _now(x.device)
            if item == "smprt":
                maps = SMOOTH_CASCADE.maps(explain, model, x, y, SEED, {"samples": samples, "noise": NOISE}, ids)
            else:
                maps = explain(model, x, y)
            middle = _now(x.device)
            if state.step == 0:
                reference = maps
            else:
                for name, value in maps.items():  # as `sanity run` scores a state: the robustness
                    # variants and the four metrics under the paper's normalization, in one comparison
                    state_scores(reference[name], value, COMPARE_OPTIONS)
                compared += 1
            end = _now(x.device)
            parts["explain"] = parts.get("explain", 0.0) + middle - start
            parts["compare"] = parts.get("compare", 0.0) + end - middle
    trained.check(model)
    return compared


def quantus_run(model: nn.Module, x: Tensor, y: Tensor, item: str, samples: int, batch: int) -> int:
    """Quantus's MPRT or SmoothMPRT on the same work; returns the number of states scored."""
    import quantus

    options = {"similarity_func": quantus_spearman, "layer_order": "top_down", "seed": SEED, "abs": True,
               "normalise": True, "disable_warnings": True, "display_progressbar": False}
    metric = (quantus.SmoothMPRT(nr_samples=samples, noise_magnitude=NOISE, **options) if item == "smprt"
              else quantus.MPRT(**options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = metric(model=model, x_batch=x.cpu().numpy(), y_batch=y.cpu().numpy(), a_batch=None,
                        explain_func=quantus.explain, explain_func_kwargs={"method": "Gradient"},
                        device=str(x.device), batch_size=batch, channel_first=True)
    return sum(1 for layer in scores if layer != "original")


# --------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _allocator() -> Callable[[], int] | None:
    """glibc's bytes in use (heap blocks in use + mapped blocks): what the process's tensors
    and objects hold now, not what the allocator keeps from the system; None without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd
    return in_use


def _rss() -> int:
    """Resident bytes of this process (Linux /proc; 0 elsewhere): the fallback without glibc."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


_IN_USE = _allocator() or _rss


class PeakMemory:
    """Bytes that a block of code added at its peak, over what was held when it started."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak_in_use = _IN_USE()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(SAMPLE_EVERY):
            self.peak_in_use = max(self.peak_in_use, _IN_USE())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak_in_use, _IN_USE()) - self.start


def floor_per_pass(model: nn.Module, x: Tensor, batches: list[int], reps: int = 2) -> tuple[int, float]:
    """(batch, seconds): the least time of one forward + backward per image with plain torch
    (the gradient of each image's first logit with respect to it) over `batches`."""
    best = (0, math.inf)
    for batch in batches:
        leaf_data = x[:1].expand(batch, *x.shape[1:]).contiguous()
        for attempt in range(reps + 1):  # the first one warms up
            start = _now(x.device)
            leaf = leaf_data.detach().requires_grad_(True)
            torch.autograd.grad(model(leaf)[:, 0].sum(), leaf)
            seconds = (_now(x.device) - start) / batch
            if attempt and seconds < best[1]:
                best = (batch, seconds)
    return best


def passes(item: str, images: int, states: int, samples: int) -> int:
    """Forward + backward passes the item cannot do without: every state, the trained one too."""
    return images * states * (samples if item == "smprt" else 1)


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = resnet18(args.classes, device)
    x, y = inputs(args.images, args.size, args.classes, device)
    blocks = check_same_states(model, x)
    floor = floor_per_pass(model, x, args.floor_batches)
    if args.max_batch == "auto":
        batch, per_input = batching.measure(model, x[:1], args.auto_limit)
    else:
        batch, per_input = int(args.max_batch), {}
    print(f"{len(blocks)} modules re-initialized; floor {1e3 * floor[1]:.2f} ms per pass and image at batch "
          f"{floor[0]}; sanity batch {batch}", flush=True)
    runs: dict[str, dict[str, list[dict]]] = {tool: {item: [] for item in args.items} for tool in args.tools}
    floors = [floor]
    for rep in range(args.reps):
        for item in args.items:  # interleaved: each item by both tools in turn
            floors.append(floor_per_pass(model, x, [floor[0]], 1))
            for tool in args.tools:
                parts: dict[str, float] = {}
                with PeakMemory(device) as memory:
                    wall, cpu = time.perf_counter(), time.process_time()
                    if tool == "sanity":
                        states = sanity_run(model, x, y, item, args.samples, batch, parts)
                    else:
                        states = quantus_run(model, x, y, item, args.samples, args.quantus_batch)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                runs[tool][item].append({"wall_s": wall, "cpu_s": cpu, "peak_bytes": memory.peak,
                                         "states": states, **{f"{k}_s": v for k, v in parts.items()}})
                print(f"rep {rep + 1} {item} {tool}: {wall:.1f} s, {memory.peak / 2**20:.0f} MiB", flush=True)
    least = min(floors, key=lambda f: f[1])
    rows = []
    for item in args.items:
        work = passes(item, args.images, len(blocks) + 1, args.samples)
        for tool in args.tools:
            kept = min(runs[tool][item], key=lambda r: r["wall_s"])
            row = {"item": item, "tool": tool, "passes": work, "floor_s": work * least[1],
                   "seconds": kept["wall_s"], "images_per_s": args.images / kept["wall_s"],
                   "of_floor": work * least[1] / kept["wall_s"],
                   "peak_mib": max(r["peak_bytes"] for r in runs[tool][item]) / 2**20, "states": kept["states"],
                   "batch": batch if tool == "sanity" else args.quantus_batch}
            if tool == "sanity":
                row["compare_share"] = kept["compare_s"] / kept["explain_s"]
            rows.append(row)
    return {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(device),
            "modules": len(blocks), "floor": {"batch": least[0], "seconds_per_pass": least[1]}, "floors": floors,
            "sanity_batch": {"batch": batch, "seconds_per_input": {str(b): t for b, t in per_input.items()}},
            "runs": runs, "rows": rows}


def machine(device: torch.device) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(device), "load_average": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import quantus

        info["quantus"] = quantus.__version__
    except ImportError:
        pass
    return info


def print_rows(result: dict) -> None:
    for row in result["rows"]:
        share = f", comparing {100 * row['compare_share']:.1f}% of explaining" if "compare_share" in row else ""
        print(f"{row['item']:<6} {row['tool']:<8} {row['seconds']:8.1f} s  {row['images_per_s']:8.3f} images/s  "
              f"{row['of_floor']:.2f} of the floor  peak {row['peak_mib']:.0f} MiB  batch {row['batch']}{share}")
    by = {(row["item"], row["tool"]): row for row in result["rows"]}
    for item in result["settings"]["items"]:
        if (item, "sanity") in by and (item, "quantus") in by:
            print(f"{item}: sanity {by[(item, 'quantus')]['seconds'] / by[(item, 'sanity')]['seconds']:.1f}x "
                  f"Quantus's speed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=50, help="sMPRT's noisy copies")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--items", type=lambda t: t.split(","), default=list(ITEMS))
    parser.add_argument("--tools", type=lambda t: t.split(","), default=["sanity", "quantus"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-batch", default="auto", help="sanity's max_batch, or auto (sanity's batch=auto)")
    parser.add_argument("--auto-limit", type=int, default=64, help="the most that auto may pick")
    parser.add_argument("--quantus-batch", type=int, default=64, help="Quantus's batch_size")
    parser.add_argument("--floor-batches", type=lambda t: [int(v) for v in t.split(",")], default=[8, 16, 32, 64])
    parser.add_argument("--out", type=Path, default=HERE / "bench_224.json")
    args = parser.parse_args(argv)
    for value, valid, what in ((args.items, ITEMS, "items"), (args.tools, ("sanity", "quantus"), "tools")):
        if not value or set(value) - set(valid):
            parser.error(f"--{what}: choose from {', '.join(valid)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print_rows(result)
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
