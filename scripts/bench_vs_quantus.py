"""Speed of sanity's cascading randomization test against Quantus's MPRT, and the floor.

Both tools do the same work in one process, interleaved, ``--reps`` times (min and
median kept): the project's CNN (``PaperCNN``, fixed seeded weights) on ``--images``
digits (28 x 28), its 4 blocks re-initialized from the logits down (fc2, fc1, conv2,
conv1: 5 states with the trained one), every state's maps compared with the trained
model's by Spearman rank correlation of the absolute values, per image. Work items:
gradient, input_x_gradient, integrated_gradients (``--steps``), smoothgrad
(``--samples``), gradcam (at relu2), and the set of all five.

How the work is made the same:

* Blocks and order. Quantus re-initializes every module with ``reset_parameters``,
  last registered first (``layer_order="top_down"``); on this CNN those are exactly
  the 4 blocks, fc2, fc1, conv2, conv1 (checked at start-up). sanity runs with
  ``init="default"``: each block's own ``reset_parameters()``, as Quantus.
* Classes explained: the images' labels, given to both (Quantus explains the given
  label; sanity's default, the current model's argmax, costs one more forward).
* Scores: Quantus with ``abs=True`` and its default ``normalise_by_max``; sanity's
  ``spearman_abs`` with the one-channel rule ``|map| / max``. Both are monotone per
  image, so the ranks, and the Spearman scores, are the same.
* Methods: Quantus's own ``quantus.explain`` for gradient ("Gradient") and
  input_x_gradient; for the others the explain function a user writes around Captum,
  since ``quantus.explain`` fixes IG at 10 steps, has no SmoothGrad, and calls
  ``LayerGradCam`` without its ReLU: ``IntegratedGradients`` with ``--steps`` steps
  and Captum's default rule (Gauss-Legendre; sanity runs ``rule=gausslegendre``),
  ``NoiseTunnel(Saliency)``, ``nt_type="smoothgrad"``, raw gradients, noise std
  0.15 x (max - min) of the batch, and ``LayerGradCam`` at ``relu2`` with
  ``relu_attributions=True``, upsampled bilinearly to 28 x 28.
* Batch sizes: Quantus gets the best of several (``--quantus-batches``, its
  ``batch_size``), picked per item by the least CPU time of one run each before the
  measured repetitions. sanity takes the batch its own ``batch=auto`` measures (the
  smallest batch up to ``--sanity-max-batch`` whose forward + backward per input is
  within 5% of the least; ``sanity_auto_batch`` in the JSON), or with
  ``--sanity-batches 64,128,256`` the best of those, as Quantus.
* The set of five: one sanity call that shares passes; for Quantus, which explains one
  method per MPRT call, the sum of its five calls in the same repetition.
* Quantus's Spearman is its own ``correlation_spearman``; where that fails (a batch
  whose maps are constant on both sides, e.g. all-zero GradCAM maps), the scores of
  that batch are computed image by image (``quantus_spearman``).

An item that takes less CPU time than ``--min-seconds`` (the one-pass methods take about
one second) is run several times (at most ``--max-runs``) in each repetition, each tool
in turn, and the repetition keeps its fastest run (``every_run_s`` in the JSON keeps
them all): a sub-second time is otherwise mostly the machine's noise.

Times are wall clock (min and median) and CPU time of the process (min), which a
loaded machine disturbs less. The floor is the passes the work needs (one forward +
backward per image and state for the one-pass methods, shared by all of them;
``--steps`` for IG, ``--samples`` for SmoothGrad) times the best time of one forward +
backward per image, measured with plain torch over ``--floor-batches``. ``floor /
time`` is the share of the time that went into the passes that cannot be avoided.
The time of one pass is measured again (at the best batch) right before each item's
repetition; the floor uses the least time of one pass seen in all those measurements
(``floors`` in the JSON keeps each), so that a machine that drifts makes the floor lower,
never the tools look better. ``sanity_of_floor`` is the floor over sanity's least time;
``sanity_of_floor_median`` over its median.

Agreement: the two tools' per-image scores on identical model states (sanity's maps
and scores computed on the states Quantus's own randomization produces), as a
Pearson correlation and the largest difference; for SmoothGrad the noise differs.

    python scripts/bench_vs_quantus.py --images 200 --reps 3

Writes ``--out`` (JSON) and the same table as CSV beside it; the last line printed is
``speed-up over quantus: X.Xx; sanity at Y.YY of the floor`` for the set of five.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from sanity_cli import batching
from sanity_cli.data import load_digits
from sanity_cli.methods import explain_all
from sanity_cli.metrics import compare, kept_ranks
from sanity_cli.models import PaperCNN
from sanity_cli.randomization import TrainedWeights, cascading_states, find_blocks

ITEMS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam")
SET = "all_five"
BLOCKS_TOP_DOWN = ["fc2", "fc1", "conv2", "conv1"]
GRADCAM_LAYER = "relu2"
SEED = 0
HERE = Path(__file__).resolve().parent

# {block: (B,) scores}, the randomized states only
Scores = dict[str, np.ndarray]


# --------------------------------------------------------------------------
# the work: model, images, methods
# --------------------------------------------------------------------------


def paper_cnn() -> nn.Module:
    """The project's CNN with fixed seeded weights (the cost does not depend on them)."""
    torch.manual_seed(SEED)
    return PaperCNN(in_channels=1, num_classes=10, image_size=28).eval()


