"""The Python door onto the pipeline: `check(model, images, ...)` in a notebook.

It runs the same checks as `sanity run` on a model and a batch of images that the
caller already has, without Hydra's command line: the settings are the packaged
config's defaults, changed by keyword arguments named as on the command line.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from sanity_cli import checks
from sanity_cli.configs import config_dir
from sanity_cli.errors import SanityError
from sanity_cli.methods.gradients import logits_of
from sanity_cli.models import InputSpec
from sanity_cli.pipeline import Prepared, RunResult, execute, resolve_device
from sanity_cli.runstore import RunStore, settings_for_fingerprint
from sanity_cli.settings import Settings
from sanity_cli.training import TrainedModel


def check(model: nn.Module, images: Tensor, methods: Sequence[str] = ("gradient",), test: str = "cascade", *,
          labels: Tensor | None = None, shuffled_model: nn.Module | None = None,
          run_dir: str | Path | None = None, **options: Any) -> RunResult:
    """Run a sanity check on `model` and return its tables.

    images: (B, C, H, W) inputs exactly as the model takes them (already normalized).
    methods: method names as in `sanity list` (e.g. "gradient", "guided_backprop").
    test: a check name ("cascade", "independent", "data", "random_logit", ...); "data"
        needs `shuffled_model`, the same architecture trained on shuffled labels.
    labels: (B,) true classes, for the accuracy receipt and `target="label"`.
    run_dir: where to write the run's files; None keeps nothing on disk.
    options: settings as on the command line, dots allowed through a dict:
        check(m, x, target="original", **{"test.init": "default", "metrics.normalization": "none"}).
    The model is restored to its weights when the check ends.
    """
    cfg = _config(methods, test, options)
    if "model.name" not in options:
        cfg.model.name = type(model).__name__
    settings = Settings.from_config(cfg)  # checked here, once
    device = resolve_device(settings.device)
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="sanity-") as scratch:
            return _run(settings, model, images, labels, shuffled_model, device, Path(scratch) / "run", keep=False)
    return _run(settings, model, images, labels, shuffled_model, device, Path(run_dir), keep=True)


def _config(methods: Sequence[str], test: str, options: Mapping[str, Any]) -> DictConfig:
    if isinstance(methods, str):
        methods = [methods]
    groups = ["model=custom", f"test={test}", f"method=[{','.join(methods)}]"]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=groups)
    except Exception as error:  # noqa: BLE001 - Hydra's missing-config errors: name the choices instead
        raise SanityError(f"cannot select test={test} and methods {list(methods)}: {str(error).splitlines()[0]}; "
                          "see `sanity list` for the names") from None
    for key, value in options.items():
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise SanityError(f"unknown setting '{key}'; see `sanity run --cfg job` for the settings")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


_MISSING = object()


def _run(settings: Settings, model: nn.Module, images: Tensor, labels: Tensor | None,
         shuffled_model: nn.Module | None, device: torch.device, run_dir: Path, keep: bool) -> RunResult:
    if checks.get(settings.test.name).needs_shuffled_model and shuffled_model is None:
        raise SanityError(f"test={settings.test.name} compares with a model trained on shuffled labels; "
                          "pass it as check(..., shuffled_model=MODEL)")
    prepared = given(model, images, labels, shuffled_model, device, settings.max_batch)
    with RunStore(run_dir, settings_for_fingerprint(settings.config, device), resume=False) as store:
        result = execute(settings, prepared, store)
    if not keep:
        result.run_dir, result.figures, result.report = None, [], None
    return result


def given(model: nn.Module, images: Tensor, labels: Tensor | None, shuffled_model: nn.Module | None,
          device: torch.device, max_batch: int) -> Prepared:
    """A caller's model and (B, C, H, W) model inputs as the pipeline's prepared data."""
    if not isinstance(model, nn.Module):
        raise SanityError(f"check() needs a torch nn.Module as its model, not {type(model).__name__}")
    if not isinstance(images, Tensor) or images.dim() != 4 or not len(images):
        raise SanityError("check() needs images as a (B, C, H, W) tensor with at least one image")
    images = images.detach().float().to(device)
    models = {"trained": TrainedModel(model.to(device).eval(), None, None, "given")}
    if shuffled_model is not None:
        models["shuffled"] = TrainedModel(shuffled_model.to(device).eval(), None, None, "given")
    with torch.no_grad():
        logits = torch.cat([logits_of(models["trained"].model, chunk) for chunk in images.split(max_batch)])
    n, channels = images.shape[:2]
    labels = torch.full((n,), -1, dtype=torch.long) if labels is None else torch.as_tensor(labels).long().cpu()
    if labels.shape != (n,):
        raise SanityError(f"labels must hold one class per image, shape ({n},), not {tuple(labels.shape)}")
    low = images.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
    high = images.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    display = ((images - low) / (high - low).clamp(min=1e-12)).cpu()  # each image to [0, 1], for figures
    spec = InputSpec(channels, images.shape[-1], (0.0,) * channels, (1.0,) * channels)
    classes = [str(i) for i in range(logits.shape[1])]
    return Prepared(models, spec, images, display, labels, torch.arange(n), classes, logits.shape[1],
                    logits.argmax(dim=1))
