"""One experiment, top to bottom: data, model, model states, maps, scores, results.

`run(cfg, run_dir)` is the whole run as a plain function; the CLI is a thin Hydra
wrapper around it and tests call it directly with composed configs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from sanity_cli import data as datasets
from sanity_cli.errors import SanityError
from sanity_cli.figures import similarity_curves
from sanity_cli.methods import METHODS, explain_all
from sanity_cli.metrics import compare
from sanity_cli.models import TRAINABLE_KINDS, InputSpec, build_model, input_spec
from sanity_cli.randomization import TrainedWeights, cascading_states, find_blocks, independent_states
from sanity_cli.results import ResultsWriter, state_rows, summarize
from sanity_cli.training import TrainedModel, shuffled_labels, train_or_load

log = logging.getLogger(__name__)
TESTS = {"cascade": cascading_states, "independent": independent_states}
TARGETS = ("predicted", "label", "original")


@dataclass
class RunResult:
    """What a run leaves in its directory, also returned for callers in Python."""

    run_dir: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    figures: list[Path]


@dataclass
class Prepared:
    """The trained model and the test images it is explained on (normalized, on the device)."""

    trained: TrainedModel
    spec: InputSpec
    images: Tensor       # (B, C, H, W) model inputs
    labels: Tensor       # (B,) true labels, -1 where the dataset has none
    image_ids: Tensor    # (B,) indices into the dataset's test split
    num_classes: int


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one; cpu; cuda (an error when there is no GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SanityError("device=cuda but no GPU is visible; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise SanityError(f"unknown device '{name}'; choose auto, cpu or cuda")
    return torch.device(name)


def prepare(cfg: DictConfig, device: torch.device) -> Prepared:
    """Load the data, then build, train or load the model, and pick the test images."""
    channels, size = _dataset_geometry(cfg)
    spec = input_spec(cfg.model, channels, size)
    dataset = datasets.load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, n_images=cfg.n_images,
                                    image_size=spec.size)
    trained = _trained_model(cfg, dataset, spec, device)
    chosen = datasets.select_images(dataset.test_y, cfg.n_images, cfg.seed)
    images = spec.normalize(datasets.adapt_images(dataset.test_x[chosen], spec.channels, spec.size))
    return Prepared(trained, spec, images.to(device), dataset.test_y[chosen], chosen, dataset.num_classes)


def _dataset_geometry(cfg: DictConfig) -> tuple[int, int]:
    """Channels and size of the dataset's images, known without loading it."""
    return {"digits": (1, cfg.dataset.get("image_size", 28)), "mnist": (1, 28), "fashion_mnist": (1, 28),
            "cifar10": (3, 32)}.get(cfg.dataset.name, (3, 224))


def _trained_model(cfg: DictConfig, dataset: datasets.ImageData, spec: InputSpec, device: torch.device) -> TrainedModel:
    num_classes = dataset.num_classes
    if cfg.model.kind not in TRAINABLE_KINDS or cfg.model.get("checkpoint"):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, num_classes, spec).to(device).eval()
        source = "checkpoint" if cfg.model.get("checkpoint") else "pretrained" if cfg.model.pretrained else "random"
        if source == "random":
            log.warning("model %s has random weights (model.pretrained=false): its maps say nothing about "
                        "a trained model", cfg.model.name)
        return TrainedModel(model, None, None, source)
    if dataset.train_x is None:
        raise SanityError(f"model={cfg.model.name} is trained here but dataset={cfg.dataset.name} has no "
                          "training split; use digits, mnist, fashion_mnist or cifar10")
    shuffled = cfg.labels == "shuffled"
    train_y = shuffled_labels(dataset.train_y, cfg.seed) if shuffled else dataset.train_y
    prepare_x = lambda x: spec.normalize(datasets.adapt_images(x, spec.channels, spec.size))  # noqa: E731
    key = {"model": cfg.model.name, "kind": cfg.model.kind, "dataset": OmegaConf.to_container(cfg.dataset),
           "input": [spec.channels, spec.size], "classes": num_classes, "labels": "shuffled" if shuffled else "true"}
    return train_or_load(lambda: build_model(cfg.model, num_classes, spec), key, prepare_x(dataset.train_x), train_y,
                         prepare_x(dataset.test_x), dataset.test_y, cfg.train, cfg.seed, cfg.cache_dir, device)


def method_options(cfg: DictConfig) -> dict[str, dict]:
    """The selected methods (the `method` group) as plain dicts, with gradcam's layer filled in."""
    selected = OmegaConf.to_container(cfg.method, resolve=True) or {}
    for name, options in selected.items():
        if (options.get("method") or name) in ("gradcam", "guided_gradcam") and not options.get("layer"):
            options["layer"] = cfg.model.get("gradcam_layer")
    return selected