def digits(n: int) -> tuple[Tensor, Tensor]:
    """n digits as (n, 1, 28, 28) inputs in [0, 1] and their (n,) labels; the test split
    first, then the training split when n asks for more."""
    data = load_digits(28, 0.2, SEED)
    x, y = torch.cat([data.test_x, data.train_x]), torch.cat([data.test_y, data.train_y])
    if n > len(x):
        raise SystemExit(f"--images {n}: the digits hold {len(x)} images; ask for fewer")
    return x[:n].contiguous(), y[:n].contiguous()


def sanity_methods(item: str, steps: int, samples: int) -> dict[str, dict]:
    """explain_all's methods for one item (or the set): the options that match Captum's."""
    options = {
        "gradient": {},
        "input_x_gradient": {},
        "integrated_gradients": {"steps": steps, "rule": "gausslegendre"},
        "smoothgrad": {"samples": samples, "noise": 0.15},
        "gradcam": {"layer": GRADCAM_LAYER},
    }
    return options if item == SET else {item: options[item]}


def passes_per_image(item: str, steps: int, samples: int) -> int:
    """Forward + backward passes per image and state that the item cannot do without."""
    own = {"integrated_gradients": steps, "smoothgrad": samples}
    if item == SET:  # gradient, input_x_gradient and gradcam share one pass
        return 1 + steps + samples
    return own.get(item, 1)


# --------------------------------------------------------------------------
# sanity
# --------------------------------------------------------------------------


def sanity_cascade(model: nn.Module, x: Tensor, y: Tensor, methods: dict[str, dict], max_batch: int,
                   parts: dict[str, float] | None = None, blocks: list[str] | None = None) -> dict[str, Scores]:
    """sanity's cascade: {method: {block: (B,) Spearman of |maps|}} for x (B, 1, H, W).

    ``parts``, when given, collects seconds spent randomizing (with finding the blocks
    and keeping the trained weights), explaining and comparing. ``blocks``: names in
    forward order, randomized from the last; None: all of the model's blocks."""
    parts = {} if parts is None else parts
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        parts[part] = parts.get(part, 0.0) + now - clock
        clock = now

    blocks = find_blocks(model, x[:1]) if blocks is None else blocks
    trained = TrainedWeights(model)
    reference: dict[str, Tensor] = {}
    scores: dict[str, Scores] = {name: {} for name in methods}
    states = cascading_states(model, blocks, trained, SEED, init="default")
    lap("randomize")
    with kept_ranks():  # the reference's ranks are ranked once, as in a run
        for state in states:
            lap("randomize")
            maps = explain_all(model, x, y, methods, max_batch=max_batch)
            lap("explain")
            if state.step == 0:
                reference = maps
                continue
            for name, value in maps.items():
                score = compare(reference[name], value, "spearman_abs", single_channel=True)["spearman_abs"]
                scores[name][state.block] = score.cpu().numpy()
            lap("compare")
    lap("randomize")  # the trained weights restored
    return scores


