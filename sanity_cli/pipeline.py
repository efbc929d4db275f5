"""One experiment, top to bottom: data, model, conditions to explain, maps, scores, results.

`run(cfg, run_dir)` is the whole run as a plain function; the CLI is a thin Hydra
wrapper around it and tests call it directly with composed configs.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from tqdm import tqdm

from sanity_cli import checks, plugins
from sanity_cli import data as datasets
from sanity_cli.batching import chosen_batch
from sanity_cli.errors import SanityError
from sanity_cli.methods import explain_all
from sanity_cli.methods.external import explain_external, is_external, preflight_external
from sanity_cli.finite import check_images, check_logits, check_maps
from sanity_cli.methods.gradients import logits_of
from sanity_cli.metrics import compare
from sanity_cli.models import (TRAINABLE_KINDS, InputSpec, build_model, check_torchscript, default_gradcam_layer,
                               input_spec)
from sanity_cli.methods.preflight import preflight
from sanity_cli.randomization import TrainedWeights, plan_blocks
from sanity_cli.metrics import NORMALIZATIONS
from sanity_cli.report import write_report
from sanity_cli.reuse import ActivationReuse
from sanity_cli.results import RunStore, read_results, settings_for_fingerprint, state_rows
from sanity_cli.verdict import robustness_scores, write_verdicts
from sanity_cli.rundir import replace_atomically, writing
from sanity_cli.sharding import parse_shard, shard_images
from sanity_cli.signal import figures_by_method, join_figures, table_of, uninformative
from sanity_cli.training import TrainedModel, progress_disabled, shuffled_labels, train_or_load
from sanity_cli.validation import run_seeds, validate

log = logging.getLogger(__name__)
CONTROLS = ("edge", "random")
GRADCAM_FAMILY = ("gradcam", "guided_gradcam")
UNDEFINED_HINTS = {"hog": " (the maps are smaller than one HOG block); lower metrics.hog.pixels_per_cell, e.g. to 4",
                   "ssim": " (the maps are smaller than the SSIM window); lower metrics.ssim.sigma"}


@dataclass
class Prepared:
    """The models and the test images they are explained on (normalized, on the device)."""

    models: dict[str, TrainedModel]  # "trained", and "shuffled" for the data test
    spec: InputSpec
    images: Tensor       # (B, C, H, W) model inputs
    display: Tensor      # (B, C, H, W) the same images in [0, 1], for figures
    labels: Tensor       # (B,) true labels, -1 where the dataset has none
    image_ids: Tensor    # (B,) indices into the dataset's test split
    classes: list[str]
    num_outputs: int     # the model's logits per image
    original: Tensor     # (B,) the trained model's predicted classes


@dataclass
class RunResult:
    """What a run leaves in its directory, also returned for callers in Python."""

    run_dir: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    figures: list[Path]
    timing: dict[str, float] = field(default_factory=dict)
    verdict: pd.DataFrame | None = None   # verdict.csv: one row per check, method and metric
    report: Path | None = None            # report.html


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one; cpu; cuda (an error when there is no GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SanityError("device=cuda but no GPU is visible; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise SanityError(f"unknown device '{name}'; choose auto, cpu or cuda")
    return torch.device(name)


def run(cfg: DictConfig, run_dir: str | Path) -> RunResult:
    """Run the check that `cfg` describes and write its results into `run_dir`."""
    started = time.perf_counter()
    validate(cfg)
    device = resolve_device(cfg.device)
    with RunStore(Path(run_dir), settings_for_fingerprint(cfg, device), resume=cfg.resume) as store, \
            store.recording_warnings():
        torch.manual_seed(cfg.seed)
        prepared = prepare(cfg, device)
        return execute(cfg, prepared, store, started, prepared_s=time.perf_counter() - started)


def execute(cfg: DictConfig, prepared: Prepared, store: RunStore, started: float | None = None,
            prepared_s: float | None = None) -> RunResult:
    """The check that `cfg.test` names, on prepared models and images, into `store`.
    prepared_s: the seconds that loading the data and training (or loading) the models took."""
    with store.recording_warnings():
        return _execute(cfg, prepared, store, started, prepared_s)


def _execute(cfg: DictConfig, prepared: Prepared, store: RunStore, started: float | None,
             prepared_s: float | None) -> RunResult:
    started = time.perf_counter() if started is None else started
    check = checks.get(cfg.test.name)
    if check.targets is not None and cfg.target not in check.targets:
        raise SanityError(f"test={cfg.test.name} explains target={' or '.join(check.targets)}, not "
                          f"target={cfg.target}; drop the target setting")
    model = prepared.models["trained"].model
    check_torchscript(model, cfg.test.name, check.randomizes_model, method_options(cfg))
    blocks = plan_blocks(model, prepared.images[:1], cfg.test.granularity) if check.randomizes_model else []
    if cfg.model.kind == "custom" and not cfg.model.get("gradcam_layer"):
        with open_dict(cfg):
            cfg.model.gradcam_layer = default_gradcam_layer(model, prepared.images[:1])
    check_model_fit(cfg, prepared)
    if not isinstance(model, torch.jit.ScriptModule):  # its census needs hooks; check_torchscript did its part
        preflight(model, method_options(cfg), prepared.images[:1])
    for key, options in method_options(cfg).items():  # plugged methods: tried once before any work
        if is_external(options.get("method") or key):
            preflight_external(model, key, options, prepared.images, prepared.original)
    if cfg.get("batch", "fixed") == "auto":  # the run's passes then take the measured batch
        with open_dict(cfg):
            cfg.max_batch = chosen_batch(model, prepared.images[:1], cfg.max_batch, cfg.cache_dir)
    trained = TrainedWeights(model)
    subject = checks.Subject(cfg.test, {name: m.model for name, m in prepared.models.items()},
                             prepared.num_outputs, blocks, trained)
    check.check_fit(subject)
    size = tuple(prepared.images.shape[-2:])
    if hog_left_out(cfg, size):
        log.info("hog left out: the %dx%d maps are smaller than one HOG block (%d pixels); lower "
                 "metrics.hog.pixels_per_cell to compute it", *size,
                 cfg.metrics.hog.pixels_per_cell * cfg.metrics.hog.cells_per_block)
    store.record_models({name: (m.train_accuracy, m.test_accuracy) for name, m in prepared.models.items()},
                        {name: {"source": m.source, "outputs": prepared.num_outputs}
                         for name, m in prepared.models.items()})
    store.record_states_expected(check.n_states(subject) * len(_seeds(cfg)))
    clock = {"data and models": prepared_s} if prepared_s is not None else {}
    clock.update({"explain": 0.0, "compare": 0.0})
    for seed in _seeds(cfg):
        conditions = tqdm(check.conditions(subject, seed), total=check.n_states(subject),
                          desc=f"{cfg.test.name} (seed {seed})", unit="state", disable=progress_disabled())
        reuse = ActivationReuse(model, blocks, trained.state, cfg.reuse_activations * 2**20)
        run_conditions(cfg, check, prepared, conditions, seed, store, clock, reuse)
        reuse.clear()
    trained.check(model)
    clock["total"] = time.perf_counter() - started
    store.record_timing(clock)
    store.write_examples(prepared.display[: cfg.n_examples], _meta(cfg, prepared))
    log.info("time: %.1fs in all, %.1fs explaining, %.1fs comparing", clock["total"], clock["explain"],
             clock["compare"])
    result = finish(store.run_dir, clock)
    store.record_warnings()
    result.verdict = write_verdicts(store.run_dir)
    result.report = write_report(store.run_dir)
    return result


def run_conditions(cfg: DictConfig, check: checks.Check, prepared: Prepared, conditions, seed: int,
                   store: RunStore, clock: dict[str, float], reuse: ActivationReuse) -> None:
    """Explain every condition, score it against the first (step 0), and store each
    state as soon as it is scored. States a resumed run already has are skipped;
    step 0 is explained again all the same, as the reference of the others.

    The images go through each state `image_chunk` at a time: a chunk's rows are
    written as soon as it is scored, and with more than one chunk step 0's maps wait
    on disk (`ReferenceMaps`), so that memory holds one chunk's maps whatever n_images.
    Every image's maps and scores are the same whatever the chunks.

    `reuse` keeps the trained blocks' activations of step 0's passes for the states that
    leave those blocks trained, when `reuse_activations` is on (`sanity_cli.reuse`)."""
    context = {"test": cfg.test.name, "model": cfg.model.name, "dataset": cfg.dataset.name, "seed": seed,
               "init": cfg.test.get("init", ""), "reset_bn_stats": cfg.test.get("reset_bn_stats", ""),
               "normalization": cfg.metrics.normalization}
    device = prepared.images.device
    ids = prepared.image_ids.to(device)
    explain = explainer(cfg, seed, reuse)
    compare_options = metric_options(cfg, single_channel=prepared.spec.channels == 1,
                                     size=tuple(prepared.images.shape[-2:]))
    compare_fn = lambda a, b, **overrides: compare(a, b, **{**compare_options, **overrides})  # noqa: E731
    chunks = image_chunks(len(prepared.images), cfg.image_chunk)
    with ReferenceMaps(store.run_dir, in_memory=len(chunks) == 1) as reference:
        for condition in conditions:
            step, block = condition.state.step, condition.state.block
            scored = not store.done(seed, step)
            if step > 0 and not scored and not condition.kept:
                continue
            signal = step == 0 and seed == _seeds(cfg)[0]
            examples: dict[str, Tensor] = {}
            predictions, figures = [], []
            with reuse.state(condition.model):
                for index, part in enumerate(chunks):
                    images = prepared.images[part]
                    if condition.inputs is not None:
                        display = condition.inputs(prepared.display[part].to(device), ids[part])
                        images = prepared.spec.normalize(display)
                    state = f"seed {seed}, step {step}: {block}"
                    predicted = _predicted(condition.model, images, cfg.max_batch, cfg.model.name, state)
                    targets = _targets(cfg.target, condition, prepared, predicted, part, ids[part])
                    tick = _now(device)
                    if not condition.explain and step > 0:  # the same maps as step 0's, measured otherwise
                        maps = reference.get(index, device)
                    elif condition.truth is not None:  # a known map stands for every method's
                        maps = dict.fromkeys(cfg.method,
                                             condition.truth(prepared.display[part].to(device), ids[part]))
                    else:
                        with reuse.chunk(index):
                            maps = check.maps(explain(step, ids[part]), condition.model, images, targets, seed,
                                              cfg.test, ids[part])
                    measured: dict[str, Tensor] = {}
                    if condition.transform is not None:
                        maps, measured = condition.transform(maps, images, ids[part])
                    clock["explain"] += _now(device) - tick
                    check_maps(maps, state)
                    predictions.append(predicted)
                    _add_examples(examples, maps, cfg.n_examples)
                    if signal:
                        figures.append(figures_by_method(maps, prepared.display[part].to(device), seed=cfg.seed,
                                                         positions=torch.arange(part.start, part.stop)))
                    if step == 0 or condition.kept:
                        reference.put(index, maps, step)
                    if not scored:
                        continue
                    tick = _now(device)
                    base = maps if step == condition.compare_with else reference.get(index, device,
                                                                                     condition.compare_with)
                    # a known map (Condition.truth) has one channel and stands for each of a map's channels
                    base = {name: base[name].expand_as(value) for name, value in maps.items()}
                    variants = {name: robustness_scores(base[name], value,
                                                        single_channel=compare_options["single_channel"])
                                for name, value in maps.items()} if check.compares_maps else {}
                    scores = {name: {**check.score(base[name], value,
                                                   _reusing(compare_fn, compare_options, base[name], value,
                                                            variants.get(name, {})), cfg.test), **measured}
                              for name, value in maps.items()}
                    clock["compare"] += _now(device) - tick
                    chunk_ids, labels = prepared.image_ids[part], prepared.labels[part]
                    rows = state_rows(context, step, block, scores, chunk_ids, labels, targets)
                    robust = [row for scheme in NORMALIZATIONS
                              for row in state_rows({**context, "normalization": scheme}, step, block,
                                                    {name: value[scheme] for name, value in variants.items()},
                                                    chunk_ids, labels, targets)]
                    store.add_rows(rows, robust)
            if signal:
                record_signal(cfg, join_figures(figures), store.run_dir)
            if scored:
                store.finish_state(seed, step, block, examples,
                                   receipt(condition, torch.cat(predictions), prepared.labels))


def _predicted(model: nn.Module, images: Tensor, max_batch: int, name: str, state: str) -> Tensor:
    """The (B,) classes that `model` predicts for the (B, C, H, W) images; SanityError
    naming the model and the state when its logits are not finite."""
    with torch.no_grad():
        logits = torch.cat([logits_of(model, chunk) for chunk in images.split(max_batch)])
    check_logits(logits, name, state)
    return logits.argmax(dim=1)


def _reusing(compare_fn: checks.Compare, options: dict, reference: Tensor, maps: Tensor,
             variants: dict[str, dict[str, Tensor]]) -> checks.Compare:
    """compare_fn, but the scores of (reference, maps) that robustness_scores has already
    computed under the run's normalization (the same numbers, from the same ranks) are
    taken from `variants` rather than ranked again; every other call goes to compare_fn.
    `options`: compare_fn's own keyword arguments (metric_options)."""
    normalization = options["normalization"]
    known = variants.get(normalization, {}) if normalization in ("paper", "none") else {}

    def compare_again(a: Tensor, b: Tensor, **overrides) -> dict[str, Tensor]:
        names = list(overrides.pop("metrics", options["metrics"]))
        if a is not reference or b is not maps or overrides:
            return compare_fn(a, b, metrics=names, **overrides)
        rest = [name for name in names if name not in known]
        computed = compare_fn(a, b, metrics=rest) if rest else {}
        return {name: known[name] if name in known else computed[name] for name in names}
    return compare_again


