"""Do reduced-precision matmuls change sanity's scores? TF32 and bf16 against strict float32.

An untrained torchvision ResNet-18 (seeded, no download) on ``--images`` random inputs of
``--size`` pixels: the gradient maps of the trained model and of the top ``--states``
states of the cascade (each module with parameters re-initialized, from the logits
down), and each state's scores against the trained model's maps (Spearman with and
without absolute value, SSIM, HOG), computed three ways:

* ``float32``: TF32 off for matmuls and convolutions (the reference);
* ``tf32``: TF32 on (what many GPU setups turn on for speed);
* ``bf16``: the model run under ``torch.autocast`` in bfloat16.

For each precision: the largest difference of any score from float32's, and the
Spearman correlation of its maps with float32's maps (per image and state, the least).
A precision passes when no score moves by more than ``--tolerance`` (bf16 gets ten
times that). On a CPU, TF32 does nothing (its figures show that) and bf16 runs through
CPU autocast.

    python scripts/gpu_parity.py --device cuda --images 16 --size 224 --states 6

Writes ``--out`` (JSON); prints one line per precision; exits 1 if a precision fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from sanity_cli.methods import explain_all
from sanity_cli.metrics import METRICS, compare, spearman
from sanity_cli.randomization import TrainedWeights, cascading_states, plan_blocks

HERE = Path(__file__).resolve().parent
PRECISIONS = ("float32", "tf32", "bf16")
SEED = 0


@contextlib.contextmanager
def precision(name: str, device: torch.device) -> Iterator[None]:
    """Run the block in `name` precision; the backend flags are restored after."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        if name == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def cascade_maps(model: nn.Module, x: Tensor, y: Tensor, states: int, max_batch: int) -> list[Tensor]:
    """Gradient maps (float32) of the trained model and of the first `states` cascade states."""
    blocks = plan_blocks(model, x[:1], "layer")
    trained = TrainedWeights(model)
    maps = []
    for state in cascading_states(model, blocks, trained, SEED, init="default", reset_bn_stats=True):
        maps.append(explain_all(model, x, y, {"gradient": {}}, max_batch=max_batch)["gradient"].float())
        if state.step >= states:
            break
    trained.restore(model)
    return maps


def scores_of(maps: list[Tensor]) -> dict[str, Tensor]:
    """{metric: (states, B)} scores of every state's maps against the first's."""
    per_state = [compare(maps[0], other, METRICS, single_channel=False) for other in maps[1:]]
    return {metric: torch.stack([s[metric] for s in per_state]) for metric in METRICS}


def measure(args: argparse.Namespace) -> dict:
    import torchvision

    device = torch.device(args.device)
    torch.manual_seed(SEED)
    model = torchvision.models.resnet18(weights=None, num_classes=args.classes).eval().to(device)
    generator = torch.Generator().manual_seed(SEED)
    x = (torch.rand(args.images, 3, args.size, args.size, generator=generator) * 2 - 1).to(device)
    y = torch.randint(0, args.classes, (args.images,), generator=generator).to(device)
    maps, scores = {}, {}
    for name in PRECISIONS:
        with precision(name, device):
            maps[name] = cascade_maps(model, x, y, args.states, args.max_batch)
        scores[name] = scores_of(maps[name])
    rows = []
    for name in PRECISIONS:
        differences = {m: float((scores[name][m] - scores["float32"][m]).abs().nan_to_num().max())
                       for m in METRICS}
        agreement = min(float(spearman(a.flatten(1).double(), b.flatten(1).double()).nan_to_num(1.0).min())
                        for a, b in zip(maps[name], maps["float32"], strict=True))
        tolerance = args.tolerance * (10 if name == "bf16" else 1)
        rows.append({"precision": name, "largest_score_difference": differences,
                     "least_map_spearman": agreement, "tolerance": tolerance,
                     "passes": max(differences.values()) <= tolerance})
    return {"settings": {k: str(v) for k, v in vars(args).items()}, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--states", type=int, default=6, help="cascade states after the trained model")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest score change allowed (bf16: x10)")
    parser.add_argument("--out", type=Path, default=HERE / "gpu_parity.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["rows"]:
        worst = max(row["largest_score_difference"], key=row["largest_score_difference"].get)
        print(f"{row['precision']:<8} largest score change {row['largest_score_difference'][worst]:.2e} ({worst}), "
              f"maps' least Spearman with float32 {row['least_map_spearman']:.4f}: "
              f"{'within' if row['passes'] else 'OVER'} {row['tolerance']:g}")
    return 0 if all(row["passes"] for row in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