def sanity_on_states(states, x: Tensor, y: Tensor, methods: dict[str, dict],
                     max_batch: int) -> dict[str, Scores]:
    """sanity's maps and scores on given model states: an iterable of (name, model),
    the trained model first."""
    reference: dict[str, Tensor] = {}
    scores: dict[str, Scores] = {name: {} for name in methods}
    with kept_ranks():  # the reference's ranks are ranked once, as in a run
        for step, (name, model) in enumerate(states):
            maps = explain_all(model.eval(), x, y, methods, max_batch=max_batch)
            if step == 0:
                reference = maps
                continue
            for method, value in maps.items():
                score = compare(reference[method], value, "spearman_abs", single_channel=True)["spearman_abs"]
                scores[method][name] = score.cpu().numpy()
    return scores


# --------------------------------------------------------------------------
# Quantus
# --------------------------------------------------------------------------


def on_model(model: nn.Module, inputs: np.ndarray, targets: np.ndarray) -> tuple[Tensor, Tensor]:
    """Quantus's NumPy inputs and targets as tensors on the model's device."""
    device = next(model.parameters()).device
    return torch.as_tensor(inputs, device=device), torch.as_tensor(targets, device=device)


def captum_integrated_gradients(model: nn.Module, inputs: np.ndarray, targets: np.ndarray,
                                n_steps: int = 50, **_) -> np.ndarray:
    """The explain function a Quantus user writes around Captum's IntegratedGradients
    (its defaults: zero baseline, Gauss-Legendre), (B, C, H, W) -> (B, C, H, W)."""
    from captum.attr import IntegratedGradients

    x, target = on_model(model, inputs, targets)
    attribution = IntegratedGradients(model).attribute(x, target=target, n_steps=n_steps)
    return attribution.detach().cpu().numpy()


def captum_smoothgrad(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, nt_samples: int = 50,
                      noise: float = 0.15, **_) -> np.ndarray:
    """SmoothGrad through Captum's NoiseTunnel over raw gradients (Saliency, abs=False),
    noise std ``noise`` x (max - min) of the batch (Captum takes one std per input)."""
    from captum.attr import NoiseTunnel, Saliency

    x, target = on_model(model, inputs, targets)
    std = noise * float(x.max() - x.min())
    attribution = NoiseTunnel(Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=nt_samples, stdevs=std, target=target, abs=False)
    return attribution.detach().cpu().numpy()


def captum_gradcam(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, layer: str = GRADCAM_LAYER,
                   **_) -> np.ndarray:
    """GradCAM as the paper (ReLU of the weighted channel sum) through Captum's
    LayerGradCam, upsampled bilinearly to the input: (B, C, H, W) -> (B, 1, H, W)."""
    from captum.attr import LayerGradCam

    x, target = on_model(model, inputs, targets)
    cam = LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=target, relu_attributions=True)
    return LayerGradCam.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear").detach().cpu().numpy()


def quantus_explainer(item: str, steps: int, samples: int) -> tuple[Callable, dict]:
    """(explain_func, explain_func_kwargs) for Quantus's MPRT."""
    import quantus

    if item == "integrated_gradients":
        return captum_integrated_gradients, {"n_steps": steps}
    if item == "smoothgrad":
        return captum_smoothgrad, {"nt_samples": samples, "noise": 0.15}
    if item == "gradcam":
        return captum_gradcam, {"layer": GRADCAM_LAYER}
    return quantus.explain, {"method": {"gradient": "Gradient", "input_x_gradient": "InputXGradient"}[item]}


def quantus_spearman(a: np.ndarray, b: np.ndarray, batched: bool = False, **kwargs) -> np.ndarray:
    """Quantus's own ``correlation_spearman`` (one scipy call on the 2B x 2B matrix of
    the batch), then, where that call gives up, one scipy call per image.

    When maps of both sides of a batch are constant (GradCAM of a randomized model:
    all zero after its ReLU), scipy returns a single NaN for the whole batch and
    Quantus fails on it; per image, only the constant maps' scores are NaN."""
    from quantus.functions.similarity_func import correlation_spearman
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns for each constant map
        try:
            return correlation_spearman(a, b, batched=batched, **kwargs)
        except AttributeError:  # scipy's single float: 'float' object has no attribute 'shape'
            return np.array([spearmanr(row_a, row_b)[0] for row_a, row_b in zip(a, b, strict=True)])