def image_chunks(n: int, size: int | None) -> list[slice]:
    """The run's n images `size` at a time (all at once when size is None)."""
    size = size or n
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class ReferenceMaps:
    """The maps that states are compared with (step 0's, and those of the states a check
    keeps, `Condition.kept`), chunk by chunk: kept in memory when the images are one chunk, else
    written to run_dir/.reference (removed when done) and read back one chunk at a time."""

    def __init__(self, run_dir: Path, in_memory: bool):
        self.kept: dict[tuple[int, int], dict[str, Tensor]] = {}  # (step, chunk) -> maps
        self.folder = None if in_memory else run_dir / ".reference"
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)  # left by a run that was killed
            with writing(self.folder):
                self.folder.mkdir()

    def __enter__(self) -> ReferenceMaps:
        return self

    def __exit__(self, *exc) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def put(self, index: int, maps: dict[str, Tensor], step: int = 0) -> None:
        if self.folder is None:
            self.kept[(step, index)] = maps
        else:
            # Serialized in memory, then written as every other file of the run: a full disk
            # is then one line, not torch's "enforce fail" from inside its writer.
            buffer = io.BytesIO()
            torch.save({name: value.detach().cpu() for name, value in maps.items()}, buffer)
            replace_atomically(self.folder / f"{step}_{index}.pt", buffer.getvalue())

    def get(self, index: int, device: torch.device, step: int = 0) -> dict[str, Tensor]:
        if self.folder is None:
            return self.kept[(step, index)]
        maps = torch.load(self.folder / f"{step}_{index}.pt", weights_only=True)
        return {name: value.to(device) for name, value in maps.items()}


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


