"""The state loop: every condition of a check explained, scored against its reference, stored.

For each randomization seed, each condition (a model state) is explained and scored
`image_chunk` images at a time: `explain_chunk` makes a chunk's maps, `score_chunk`
(score.py) compares them with the reference state's and writes the chunk's rows, and the state's
line in states.csv follows its last chunk. States a resumed run already has are skipped;
step 0 is explained again all the same, as the reference of the others. With more than
one chunk the reference maps wait on disk (`ReferenceMaps`), so that memory holds one
chunk's maps whatever n_images; every image's maps and scores are the same whatever the
chunks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from sanity_cli import checks
from sanity_cli.errors import SanityError
from sanity_cli.finite import check_logits, check_maps
from sanity_cli.metrics import kept_ranks
from sanity_cli.pipeline.explain import Explainer, explainer, logits_of
from sanity_cli.pipeline.finish import record_signal
from sanity_cli.pipeline.plan import RunPlan
from sanity_cli.pipeline.prepare import Prepared
from sanity_cli.pipeline.reference import ReferenceMaps, image_chunks
from sanity_cli.pipeline.score import score_chunk
from sanity_cli.randomization import TrainedWeights
from sanity_cli.runstore import RunStore
from sanity_cli.settings import Settings
from sanity_cli.signal import figures_by_method, join_figures
from sanity_cli.training import progress_disabled


class Clock:
    """Seconds spent per phase of a run: `with clock("explain"): ...` adds that block's
    wall-clock time once the device's queued work is done (GPU kernels run asynchronously)."""

    def __init__(self, device: torch.device, seconds: Mapping[str, float] = ()):
        self.device, self.seconds = device, dict(seconds)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        tick = _now(self.device)
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + _now(self.device) - tick


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Run:
    """What every state of one run shares."""

    settings: Settings
    plan: RunPlan
    check: checks.Check
    prepared: Prepared
    store: RunStore
    clock: Clock


@dataclass
class SeedPass:
    """One randomization seed's pass over the conditions: the image chunks, the maps its
    states are compared with, and the explainer of its states."""

    seed: int
    chunks: list[slice]
    reference: ReferenceMaps
    explain: Explainer


@dataclass
class Chunk:
    """One image chunk of one state, explained: `part` of the run's images (as explained, with a
    check's inputs), the classes explained, the model's predictions, the maps and the state's own scores."""

    index: int
    part: slice
    ids: Tensor          # (B,) the images' ids, on the device
    images: Tensor       # (B, C, H, W)
    predicted: Tensor    # (B,)
    targets: Tensor      # (B,)
    maps: dict[str, Tensor] = field(default_factory=dict)       # method -> (B, C, H, W)
    measured: dict[str, Tensor] = field(default_factory=dict)   # metric -> (B,), Condition.transform's


def run_states(run: Run, subject: checks.Subject, trained: TrainedWeights) -> None:
    """Every seed's conditions of the check, explained, scored and stored."""
    model = run.prepared.models["trained"].model
    for seed in run.plan.seeds:
        conditions = tqdm(run.check.conditions(subject, seed), total=run.check.n_states(subject),
                          desc=f"{run.settings.test.name} (seed {seed})", unit="state", disable=progress_disabled())
        with explainer(run.settings, run.plan, seed, model, trained) as explain:
            run_conditions(run, conditions, seed, explain)


def run_conditions(run: Run, conditions: Iterable[checks.Condition], seed: int, explain: Explainer) -> None:
    """One seed's conditions, each state stored as soon as it is scored. The reference maps'
    ranks are kept between the states that compare with them (`metrics.kept_ranks`)."""
    chunks = image_chunks(len(run.prepared.images), run.settings.image_chunk)
    with ReferenceMaps(run.store.run_dir, in_memory=len(chunks) == 1) as reference, kept_ranks():
        for condition in conditions:
            run_state(run, SeedPass(seed, chunks, reference, explain), condition)


