"""Benchmark the shared plan of sanity_cli.methods against each method run alone.

Runs the paper's method set on the paper's MNIST CNN (random weights: the cost does
not depend on them) with a batch of random 1 x 28 x 28 inputs, and prints

* the forward and backward passes of one ``explain_all`` call (the shared plan) and
  the sum over the methods run one by one, in batched calls and in samples;
* the wall time per image per model state: one ``explain_all`` call on the batch
  (the work a sanity check repeats for every randomized model), divided by the
  batch size; and the same for the methods run one by one.

    python scripts/bench_methods.py --device cpu --batch 64
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from sanity_cli.methods import PassCount, count_passes, explain_all


def paper_methods() -> dict[str, dict]:
    """The methods and options of the default run: the `paper` preset on the CNN."""
    from hydra import compose, initialize_config_dir

    from sanity_cli.cli import config_dir
    from sanity_cli.pipeline import method_options, selected_methods
    from sanity_cli.settings import Settings

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        settings = Settings.from_config(compose(config_name="config", overrides=["method=paper", "model=cnn"]))
    return method_options(selected_methods(settings), settings.seed, settings.model.gradcam_layer)


def paper_cnn() -> nn.Module:
    """The project's PaperCNN (sanity_cli.models) on 1 x 28 x 28 inputs."""
    from sanity_cli.models import PaperCNN

    return PaperCNN(in_channels=1, num_classes=10, image_size=28)


def _timed(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _measure(
    run: Callable[[], object], device: torch.device, repeats: int
) -> tuple[PassCount, float]:
    """Passes of one run and its best wall time over ``repeats`` (after a warm-up)."""
    with count_passes() as passes:
        run()
    return passes, min(_timed(run, device) for _ in range(repeats))


def _row(label: str, passes: PassCount, seconds: float, batch: int) -> str:
    return (
        f"{label:<30} {passes.forward_calls:>11} {passes.forward_samples:>11} "
        f"{passes.backward_calls:>11} {passes.backward_samples:>11} {1e3 * seconds / batch:>11.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    parser.add_argument("--batch", type=int, default=64, help="images per explain_all call")
    parser.add_argument("--max-batch", type=int, default=64, help="most inputs in one forward")
    parser.add_argument("--gradcam-layer", default="conv2", help="GradCAM layer of the CNN")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    args = parser.parse_args()

    device_name = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = paper_cnn().to(device).eval()
    x = torch.rand(args.batch, 1, 28, 28, device=device)
    methods = {name: dict(options) for name, options in paper_methods().items()}
    for name in ("gradcam", "guided_gradcam"):
        methods[name]["layer"] = args.gradcam_layer

    def shared() -> object:
        return explain_all(model, x, "predicted", methods, max_batch=args.max_batch)

    def alone(name: str) -> Callable[[], object]:
        return lambda: explain_all(
            model, x, "predicted", {name: methods[name]}, max_batch=args.max_batch
        )

    shared_passes, shared_seconds = _measure(shared, device, args.repeats)
    alone_results = {name: _measure(alone(name), device, args.repeats) for name in methods}
    alone_passes = sum((passes for passes, _ in alone_results.values()), PassCount())
    alone_seconds = sum(seconds for _, seconds in alone_results.values())

    print(
        f"PaperCNN, batch {args.batch} x 1 x 28 x 28, max_batch {args.max_batch}, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    header = ("plan", "fwd calls", "fwd samples", "bwd calls", "bwd samples", "ms / image")
    print(f"{header[0]:<30} " + " ".join(f"{name:>11}" for name in header[1:]))
    for name, (passes, seconds) in alone_results.items():
        print(_row(f"  {name} alone", passes, seconds, args.batch))
    print(_row("sum of methods alone", alone_passes, alone_seconds, args.batch))
    print(_row("shared (explain_all)", shared_passes, shared_seconds, args.batch))
    print(f"speed-up of the shared plan: {alone_seconds / shared_seconds:.2f}x "
          f"({1e3 * shared_seconds / args.batch:.2f} ms per image per model state)")  # fmt: skip


if __name__ == "__main__":
    main()