def record_signal(cfg: DictConfig, figures: dict[str, dict[str, Tensor]], run_dir: Path) -> pd.DataFrame:
    """signal.csv: how much structure each method's maps of the unrandomized model have,
    next to a random map's (sanity_cli.signal; `figures` by `figures_by_method`); warns
    for each method that has none."""
    controls = [name for name in figures if name in cfg.method and _kind(cfg, name) in CONTROLS]
    table = table_of(figures, controls=controls)
    replace_atomically(run_dir / "signal.csv", table.to_csv(index=False).encode())
    for name in uninformative(table):
        log.warning("%s: the trained model's maps are no more structured than a random map (signal.csv); "
                    "its randomization scores are marked uninformative, not a pass", name)
    return table


def _kind(cfg: DictConfig, name: str) -> str:
    return cfg.method[name].get("method") or name


def explainer(cfg: DictConfig, seed: int, reuse: ActivationReuse):
    """explain(step, ids) -> a function (model, images, targets) -> {method: (B, C, H, W) maps}
    that computes every selected method in one state of the run; `ids` (B,) name the
    images, whose noise (SmoothGrad, VarGrad, the random control) follows them. Methods
    from outside the project run with `reuse` paused."""

    def for_step(step: int, ids: Tensor):
        methods = method_options(cfg, seed, step)  # explain_all raises MethodError (a SanityError) on a bad option
        external = {key: o for key, o in methods.items() if is_external(o.get("method") or key)}
        built_in = {key: o for key, o in methods.items() if key not in external}

        def explain(model, images, targets):
            maps = explain_all(model, images, targets, built_in, max_batch=cfg.max_batch, ids=ids) if built_in else {}
            for key, options in external.items():
                with reuse.paused():
                    maps[key] = explain_external(model, images, targets, options, max_batch=cfg.max_batch,
                                                 name=key)
            return {key: maps[key] for key in methods}

        return explain

    return for_step


