"""The data and the models of a run: the test images chosen, the models trained (or loaded)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import Tensor

from sanity_cli import checks, plugins
from sanity_cli import data as datasets
from sanity_cli.errors import SanityError
from sanity_cli.finite import check_images, check_logits
from sanity_cli.models import TRAINABLE_KINDS, InputSpec, build_model, input_spec
from sanity_cli.pipeline.explain import logits_of
from sanity_cli.settings import Settings
from sanity_cli.sharding import shard_images
from sanity_cli.training import TrainedModel, shuffled_labels, train_or_load

log = logging.getLogger(__name__)


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


def prepare(settings: Settings, device: torch.device) -> Prepared:
    """Load the data, then build, train or load the model(s), and pick the test images."""
    channels, size = datasets.geometry(settings.dataset.group)
    spec = input_spec(settings.model.group, channels, size)
    dataset = datasets.load_dataset(settings.dataset.group, data_dir=settings.data_dir, seed=settings.seed,
                                    n_images=settings.n_images, image_size=spec.size)
    for split, images in (("test", dataset.test_x), ("training", dataset.train_x)):
        if images is not None:
            check_images(images, settings.dataset.name, split)
    check = checks.get(settings.test.name)
    extra = check.extra_models(settings, dataset, spec, device)  # first: its settings refused early
    models = {"trained": _trained_model(settings, dataset, spec, device, settings.labels == "shuffled")}
    if check.needs_shuffled_model:
        models["shuffled"] = _trained_model(settings, dataset, spec, device, shuffled=True)
        _warn_unless_memorized(models["shuffled"], settings.test.memorization_threshold)
    for need in check.models_needed(settings.test):
        models[need.name] = _trained_model(settings, dataset, spec, device, shuffled=False, need=need)
    models.update(extra)
    chosen = shard_images(datasets.select_images(dataset.test_y, settings.n_images, settings.seed), settings.shard)
    display = datasets.adapt_images(dataset.test_x[chosen], spec.channels, spec.size)
    images = spec.normalize(display).to(device)
    with torch.no_grad():  # one pass gives both the number of classes and the trained model's predictions
        logits = torch.cat([logits_of(models["trained"].model, chunk) for chunk in images.split(settings.max_batch)])
    check_logits(logits, settings.model.name, "the trained model")
    return Prepared(models, spec, images, display, dataset.test_y[chosen], chosen, dataset.classes,
                    logits.shape[1], logits.argmax(dim=1))


def _warn_unless_memorized(model: TrainedModel, threshold: float) -> None:
    if model.train_accuracy is not None and model.train_accuracy < threshold:
        log.warning("the shuffled-label model reached train accuracy %.3f < %.2f: it has not memorized its labels, "
                    "so the data randomization test means little; raise test.shuffled_epochs, or lower "
                    "test.shuffled_lr if the loss stays at chance",
                    model.train_accuracy, threshold)


def _trained_model(settings: Settings, dataset: datasets.ImageData, spec: InputSpec, device: torch.device,
                   shuffled: bool, need: checks.ModelNeed | None = None) -> TrainedModel:
    """The model trained (or cached) on the training split: with shuffled labels, or with
    its images changed as a check's `need` says."""
    model, num_classes = settings.model, dataset.num_classes
    if model.kind not in TRAINABLE_KINDS or model.checkpoint:
        if shuffled or need:
            what = ("shuffled labels need" if shuffled else
                    f"test={settings.test.name} trains a {need.name} model, so it needs")
            raise SanityError(f"{what} a model trained here (cnn, mlp or custom without a checkpoint), "
                              f"not model={model.name}")
        torch.manual_seed(settings.seed)
        built = build_model(model.group, num_classes, spec).to(device).eval()
        source = "checkpoint" if model.checkpoint else "pretrained" if model.pretrained else "random"
        if source == "random":
            log.warning("model %s has random weights (model.pretrained=false): its maps say nothing about "
                        "a trained model", model.name)
        return TrainedModel(built, None, None, source)
    if dataset.train_x is None:
        raise SanityError(f"model={model.name} is trained here but dataset={settings.dataset.name} has no "
                          "training split; use digits, mnist, fashion_mnist or cifar10, or give a custom dataset "
                          "its dataset.train_split")
    train_x, train_y, train = dataset.train_x, dataset.train_y, settings.train
    if shuffled:
        train_y = shuffled_labels(train_y, settings.seed)
        train, subset = checks.get(settings.test.name).shuffled_training(settings.test, train)
        if subset and subset > len(train_y):
            log.warning("test.shuffled_subset=%d is more than the %d training images; all %d are used",
                        subset, len(train_y), len(train_y))
        train_x, train_y = (train_x[:subset], train_y[:subset]) if subset else (train_x, train_y)
    prepare_x = lambda x: spec.normalize(datasets.adapt_images(x, spec.channels, spec.size))  # noqa: E731
    if need is not None:  # the change sees the images as the model does, in [0, 1]
        changed = need.change(datasets.adapt_images(train_x, spec.channels, spec.size), train_y, settings.seed)
        prepare_train = lambda x: spec.normalize(changed)  # noqa: E731
    else:
        prepare_train = prepare_x
    key = _cache_key(settings, spec, num_classes, shuffled, len(train_y), device, need)
    return train_or_load(lambda: build_model(model.group, num_classes, spec), key, prepare_train(train_x), train_y,
                         prepare_x(dataset.test_x), dataset.test_y, train, settings.seed, settings.cache_dir, device)


def _cache_key(settings: Settings, spec: InputSpec, num_classes: int, shuffled: bool, train_size: int,
               device: torch.device, need: checks.ModelNeed | None) -> dict:
    """What determines a trained model's weights (beside the seed and the training settings)."""
    dataset_settings = OmegaConf.to_container(settings.dataset.group, resolve=True)
    dataset_settings.pop("system_dir", None)  # where a copy lies does not change the weights
    # The device is part of the key: GPU and CPU training give different weights.
    model_settings = OmegaConf.to_container(settings.model.group, resolve=True)
    model_settings.pop("gradcam_layer", None)  # where GradCAM looks does not change the weights
    key = {"model": settings.model.name, "kind": settings.model.kind, "architecture": model_settings,
           "dataset": dataset_settings, "input": [spec.channels, spec.size], "classes": num_classes,
           "labels": "shuffled" if shuffled else "true", "train_size": train_size, "device": device.type}
    if need is not None:
        key["changed"] = {"name": need.name, **need.key}
    if settings.model.kind == "custom":  # editing the model's code trains anew
        key["source"] = plugins.source_fingerprint(settings.model.group._target_)
    return key
