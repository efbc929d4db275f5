"""Time of a cascade with the trained blocks' activations reused (`reuse_activations`),
against plain passes and the floor, and a check that the maps are the same.

For each model and method: a cascade over all the model's blocks from the logits down
(``init="default"``, random weights: the cost does not depend on them), every state's
maps computed with plain passes and with reuse, interleaved, ``--reps`` times (the least
time kept). The floor is the plain forward + backward passes the work needs (one per
image and state for the gradient, ``--steps`` for Integrated Gradients) times the least
time of one such pass per image, measured with plain torch at the method's batch size
(``bench_vs_quantus.floor_per_pass``) before and after the repetitions, the least of the
two kept. Reuse skips forwards, so it can go past the floor.

Models: ``cnn`` (the project's MNIST CNN on ``--images`` digits at 28 x 28) and
``resnet18`` (torchvision's, 10 classes, ``--resnet-images`` random images at
``--resnet-size``). The largest difference between the two runs' maps is reported; it
must be at most 1e-6.

    python scripts/bench_reuse.py

Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from sanity_cli.methods import explain_all
from sanity_cli.randomization import TrainedWeights, cascading_states, plan_blocks
from sanity_cli.reuse import ActivationReuse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_quantus import digits, floor_per_pass, paper_cnn  # noqa: E402

HERE = Path(__file__).resolve().parent
MiB = 2**20
SEED = 0


def resnet(images: int, size: int) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(SEED)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    return model, x, torch.randint(0, 10, (images,), generator=torch.Generator().manual_seed(SEED))


def cascade(model: nn.Module, x: Tensor, y: Tensor, methods: dict, max_batch: int, blocks, trained: TrainedWeights,
            reuse: ActivationReuse) -> tuple[float, list[Tensor]]:
    """Seconds of explaining every state, and the maps of each state."""
    maps, seconds = [], 0.0
    for _ in cascading_states(model, blocks, trained, SEED, init="default"):
        with reuse.state(model), reuse.chunk(0):
            start = time.perf_counter()
            result = explain_all(model, x, y, methods, max_batch=max_batch)
            seconds += time.perf_counter() - start
        maps.append(next(iter(result.values())))
    return seconds, maps


def measure(name: str, model: nn.Module, x: Tensor, y: Tensor, method: str, options: dict, passes: int,
            args: argparse.Namespace) -> dict:
    blocks = plan_blocks(model, x[:1])
    trained = TrainedWeights(model)
    batch = min(args.max_batch, len(x) * passes)

    def one_pass() -> float:
        return floor_per_pass(model, x, [batch], args.reps, samples=max(batch, 8 * len(x)))["wall"][1]

    floors = [one_pass()]
    times: dict[str, list[float]] = {"plain": [], "reuse": []}
    kept = {}
    for _ in range(args.reps):
        for mode, bound in (("plain", 0), ("reuse", args.reuse_mib * MiB)):
            reuse = ActivationReuse(model, blocks, trained.state, bound)
            seconds, maps = cascade(model, x, y, {method: options}, args.max_batch, blocks, trained, reuse)
            times[mode].append(seconds)
            kept[mode] = maps
            if mode == "reuse":
                stats, held = dict(reuse.stats), reuse.held
    floors.append(one_pass())  # the machine drifts: the least of before and after
    floor = min(floors)
    trained.check(model)
    difference = max(float((a - b).abs().max()) for a, b in zip(kept["plain"], kept["reuse"], strict=True))
    work = passes * len(x) * (len(blocks) + 1)
    row = {"model": name, "method": method, "images": len(x), "states": len(blocks) + 1, "passes": work,
           "max_batch": args.max_batch, "floor_s": work * floor, "plain_s": min(times["plain"]),
           "reuse_s": min(times["reuse"]), "kept_mib": held / MiB, "passes_kept": stats["kept"],
           "passes_reused": stats["reused"], "max_abs_difference": difference, "times_s": times,
           "floor_per_pass_s": floors}
    row["plain_of_floor"] = row["floor_s"] / row["plain_s"]
    row["reuse_of_floor"] = row["floor_s"] / row["reuse_s"]
    row["reuse_speed_up"] = row["plain_s"] / row["reuse_s"]
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda t: t.split(","), default=["cnn", "resnet18"])
    parser.add_argument("--images", type=int, default=200, help="digits for the cnn")
    parser.add_argument("--resnet-images", type=int, default=32)
    parser.add_argument("--resnet-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=10, help="Integrated Gradients steps")
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--reuse-mib", type=int, default=8192, help="reuse_activations of the reusing runs")
    parser.add_argument("--out", type=Path, default=HERE / "bench_reuse.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for name in args.models:
        if name == "cnn":
            model, (x, y) = paper_cnn(), digits(args.images)
        elif name == "resnet18":
            model, x, y = resnet(args.resnet_images, args.resnet_size)
        else:
            raise SystemExit(f"--models: unknown model {name!r}; choose cnn or resnet18")
        for method, options, passes in (("gradient", {}, 1),
                                        ("integrated_gradients", {"steps": args.steps}, args.steps)):
            rows.append(measure(name, model, x, y, method, options, passes, args))
            row = rows[-1]
            print(f"{name:<9}{method:<22}plain {row['plain_s']:7.2f} s  reuse {row['reuse_s']:7.2f} s  "
                  f"x{row['reuse_speed_up']:.2f}  of floor {row['plain_of_floor']:.2f} / {row['reuse_of_floor']:.2f}  "
                  f"kept {row['kept_mib']:6.0f} MiB  max diff {row['max_abs_difference']:.1e}", flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    args.out.write_text(json.dumps({"machine": machine, "settings": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