def run_state(run: Run, sweep: SeedPass, condition: checks.Condition) -> None:
    """One condition, chunk by chunk; skipped when a resumed run has it and no later state needs its maps."""
    seed, step, block = sweep.seed, condition.state.step, condition.state.block
    scored = not run.store.done(seed, step)
    if step > 0 and not scored and not condition.kept:
        return
    signal = step == 0 and seed == run.plan.seeds[0]
    examples: dict[str, Tensor] = {}
    predictions, figures = [], []
    with sweep.explain.state(condition.model):
        for index, part in enumerate(sweep.chunks):
            chunk = explain_chunk(run, sweep, condition, index, part)
            predictions.append(chunk.predicted)
            _add_examples(examples, chunk.maps, run.settings.n_examples)
            if signal:
                figures.append(figures_by_method(chunk.maps, run.prepared.display[part].to(run.plan.device),
                                                 seed=run.settings.seed, positions=torch.arange(part.start, part.stop)))
            if step == 0 or condition.kept:
                sweep.reference.put(index, chunk.maps, step)
            if scored:
                score_chunk(run, sweep, condition, chunk)
    if signal:
        record_signal(run.plan, join_figures(figures), run.store.run_dir)
    if scored:
        run.store.finish_state(seed, step, block, examples,
                               receipt(condition, torch.cat(predictions), run.prepared.labels))


def explain_chunk(run: Run, sweep: SeedPass, condition: checks.Condition, index: int, part: slice) -> Chunk:
    """The maps of one chunk in one state: the methods', step 0's (a condition that is not
    explained again), or a known map standing for every method's; then the check's transform."""
    prepared, device, seed, step = run.prepared, run.plan.device, sweep.seed, condition.state.step
    ids, images = prepared.image_ids[part].to(device), prepared.images[part]
    if condition.inputs is not None:
        images = prepared.spec.normalize(condition.inputs(prepared.display[part].to(device), ids))
    state = f"seed {seed}, step {step}: {condition.state.block}"
    predicted = _predicted(condition.model, images, run.plan.max_batch, run.settings.model.name, state)
    chunk = Chunk(index, part, ids, images, predicted, _targets(run.settings.target, condition, prepared, predicted,
                                                                part, ids))
    with run.clock("explain"):
        if not condition.explain and step > 0:  # the same maps as step 0's, measured otherwise
            chunk.maps = sweep.reference.get(index, device)
        elif condition.truth is not None:  # a known map stands for every method's
            chunk.maps = dict.fromkeys(run.plan.methods, condition.truth(prepared.display[part].to(device), ids))
        else:
            with sweep.explain.chunk(step, index, ids) as methods:
                chunk.maps = run.check.maps(methods, condition.model, images, chunk.targets, seed,
                                            run.settings.test, ids)
        if condition.transform is not None:
            chunk.maps, chunk.measured = condition.transform(chunk.maps, images, ids)
    check_maps(chunk.maps, state)
    return chunk


def _predicted(model: nn.Module, images: Tensor, max_batch: int, name: str, state: str) -> Tensor:
    """The (B,) classes that `model` predicts for the (B, C, H, W) images; SanityError
    naming the model and the state when its logits are not finite."""
    with torch.no_grad():
        logits = torch.cat([logits_of(model, chunk) for chunk in images.split(max_batch)])
    check_logits(logits, name, state)
    return logits.argmax(dim=1)


def _targets(choice: str, condition: checks.Condition, prepared: Prepared, predicted: Tensor, part: slice,
             ids: Tensor) -> Tensor:
    """The class explained for each image of `part` (`ids` its images' ids): the current
    model's argmax (the paper, given as `predicted`), the true label, or the trained
    model's prediction; then the check's own choice."""
    if choice == "predicted":
        targets = predicted
    elif choice == "original":
        targets = prepared.original[part]
    elif (prepared.labels < 0).any():
        raise SanityError("target=label but the dataset has no labels; use target=predicted")
    else:
        targets = prepared.labels[part].to(prepared.original.device)
    return condition.retarget(targets, ids) if condition.retarget else targets


def _add_examples(kept: dict[str, Tensor], maps: dict[str, Tensor], n: int) -> None:
    """Keep the maps of the run's first `n` images (the examples), a chunk at a time."""
    for name, value in maps.items():
        have = kept.get(name)
        if have is None:
            kept[name] = value[:n].detach().cpu()
        elif len(have) < n:
            kept[name] = torch.cat([have, value[:n - len(have)].detach().cpu()])


def receipt(condition: checks.Condition, predicted: Tensor, labels: Tensor) -> dict:
    """What a user can check of a state: the explained model's accuracy on the chosen
    images (NaN without labels), a short fingerprint of its weights, and the share of
    its parameters that the state re-initialized (randomization checks only)."""
    labelled = labels >= 0
    hits = predicted.cpu()[labelled] == labels[labelled]
    state = condition.state
    return {"accuracy": hits.float().mean().item() if labelled.any() else float("nan"),
            "weights": TrainedWeights.fingerprint(condition.model.state_dict())[:12],
            "params_randomized": getattr(state, "params_randomized", None),
            "tensors_left_trained": getattr(state, "tensors_left_trained", None)}