@torch.no_grad()
def predicted_classes(model: nn.Module, images: Tensor, max_batch: int) -> Tensor:
    return torch.cat([model(chunk).argmax(1) for chunk in images.split(max_batch)])


def run(cfg: DictConfig, run_dir: str | Path) -> RunResult:
    """Run the experiment that `cfg` describes and write its results into `run_dir`."""
    run_dir = Path(run_dir)
    validate(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    prepared = prepare(cfg, device)
    model, methods = prepared.trained.model, method_options(cfg)
    blocks = find_blocks(model, prepared.images[:1], cfg.test.granularity)
    log.info("%d blocks, forward order: %s", len(blocks), ", ".join(blocks))
    trained = TrainedWeights(model)
    context = {"test": cfg.test.name, "model": cfg.model.name, "dataset": cfg.dataset.name, "seed": cfg.seed}
    writer = ResultsWriter(run_dir / "results.csv")
    original_targets = predicted_classes(model, prepared.images, cfg.max_batch)
    states = TESTS[cfg.test.name](model, blocks, trained, cfg.seed, cfg.test.init, cfg.test.reset_bn_stats)
    reference: dict[str, Tensor] = {}
    for state in tqdm(states, total=len(blocks) + 1, desc=f"{cfg.test.name} states", unit="state",
                      disable=os.environ.get("SANITY_PROGRESS", "1") == "0"):
        targets = _targets(cfg.target, model, prepared, original_targets, cfg.max_batch)
        maps = _explain(model, prepared.images, targets, methods, cfg.max_batch)
        if state.step == 0:
            reference = maps
        scores = {name: compare(reference[name], maps[name], metrics=list(cfg.metrics.names),
                                normalization=cfg.metrics.normalization) for name in maps}
        writer.append(state_rows(context, state.step, state.block, scores, prepared.image_ids,
                                 prepared.labels, targets))
    trained.check(model)
    return finish(run_dir, describe(cfg))


def _targets(choice: str, model: nn.Module, prepared: Prepared, original: Tensor, max_batch: int) -> Tensor:
    """The class explained for each image: the current model's argmax (the paper),
    the true label, or the trained model's prediction."""
    if choice == "predicted":
        return predicted_classes(model, prepared.images, max_batch)
    if choice == "original":
        return original
    if (prepared.labels < 0).any():
        raise SanityError("target=label but the dataset has no labels; use target=predicted")
    return prepared.labels.to(original.device)


def _explain(model: nn.Module, images: Tensor, targets: Tensor, methods: dict, max_batch: int) -> dict[str, Tensor]:
    """All methods' maps for all images, a chunk of images at a time."""
    chunks = [explain_all(model, x, t, methods, max_batch=max_batch)
              for x, t in zip(images.split(max_batch), targets.split(max_batch))]
    return {name: torch.cat([chunk[name] for chunk in chunks]) for name in methods}


def describe(cfg: DictConfig) -> str:
    return f"{cfg.test.name} randomization: {cfg.model.name} on {cfg.dataset.name}, seed {cfg.seed}"


def finish(run_dir: Path, title: str) -> RunResult:
    """Summarize results.csv and draw the figures; also used to redraw a finished run."""
    results = pd.read_csv(run_dir / "results.csv")
    summary = summarize(results)
    summary.to_csv(run_dir / "summary.csv", index=False)
    test = str(results["test"].iloc[0])
    figures = [similarity_curves(summary, run_dir / "figures" / f"{test}_spearman.png", title,
                                 [m for m in ("spearman_abs", "spearman") if m in set(summary["metric"])])]
    return RunResult(run_dir, results, summary, figures)


def validate(cfg: DictConfig) -> None:
    """Reject unknown names with one line that lists the valid ones."""
    checks = [("test", cfg.test.name, TESTS), ("target", cfg.target, TARGETS)]
    checks += [("method", options.get("method") or name, METHODS)
               for name, options in (OmegaConf.to_container(cfg.method) or {}).items()]
    for what, value, valid in checks:
        if value not in valid:
            raise SanityError(f"unknown {what} '{value}'; choose one of: {', '.join(valid)}")
    if cfg.labels not in (True, "true", "shuffled"):
        raise SanityError(f"unknown labels '{cfg.labels}'; choose true or shuffled")
    if cfg.n_images < 1 or cfg.max_batch < 1:
        raise SanityError("n_images and max_batch must be at least 1")
    if not cfg.method:
        raise SanityError("no method selected; pick one with method=NAME (see `sanity list`)")