def _now(device: torch.device) -> float:
    """Wall-clock seconds once the device's queued work is done (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_model_fit(cfg: DictConfig, prepared: Prepared) -> None:
    """Checks that need the model: classes to explain, and GradCAM's convolution."""
    if cfg.target == "label" and prepared.num_outputs != len(prepared.classes):
        raise SanityError(f"target=label, but the dataset has {len(prepared.classes)} classes and the model "
                          f"{prepared.num_outputs} outputs, so labels are not the model's classes; "
                          "use target=predicted")
    model = prepared.models["trained"].model
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return
    selected = {name: (options.get("method") or name) for name, options in cfg.method.items()}
    cams = [name for name, kind in selected.items() if kind in GRADCAM_FAMILY]
    if cams and len(cams) == len(selected):
        raise SanityError(f"{' and '.join(cams)} {'needs' if len(cams) == 1 else 'need'} a convolutional layer "
                          f"and model={cfg.model.name} has none; choose other methods")
    if cams:  # the paper preset on the MLP: explain the rest, and say so
        log.warning("model %s has no convolutional layer: leaving out %s", cfg.model.name, ", ".join(cams))
        with open_dict(cfg):
            for name in cams:
                del cfg.method[name]


def _seeds(cfg: DictConfig) -> list[int]:
    """The randomization's seeds: `test.seeds` as a list, or as a number of draws from the
    run's seed on (seed, seed + 1, ...); the run's seed alone when null."""
    return run_seeds(cfg.seed, cfg.test.get("seeds"))