def quantus_mprt(model: nn.Module, x: np.ndarray, y: np.ndarray, item: str, steps: int, samples: int,
                 batch_size: int) -> Scores:
    """Quantus's MPRT: {layer: (B,) scores}, the randomized states only."""
    import quantus

    explain_func, kwargs = quantus_explainer(item, steps, samples)
    metric = quantus.MPRT(similarity_func=quantus_spearman, layer_order="top_down", seed=SEED, abs=True,
                          normalise=True, disable_warnings=True, display_progressbar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func,
                        explain_func_kwargs=kwargs, device=str(next(model.parameters()).device),
                        batch_size=batch_size, channel_first=True)
    return {layer: np.asarray(values, dtype=float) for layer, values in scores.items() if layer != "original"}


def quantus_states(model: nn.Module):
    """(name, model) of the trained model, then of each state of Quantus's own cascade."""
    from quantus.helpers.model.pytorch_model import PyTorchModel

    yield "original", model
    yield from PyTorchModel(model, channel_first=True).get_random_layer_generator(order="top_down", seed=SEED)


def check_same_blocks(model: nn.Module, x: Tensor) -> None:
    """Quantus's cascade and sanity's must randomize the same 4 blocks in the same order."""
    from quantus.helpers.model.pytorch_model import PyTorchModel

    quantus_order = [name for name, _ in PyTorchModel(model, channel_first=True).get_random_layer_generator()]
    sanity_order = list(reversed(find_blocks(model, x[:1])))
    if not quantus_order == sanity_order == BLOCKS_TOP_DOWN:
        raise SystemExit(f"blocks differ: quantus {quantus_order}, sanity {sanity_order}")


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------


class Timing(NamedTuple):
    """Seconds of one run: wall clock, and the process's CPU time (steadier on a
    loaded machine, and equal to the wall time on a quiet one with one thread)."""

    wall: float
    cpu: float


def timed(run: Callable[[], object]) -> tuple[Timing, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), result


