"""sanity's explaining against plain torch doing the same passes for as long.

``bench_vs_quantus.py``'s floor is the least time of one pass, over short bursts of
2,048 images: a CPU runs faster in a burst (turbo, caches, a quiet neighbour) than over
the seconds an item takes. This script asks the narrower question: for one state of the
cascade (the trained CNN, ``--images`` digits), how does ``explain_all`` compare with a
plain torch loop of exactly the passes it needs, at the same batch size, timed the
same way and for the same length, interleaved ``--reps`` times (least and median kept)?

* plain: ``images x passes`` leaves of the digits' shape, ``--max-batch`` at a time,
  each a forward, the gradient of the target logit with respect to the input, nothing
  else (no noise, no interpolation, no statistics);
* sanity: ``explain_all`` with the item's method (IG with ``--steps`` Gauss-Legendre
  steps, SmoothGrad with ``--samples`` samples and noise 0.15), ``max_batch`` the same.

An item shorter than ``--min-seconds`` is repeated within each timing (both sides the
same number of times). ``burst_floor_s`` is bench_vs_quantus's floor for the same passes
(least time of one pass in bursts, measured at the start and the end).

    python scripts/bench_sustained.py

Writes ``--out`` (JSON) and prints a table: ``sanity / plain`` is the plain loop's time
over sanity's (1.00: no overhead beyond the passes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_vs_quantus as bench  # noqa: E402
from sanity_cli.methods import explain_all  # noqa: E402

ITEMS = ("gradient", "integrated_gradients", "smoothgrad")


def plain_passes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int, batch: int) -> None:
    """``passes`` forward + backward passes per image of x, ``batch`` images at a time."""
    inputs, targets = x.repeat(passes, 1, 1, 1), y.repeat(passes)
    for start in range(0, len(inputs), batch):
        leaf = inputs[start:start + batch].detach().requires_grad_(True)
        logits = model(leaf)
        torch.autograd.grad(logits.gather(1, targets[start:start + batch, None]).sum(), leaf)


def measure(args: argparse.Namespace) -> dict:
    model = bench.paper_cnn()
    x, y = bench.digits(args.images)
    floors = [bench.floor_per_pass(model, x, [args.max_batch], 3, args.floor_samples)["wall"][1]]
    work = {}
    for item in args.items:
        methods = bench.sanity_methods(item, args.steps, args.samples)
        passes = bench.passes_per_image(item, args.steps, args.samples)
        once = bench.timed(lambda: explain_all(model, x, y, methods, max_batch=args.max_batch))[0].wall
        runs = max(1, math.ceil(args.min_seconds / once))
        work[item] = (methods, passes, runs)
    times: dict[str, dict[str, list[float]]] = {item: {"sanity": [], "plain": []} for item in args.items}
    for rep in range(args.reps):
        for item, (methods, passes, runs) in work.items():
            sanity = bench.timed(lambda: [explain_all(model, x, y, methods, max_batch=args.max_batch)
                                          for _ in range(runs)])[0].wall
            plain = bench.timed(lambda: [plain_passes(model, x, y, passes, args.max_batch)
                                         for _ in range(runs)])[0].wall
            times[item]["sanity"].append(sanity / runs)
            times[item]["plain"].append(plain / runs)
            print(f"rep {rep + 1}/{args.reps}: {item} sanity {sanity / runs:.3f}s, plain {plain / runs:.3f}s",
                  flush=True)
    floors.append(bench.floor_per_pass(model, x, [args.max_batch], 3, args.floor_samples)["wall"][1])
    floor = min(floors)
    rows = []
    for item, (_, passes, runs) in work.items():
        sanity, plain = times[item]["sanity"], times[item]["plain"]
        burst = floor * passes * len(x)
        rows.append({"item": item, "passes": passes * len(x), "runs_per_timing": runs,
                     "sanity_min_s": min(sanity), "sanity_median_s": statistics.median(sanity),
                     "plain_min_s": min(plain), "plain_median_s": statistics.median(plain),
                     "sanity_of_plain": min(plain) / min(sanity),
                     "sanity_of_plain_median": statistics.median(plain) / statistics.median(sanity),
                     "burst_floor_s": burst, "plain_of_burst_floor": burst / min(plain),
                     "sanity_of_burst_floor": burst / min(sanity)})
    return {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
            "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
            "burst_floor_per_pass_s": floors, "times_s": times, "rows": rows}


def print_table(result: dict) -> None:
    print(f"{'item':<22}{'sanity s':>10}{'plain s':>10}{'sanity/plain':>14}{'(median)':>10}"
          f"{'burst floor s':>15}{'plain/burst':>13}{'sanity/burst':>14}")
    for row in result["rows"]:
        print(f"{row['item']:<22}{row['sanity_min_s']:>10.3f}{row['plain_min_s']:>10.3f}"
              f"{row['sanity_of_plain']:>14.2f}{row['sanity_of_plain_median']:>10.2f}"
              f"{row['burst_floor_s']:>15.3f}{row['plain_of_burst_floor']:>13.2f}{row['sanity_of_burst_floor']:>14.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="Integrated Gradients steps")
    parser.add_argument("--samples", type=int, default=50, help="SmoothGrad samples")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="an item shorter than this is repeated within each timing")
    parser.add_argument("--floor-samples", type=int, default=2048, help="images per timing of the burst floor")
    parser.add_argument("--items", type=lambda t: t.split(","), default=list(ITEMS),
                        help=f"comma-separated, of {', '.join(ITEMS)}")
    parser.add_argument("--out", type=Path, default=HERE / "bench_sustained.json")
    args = parser.parse_args(argv)
    unknown = set(args.items) - set(ITEMS)
    if unknown:
        parser.error(f"unknown items {sorted(unknown)}; choose from {', '.join(ITEMS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)


if __name__ == "__main__":
    main()