def metric_options(cfg: DictConfig, single_channel: bool | None = None,
                   size: tuple[int, int] | None = None) -> dict:
    """compare()'s keyword arguments from the `metrics` settings; the paper's one-channel
    normalization follows the input images (a GradCAM map of an RGB image is not one).
    HOG is left out of maps of `size` (H, W) smaller than one HOG block, where it is NaN
    for every image, unless it is the only metric or the verdict's."""
    m = cfg.metrics
    names = [name for name in m.names if not (name == "hog" and hog_left_out(cfg, size))]
    return {"metrics": names, "normalization": m.normalization, "single_channel": single_channel,
            "ssim_data_range": m.ssim.data_range,
            "ssim_sigma": m.ssim.sigma, "ssim_sample_covariance": m.ssim.sample_covariance,
            "hog_pixels_per_cell": m.hog.pixels_per_cell, "hog_cells_per_block": m.hog.cells_per_block,
            "hog_orientations": m.hog.orientations}


def hog_left_out(cfg: DictConfig, size: tuple[int, int] | None) -> bool:
    """HOG is not computed on maps of `size` (H, W) smaller than one HOG block (it would be NaN
    for every image), unless it is the only metric or the verdict's."""
    m = cfg.metrics
    block = m.hog.pixels_per_cell * m.hog.cells_per_block
    return ("hog" in m.names and size is not None and min(size) < block and len(m.names) > 1
            and cfg.verdict.metric != "hog")


def prepare(cfg: DictConfig, device: torch.device) -> Prepared:
    """Load the data, then build, train or load the model(s), and pick the test images."""
    channels, size = datasets.geometry(cfg.dataset)
    spec = input_spec(cfg.model, channels, size)
    dataset = datasets.load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, n_images=cfg.n_images,
                                    image_size=spec.size)
    for split, images in (("test", dataset.test_x), ("training", dataset.train_x)):
        if images is not None:
            check_images(images, cfg.dataset.name, split)
    shuffled_run = cfg.labels == "shuffled"
    extra = checks.get(cfg.test.name).extra_models(cfg, dataset, spec, device)  # first: its settings refused early
    models = {"trained": _trained_model(cfg, dataset, spec, device, shuffled_run)}
    if checks.get(cfg.test.name).needs_shuffled_model:
        models["shuffled"] = _trained_model(cfg, dataset, spec, device, shuffled=True)
        _warn_unless_memorized(models["shuffled"], cfg.test.memorization_threshold)
    for need in checks.get(cfg.test.name).models_needed(cfg.test):
        models[need.name] = _trained_model(cfg, dataset, spec, device, shuffled=False, need=need)
    models.update(extra)
    chosen = shard_images(datasets.select_images(dataset.test_y, cfg.n_images, cfg.seed), parse_shard(cfg.shard))
    display = datasets.adapt_images(dataset.test_x[chosen], spec.channels, spec.size)
    images = spec.normalize(display).to(device)
    with torch.no_grad():  # one pass gives both the number of classes and the trained model's predictions
        logits = torch.cat([logits_of(models["trained"].model, chunk) for chunk in images.split(cfg.max_batch)])
    check_logits(logits, cfg.model.name, "the trained model")
    return Prepared(models, spec, images, display, dataset.test_y[chosen], chosen, dataset.classes,
                    logits.shape[1], logits.argmax(dim=1))