def floor_per_pass(model: nn.Module, x: Tensor, batch_sizes: list[int], reps: int, samples: int = 2048) -> dict:
    """The best time of one forward + backward per image, over ``batch_sizes``, with
    plain torch (the gradient of each image's target logit with respect to the input),
    timed over about ``samples`` images: {"wall": (batch, seconds), "cpu": (batch, seconds)}."""
    best = {"wall": (0, math.inf), "cpu": (0, math.inf)}
    for batch in batch_sizes:
        inputs = x.repeat(math.ceil(batch / len(x)), 1, 1, 1)[:batch]
        target = torch.zeros(batch, dtype=torch.long, device=x.device)
        n_batches = max(1, samples // batch)

        def passes() -> None:
            for _ in range(n_batches):
                leaf = inputs.detach().requires_grad_(True)
                torch.autograd.grad(model(leaf).gather(1, target[:, None]).sum(), leaf)
            if x.device.type == "cuda":  # the time of the work, not of queueing it
                torch.cuda.synchronize(x.device)

        passes()  # warm-up
        runs = [timed(passes)[0] for _ in range(reps)]
        for clock in best:
            seconds = min(getattr(run, clock) for run in runs) / (n_batches * batch)
            if seconds < best[clock][1]:
                best[clock] = (batch, seconds)
    return best


def best_batch(run: Callable[[int], object], candidates: list[int]) -> tuple[int, dict[int, float]]:
    """The candidate batch size of the least CPU time in one run each, and every candidate's time."""
    times = {batch: timed(lambda batch=batch: run(batch))[0].cpu for batch in candidates}
    return min(times, key=times.get), times


def agreement(quantus_scores: Scores, sanity_scores: Scores) -> dict:
    """Pearson correlation and largest difference of per-image scores over all states,
    where both are defined, and each tool's mean score per state."""
    a = np.concatenate([quantus_scores[block] for block in BLOCKS_TOP_DOWN])
    b = np.concatenate([sanity_scores[block] for block in BLOCKS_TOP_DOWN])
    both = np.isfinite(a) & np.isfinite(b)
    return {"correlation": float(np.corrcoef(a[both], b[both])[0, 1]),
            "max_abs_difference": float(np.abs(a[both] - b[both]).max()),
            "n_scores": int(both.sum()), "n_undefined": int((~both).sum()),
            "mean_by_state": {block: {"quantus": float(np.nanmean(quantus_scores[block])),
                                      "sanity": float(np.nanmean(sanity_scores[block]))}
                              for block in BLOCKS_TOP_DOWN}}


def quantus_profile(run: Callable[[], object]) -> dict[str, float]:
    """Where one Quantus run spends its time: cumulative seconds of its main parts
    (under the profiler, so slower than unprofiled)."""
    profile = cProfile.Profile()
    profile.runcall(run)
    stats = pstats.Stats(profile).stats  # {(file, line, function): (cc, nc, tottime, cumtime, callers)}
    parts = {"explain (Captum, model passes)": "explain_batch", "Spearman (scipy, 2B x 2B matrix)":
             "correlation_spearman", "copying the model": "deepcopy", "re-initializing": "reset_parameters"}
    total = max(entry[3] for entry in stats.values())
    found = {label: sum(entry[3] for (_, _, function), entry in stats.items() if function == name
                        and not any(caller[2] == name for caller in entry[4]))
             for label, name in parts.items()}
    return {"total": total, **found}


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    """The model, the images and both tools' runs of one item at a batch size."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = paper_cnn().to(args.device)
        self.x, self.y = (t.to(args.device) for t in digits(args.images))
        check_same_blocks(self.model, self.x)
        self.auto_batch: dict | None = None  # what batch=auto measured, with --sanity-batches auto

    def sanity(self, item: str, batch: int, parts: dict[str, float] | None = None) -> dict[str, Scores]:
        methods = sanity_methods(item, self.args.steps, self.args.samples)
        return sanity_cascade(self.model, self.x, self.y, methods, batch, parts)

    def quantus(self, item: str, batch: int) -> Scores:
        return quantus_mprt(self.model, self.x.cpu().numpy(), self.y.cpu().numpy(), item, self.args.steps,
                            self.args.samples, batch)

    def agreement(self, item: str, quantus_scores: Scores, batch: int) -> dict:
        methods = sanity_methods(item, self.args.steps, self.args.samples)
        on_states = sanity_on_states(quantus_states(self.model), self.x, self.y, methods, batch)
        return agreement(quantus_scores, on_states[item])


def sanity_batches(bench: Bench, args: argparse.Namespace) -> dict[str, tuple[int, dict[int, float]]]:
    """sanity's batch per item and the CPU time of one run at each batch tried: with
    ``--sanity-batches auto``, the batch that sanity's own measurement (``batch=auto``,
    sanity_cli.batching) picks up to ``--sanity-max-batch``, one for all items; else the
    candidate of the least CPU time, per item."""
    if args.sanity_batches != "auto":
        return {item: best_batch(lambda b, item=item: bench.sanity(item, b), args.sanity_batches)
                for item in args.items}
    batch, per_input = batching.measure(bench.model, bench.x[:1], args.sanity_max_batch)
    log(f"sanity batch=auto: {batch} (seconds per input and pass: "
        + ", ".join(f"{b}: {t:.2e}" for b, t in per_input.items()) + ")")
    bench.auto_batch = {"batch": batch, "seconds_per_input": per_input}
    return {item: (batch, {batch: timed(lambda item=item: bench.sanity(item, batch))[0].cpu})
            for item in args.items}


def measure(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    items = [item for item in args.items if item != SET]
    floor = floor_per_pass(bench.model, bench.x, args.floor_batches, args.reps, args.floor_samples)
    log(f"floor: {1e3 * floor['wall'][1]:.3f} ms wall, {1e3 * floor['cpu'][1]:.3f} ms CPU per forward + "
        f"backward and image")
    tuning = {"sanity": sanity_batches(bench, args),
              "quantus": {item: best_batch(lambda b, item=item: bench.quantus(item, b), args.quantus_batches)
                          for item in items}}
    log(f"batch sizes: {tuning}")
    times: dict[str, dict[str, list[Timing]]] = {"sanity": {i: [] for i in args.items},
                                                  "quantus": {i: [] for i in items}}
    every: dict[str, dict[str, list[Timing]]] = {tool: {i: [] for i in by_item} for tool, by_item in times.items()}
    # Sub-second items are the noisiest: each repetition of one runs it (and Quantus's
    # counterpart) enough times to last --min-seconds, and keeps the fastest of those runs.
    runs = {item: min(args.max_runs, max(1, math.ceil(args.min_seconds / min(tuning["sanity"][item][1].values()))))
            for item in args.items}
    parts: dict[str, dict[str, float]] = {item: {} for item in args.items}
    quantus_scores: dict[str, Scores] = {}
    floors: dict[str, list[dict]] = {item: [] for item in args.items}  # measured before each repetition
    for rep in range(args.reps):
        for item in args.items:  # interleaved: each item by both tools in turn
            floors[item].append(floor_per_pass(bench.model, bench.x, [floor["wall"][0]], 1, args.floor_samples))
            best: dict[str, Timing] = {}
            for _ in range(runs[item]):  # a short item runs several times, each tool in turn
                rep_parts: dict[str, float] = {}
                timing, _ = timed(lambda: bench.sanity(item, tuning["sanity"][item][0], rep_parts))
                every["sanity"][item].append(timing)
                if timing.wall <= min(t.wall for t in every["sanity"][item]):
                    parts[item] = rep_parts  # where the time went in the fastest run
                best["sanity"] = min(best.get("sanity", timing), timing, key=lambda t: t.wall)
                if item in items:
                    timing, quantus_scores[item] = timed(lambda: bench.quantus(item, tuning["quantus"][item][0]))
                    every["quantus"][item].append(timing)
                    best["quantus"] = min(best.get("quantus", timing), timing, key=lambda t: t.wall)
            for tool, timing in best.items():
                times[tool][item].append(timing)
        log(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{item} {times['sanity'][item][-1].wall:.2f}s"
            + (f" / quantus {times['quantus'][item][-1].wall:.2f}s" if item in items else "") for item in args.items))
    if SET in args.items and set(ITEMS) <= set(items):
        # Quantus has no shared passes: the set is its five MPRT calls, one per method.
        times["quantus"][SET] = [Timing(*(sum(getattr(times["quantus"][i][rep], clock) for i in ITEMS)
                                          for clock in Timing._fields)) for rep in range(args.reps)]
    agreements = {item: bench.agreement(item, quantus_scores[item], tuning["sanity"][item][0]) for item in items}
    profile = quantus_profile(lambda: bench.quantus("gradient", tuning["quantus"]["gradient"][0])) \
        if "gradient" in items else {}
    least = {clock: min([floor[clock], *(f[clock] for fs in floors.values() for f in fs)], key=lambda b: b[1])
             for clock in ("wall", "cpu")}  # the best time of one pass seen in the whole run
    rows = [table_row(item, args, least, times, tuning, agreements) for item in args.items]
    return {"machine": machine(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "floor": least, "floor_at_start": floor, "floors": floors, "tuning": tuning, "agreement": agreements,
            "sanity_parts_s": parts, "quantus_profile_s": profile, "sanity_auto_batch": bench.auto_batch,
            "runs_per_repetition": runs,
            "times_s": {tool: {item: [t._asdict() for t in kept] for item, kept in by_item.items()}
                        for tool, by_item in times.items()},
            "every_run_s": {tool: {item: [t._asdict() for t in kept] for item, kept in by_item.items()}
                            for tool, by_item in every.items()},
            "rows": rows}


def table_row(item: str, args: argparse.Namespace, floor: dict, times: dict, tuning: dict,
              agreements: dict) -> dict:
    """One item's line: min and median times, the floor (`floor_per_pass`'s best times of
    one pass) and each tool's share of it."""
    work = passes_per_image(item, args.steps, args.samples) * args.images * (len(BLOCKS_TOP_DOWN) + 1)
    row: dict = {"item": item, "passes": work, "floor_s": work * floor["wall"][1],
                 "floor_cpu_s": work * floor["cpu"][1]}
    for tool in ("sanity", "quantus"):
        runs = times[tool].get(item)
        if not runs:
            continue
        row[f"{tool}_batch"] = tuning[tool][item][0] if item in tuning[tool] else tuning[tool]["gradient"][0]
        row[f"{tool}_min_s"] = min(t.wall for t in runs)
        row[f"{tool}_median_s"] = statistics.median(t.wall for t in runs)
        row[f"{tool}_min_cpu_s"] = min(t.cpu for t in runs)
        row[f"{tool}_of_floor"] = row["floor_s"] / row[f"{tool}_min_s"]
        row[f"{tool}_of_floor_median"] = row["floor_s"] / row[f"{tool}_median_s"]
        row[f"{tool}_of_floor_cpu"] = row["floor_cpu_s"] / row[f"{tool}_min_cpu_s"]
    if "quantus_min_s" in row:
        row["speed_up"] = row["quantus_min_s"] / row["sanity_min_s"]
        row["speed_up_cpu"] = row["quantus_min_cpu_s"] / row["sanity_min_cpu_s"]
    if item in agreements:
        row["agreement"] = agreements[item]["correlation"]
        row["max_abs_difference"] = agreements[item]["max_abs_difference"]
    return row


