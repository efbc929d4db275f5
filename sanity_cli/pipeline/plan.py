"""What a run works out before any work, once: the `RunPlan`.

The settings say what was asked; the plan holds the facts found from them, the machine
and the prepared model: the device, GradCAM's layer of a custom model, the methods kept
(and those left out for a model without convolutions), the batch that `batch=auto`
measured, the randomization's seeds and blocks, and the metrics' options. Nothing is
written back into the settings or the config.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

from sanity_cli import checks
from sanity_cli.batching import chosen_batch
from sanity_cli.errors import SanityError
from sanity_cli.methods import entry, is_control, options_for_state
from sanity_cli.methods.gradcam import default_gradcam_layer
from sanity_cli.models import check_torchscript
from sanity_cli.pipeline.explain import preflight_methods
from sanity_cli.pipeline.prepare import Prepared
from sanity_cli.randomization import plan_blocks
from sanity_cli.settings import MetricSettings, Settings
from sanity_cli.sharding import leased_device
from sanity_cli.validation import run_seeds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """The facts of one run (see the module's docstring); read-only.

    methods: {key: options} of the methods explained, as the config gives them (plain dicts;
    `method_options` fills in what each state needs). compare: compare()'s keyword arguments.
    """

    device: torch.device
    run_seed: int
    methods: Mapping[str, Mapping]
    dropped: tuple[str, ...]
    gradcam_layer: str | None
    max_batch: int
    seeds: tuple[int, ...]
    blocks: tuple[str, ...]
    compare: Mapping
    hog_left_out: bool

    def method_options(self, seed: int = 0, step: int = 0) -> dict[str, dict]:
        """The methods' options in the state `step` of the randomization seeded `seed`."""
        return method_options(self.methods, self.run_seed, self.gradcam_layer, seed, step)

    @property
    def controls(self) -> list[str]:
        """The methods explained that are controls (a map that ignores the model)."""
        return [key for key in self.methods if is_control(key, self.methods[key])]


def make_plan(settings: Settings, check: checks.Check, prepared: Prepared) -> RunPlan:
    """The run's plan, after checking what only the prepared model can show (SanityError
    in one line): the check's targets, hooks on a TorchScript model, GradCAM's convolution,
    the labels as the model's classes, and every method tried once on one image."""
    if check.targets is not None and settings.target not in check.targets:
        raise SanityError(f"test={settings.test.name} explains target={' or '.join(check.targets)}, not "
                          f"target={settings.target}; drop the target setting")
    model, example = prepared.models["trained"].model, prepared.images[:1]
    given = selected_methods(settings)
    check_torchscript(model, settings.test.name, check.randomizes_model,
                      method_options(given, settings.seed, settings.model.gradcam_layer))
    blocks = plan_blocks(model, example, settings.test.granularity) if check.randomizes_model else []
    layer = settings.model.gradcam_layer
    if settings.model.kind == "custom" and not layer:
        layer = default_gradcam_layer(model, example)
    kept = check_model_fit(settings, prepared)
    methods = {key: given[key] for key in kept}
    preflight_methods(model, method_options(methods, settings.seed, layer), prepared.images, prepared.original)
    max_batch = settings.max_batch  # the run's passes take the measured batch with batch=auto
    if settings.batch == "auto":
        max_batch = chosen_batch(model, example, settings.max_batch, settings.cache_dir)
    size = tuple(prepared.images.shape[-2:])
    return RunPlan(prepared.images.device, settings.seed, methods, tuple(key for key in given if key not in kept),
                   layer, max_batch, tuple(seeds_of(settings)), tuple(blocks),
                   metric_options(settings.metrics, settings.verdict.metric, prepared.spec.channels == 1, size),
                   hog_left_out(settings.metrics, settings.verdict.metric, size))


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one; cpu; cuda (an error when there is no GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SanityError("device=cuda but no GPU is visible; use device=cpu or device=auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise SanityError(f"unknown device '{name}'; choose auto, cpu or cuda")
    return torch.device(name)


def run_device(settings: Settings) -> torch.device:
    """The device of the run: the GPU a job of a sweep leased (`sharding.job_resources`), else `device`."""
    return resolve_device(leased_device() or settings.device)


def seeds_of(settings: Settings) -> list[int]:
    """The randomization's seeds: `test.seeds` as a list, or as a number of draws from the
    run's seed on (seed, seed + 1, ...); the run's seed alone when null."""
    return run_seeds(settings.seed, settings.test.get("seeds"))


def selected_methods(settings: Settings) -> dict[str, dict]:
    """The `method` group as plain dicts {key: options}, as the config gives them."""
    return OmegaConf.to_container(settings.method, resolve=True) or {}


def method_options(methods: Mapping[str, Mapping], run_seed: int, gradcam_layer: str | None = None, seed: int = 0,
                   step: int = 0) -> dict[str, dict]:
    """The methods `{key: options}` (the `method` group as plain dicts) as one state explains
    them, a copy: with the model's GradCAM layer filled in, the noise of SmoothGrad and
    VarGrad following the run's seed, and the random control's following the state as well."""
    return options_for_state({key: copy.deepcopy(dict(options or {})) for key, options in methods.items()},
                             layer=gradcam_layer, run_seed=run_seed, seed=seed, step=step)


def metric_options(metrics: MetricSettings, verdict_metric: str, single_channel: bool | None = None,
                   size: tuple[int, int] | None = None) -> dict:
    """compare()'s keyword arguments from the `metrics` settings; the paper's one-channel
    normalization follows the input images (a GradCAM map of an RGB image is not one).
    HOG is left out of maps of `size` (H, W) smaller than one HOG block (`hog_left_out`)."""
    names = [name for name in metrics.names if not (name == "hog" and hog_left_out(metrics, verdict_metric, size))]
    return {"metrics": names, "normalization": metrics.normalization, "single_channel": single_channel,
            "ssim_data_range": metrics.ssim.data_range, "ssim_sigma": metrics.ssim.sigma,
            "ssim_sample_covariance": metrics.ssim.sample_covariance,
            "hog_pixels_per_cell": metrics.hog.pixels_per_cell, "hog_cells_per_block": metrics.hog.cells_per_block,
            "hog_orientations": metrics.hog.orientations}


def hog_left_out(metrics: MetricSettings, verdict_metric: str, size: tuple[int, int] | None) -> bool:
    """HOG is not computed on maps of `size` (H, W) smaller than one HOG block (it would be NaN
    for every image), unless it is the only metric or the verdict's."""
    return ("hog" in metrics.names and size is not None and min(size) < metrics.hog.block
            and len(metrics.names) > 1 and verdict_metric != "hog")


def check_model_fit(settings: Settings, prepared: Prepared) -> list[str]:
    """The methods that the model can be explained with (their keys): SanityError when the
    labels are not the model's classes, or when every method needs a convolution that the
    model lacks; GradCAM's family is left out, with a warning, when others remain."""
    if settings.target == "label" and prepared.num_outputs != len(prepared.classes):
        raise SanityError(f"target=label, but the dataset has {len(prepared.classes)} classes and the model "
                          f"{prepared.num_outputs} outputs, so labels are not the model's classes; "
                          "use target=predicted")
    selected = list(settings.method)
    model = prepared.models["trained"].model
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        return selected
    cams = [name for name, options in settings.method.items() if entry(name, options).needs_layer]
    if cams and len(cams) == len(selected):
        raise SanityError(f"{' and '.join(cams)} {'needs' if len(cams) == 1 else 'need'} a convolutional layer "
                          f"and model={settings.model.name} has none; choose other methods")
    if cams:  # the paper preset on the MLP: explain the rest, and say so
        log.warning("model %s has no convolutional layer: leaving out %s", settings.model.name, ", ".join(cams))
    return [name for name in selected if name not in cams]