def _warn_unless_memorized(model: TrainedModel, threshold: float) -> None:
    if model.train_accuracy is not None and model.train_accuracy < threshold:
        log.warning("the shuffled-label model reached train accuracy %.3f < %.2f: it has not memorized its labels, "
                    "so the data randomization test means little; raise test.shuffled_epochs, or lower "
                    "test.shuffled_lr if the loss stays at chance",
                    model.train_accuracy, threshold)


def _trained_model(cfg: DictConfig, dataset: datasets.ImageData, spec: InputSpec, device: torch.device,
                   shuffled: bool, need: checks.ModelNeed | None = None) -> TrainedModel:
    """The model trained (or cached) on the training split: with shuffled labels, or with
    its images changed as a check's `need` says."""
    num_classes = dataset.num_classes
    if cfg.model.kind not in TRAINABLE_KINDS or cfg.model.get("checkpoint"):
        if shuffled or need:
            what = "shuffled labels need" if shuffled else f"test={cfg.test.name} trains a {need.name} model, so it needs"
            raise SanityError(f"{what} a model trained here (cnn, mlp or custom without a checkpoint), "
                              f"not model={cfg.model.name}")
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, num_classes, spec).to(device).eval()
        source = "checkpoint" if cfg.model.get("checkpoint") else "pretrained" if cfg.model.pretrained else "random"
        if source == "random":
            log.warning("model %s has random weights (model.pretrained=false): its maps say nothing about "
                        "a trained model", cfg.model.name)
        return TrainedModel(model, None, None, source)
    if dataset.train_x is None:
        raise SanityError(f"model={cfg.model.name} is trained here but dataset={cfg.dataset.name} has no "
                          "training split; use digits, mnist, fashion_mnist or cifar10, or give a custom dataset "
                          "its dataset.train_split")
    train_x, train_y, train_cfg = dataset.train_x, dataset.train_y, cfg.train
    if shuffled:
        train_y = shuffled_labels(train_y, cfg.seed)
        if "shuffled_epochs" in cfg.test:  # memorizing random labels takes longer; a subset is allowed
            # and its own learning rate: a rate that fits true labels can stall at chance on random ones
            lr = cfg.test.get("shuffled_lr") or cfg.train.lr
            train_cfg = OmegaConf.merge(cfg.train, {"epochs": cfg.test.shuffled_epochs, "lr": lr})
            subset = cfg.test.get("shuffled_subset")
            if subset and subset > len(train_y):
                log.warning("test.shuffled_subset=%d is more than the %d training images; all %d are used",
                            subset, len(train_y), len(train_y))
            train_x, train_y = (train_x[:subset], train_y[:subset]) if subset else (train_x, train_y)
    prepare_x = lambda x: spec.normalize(datasets.adapt_images(x, spec.channels, spec.size))  # noqa: E731
    if need is not None:  # the change sees the images as the model does, in [0, 1]
        changed = need.change(datasets.adapt_images(train_x, spec.channels, spec.size), train_y, cfg.seed)
        prepare_train = lambda x: spec.normalize(changed)  # noqa: E731
    else:
        prepare_train = prepare_x
    dataset_settings = OmegaConf.to_container(cfg.dataset, resolve=True)
    dataset_settings.pop("system_dir", None)  # where a copy lies does not change the weights
    # The device is part of the key: GPU and CPU training give different weights.
    model_settings = OmegaConf.to_container(cfg.model, resolve=True)
    model_settings.pop("gradcam_layer", None)  # where GradCAM looks does not change the weights
    key = {"model": cfg.model.name, "kind": cfg.model.kind, "architecture": model_settings, "dataset": dataset_settings,
           "input": [spec.channels, spec.size], "classes": num_classes, "labels": "shuffled" if shuffled else "true",
           "train_size": len(train_y), "device": device.type}
    if need is not None:
        key["changed"] = {"name": need.name, **need.key}
    if cfg.model.kind == "custom":  # editing the model's code trains anew
        key["source"] = plugins.source_fingerprint(cfg.model._target_)
    return train_or_load(lambda: build_model(cfg.model, num_classes, spec), key, prepare_train(train_x), train_y,
                         prepare_x(dataset.test_x), dataset.test_y, train_cfg, cfg.seed, cfg.cache_dir, device)