def machine() -> dict:
    import quantus

    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "quantus": quantus.__version__,
            "load_average": os.getloadavg()}


def print_table(result: dict) -> None:
    columns = [("item", "item", "", 22), ("sanity s", "sanity_min_s", ".2f", 10),
               ("quantus s", "quantus_min_s", ".2f", 11), ("speed-up", "speed_up", ".2f", 10),
               ("floor s", "floor_s", ".2f", 9), ("sanity/floor", "sanity_of_floor", ".2f", 14),
               ("quantus/floor", "quantus_of_floor", ".2f", 15), ("(CPU)", "sanity_of_floor_cpu", ".2f", 7),
               ("(CPU)", "quantus_of_floor_cpu", ".2f", 7), ("agreement", "agreement", ".4f", 11)]
    print("".join(f"{title:<{width}}" if key == "item" else f"{title:>{width}}" for title, key, _, width in columns))
    for row in result["rows"]:
        print("".join(f"{row[key]:<{width}}" if key == "item" else
                      f"{row[key]:>{width}{fmt}}" if key in row else f"{'-':>{width}}"
                      for _, key, fmt, width in columns))


def write(result: dict, out: Path) -> None:
    out.write_text(json.dumps(result, indent=1) + "\n")
    keys = list(dict.fromkeys(key for row in result["rows"] for key in row))
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result["rows"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3, help="measured repetitions (min and median kept)")
    parser.add_argument("--min-seconds", type=float, default=5.0,
                        help="an item taking less CPU time than this runs several times per repetition, "
                             "the fastest kept")
    parser.add_argument("--max-runs", type=int, default=10, help="at most this many runs per item and repetition")
    parser.add_argument("--steps", type=int, default=50, help="Integrated Gradients steps")
    parser.add_argument("--samples", type=int, default=50, help="SmoothGrad samples")
    parser.add_argument("--items", type=lambda t: t.split(","), default=[*ITEMS, SET],
                        help=f"comma-separated, of {', '.join([*ITEMS, SET])}")
    parser.add_argument("--sanity-batches", type=lambda t: t if t == "auto" else ints(t), default="auto",
                        help="sanity max_batch candidates, or auto: the batch sanity's batch=auto measures")
    parser.add_argument("--sanity-max-batch", type=int, default=512, help="the most that batch=auto may pick")
    parser.add_argument("--quantus-batches", type=ints, default=[32, 64, 128, 200],
                        help="Quantus batch_size candidates")
    parser.add_argument("--floor-batches", type=ints, default=[32, 64, 128, 256, 512])
    parser.add_argument("--floor-samples", type=int, default=2048, help="images per timing of the floor")
    parser.add_argument("--device", default="cpu", help="where both tools run the model (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=HERE / "bench_vs_quantus.json")
    args = parser.parse_args(argv)
    unknown = set(args.items) - {*ITEMS, SET}
    if unknown:
        parser.error(f"unknown items {sorted(unknown)}; choose from {', '.join([*ITEMS, SET])}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(SEED)
    result = measure(args)
    write(result, args.out)
    print_table(result)
    by_item = {row["item"]: row for row in result["rows"]}
    if "speed_up" in by_item.get(SET, {}):
        row = by_item[SET]
        print(f"speed-up over quantus: {row['speed_up']:.1f}x; sanity at {row['sanity_of_floor']:.2f} of the floor")


if __name__ == "__main__":
    main()