def method_options(cfg: DictConfig, seed: int = 0, step: int = 0) -> dict[str, dict]:
    """The selected methods (the `method` group) as plain dicts, with the model's
    GradCAM layer filled in, the noise of SmoothGrad and VarGrad following the run's
    seed, and the random control's seed following the state as well."""
    selected = OmegaConf.to_container(cfg.method, resolve=True) or {}
    for name, options in selected.items():
        kind = options.get("method") or name
        if kind in ("gradcam", "guided_gradcam", "captum") and not options.get("layer"):
            options["layer"] = cfg.model.get("gradcam_layer")
        if kind in ("smoothgrad", "vargrad"):
            options["seed"] = int(options.get("seed", 0)) + int(cfg.seed)
        if kind == "random":
            options["seed"] = int(options.get("seed", 0)) + 1000 * seed + step
    return selected


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


def _meta(cfg: DictConfig, prepared: Prepared) -> dict:
    methods = list(cfg.method)
    return {"test": cfg.test.name, "model": cfg.model.name, "dataset": cfg.dataset.name, "title": describe(cfg),
            "methods": methods,
            "controls": [m for m in methods if (cfg.method[m].get("method") or m) in CONTROLS],
            "image_ids": prepared.image_ids[: cfg.n_examples].tolist(),
            "labels": prepared.labels[: cfg.n_examples].tolist(), "classes": list(prepared.classes)}


def describe(cfg: DictConfig) -> str:
    seeds = ", ".join(map(str, _seeds(cfg)))
    return f"{cfg.test.name}: {cfg.model.name} on {cfg.dataset.name}, seed {seeds}"


def undefined_hint(metric: str, run_dir: Path) -> str:
    """Why `metric` is undefined for every image of a run: the maps' size where it is below
    what the metric needs (UNDEFINED_HINTS), else maps that are constant everywhere."""
    import numpy as np

    from sanity_cli.results import read_info

    metrics = (read_info(run_dir).get("settings") or {}).get("metrics") or {}
    try:
        with np.load(run_dir / "maps.npz") as npz:
            side = min(npz["images"].shape[-2:])
    except Exception:  # noqa: BLE001 - no maps.npz, or a damaged one: the size is unknown
        return UNDEFINED_HINTS.get(metric, "")
    if metric == "ssim":
        needs = 2 * int(3.5 * float((metrics.get("ssim") or {}).get("sigma", 1.5)) + 0.5) + 1
    elif metric == "hog":
        hog = metrics.get("hog") or {}
        needs = int(hog.get("pixels_per_cell", 16)) * int(hog.get("cells_per_block", 3))
    else:
        needs = 0
    if side < needs:
        return UNDEFINED_HINTS.get(metric, "")
    return (f" (the maps, {side} pixels a side, are large enough for it: the maps compared were constant, which no "
            "similarity can score; see which methods give constant maps in figures/methods.png)")


def finish(run_dir: Path, timing: dict[str, float] | None = None) -> RunResult:
    """Summarize results.csv and draw the figures; also used to redraw a finished run."""
    from sanity_cli.figures import draw_all
    from sanity_cli.results import summarize

    results = read_results(run_dir)
    if results.empty:
        raise SanityError(f"{run_dir} has no finished state yet; continue the run with resume=true")
    summary = summarize(results, RunStore.models_of(run_dir))
    summary.to_csv(run_dir / "summary.csv", index=False)
    for metric, rows in summary[summary["step"] > 0].groupby("metric"):
        if rows["n"].sum() == 0:
            log.warning("%s is undefined for every image%s", metric, undefined_hint(metric, run_dir))
    return RunResult(run_dir, results, summary, draw_all(run_dir), timing or {})
