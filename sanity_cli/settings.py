"""A run's settings as typed, read-only objects, built once from the composed config.

`Settings.from_config(cfg)` is where a config is checked (`validation.validate`) and
turned into frozen dataclasses; the doors (the CLI's job, `check()`, the paper reruns)
build them, and `pipeline.run` builds them itself when handed a config, as tests do.
Nothing changes them during a run: what the run works out (the device, GradCAM's layer,
the methods kept, the batch) goes into the pipeline's `RunPlan`.

The top-level keys of conf/config.yaml and the groups train, metrics and verdict have
the same keys in every run, so they are typed here. The groups model, dataset, test and
method are open: a custom model or dataset takes its own constructor's keys, each check
and each plugged-in method its own options. Those stay read-only `DictConfig`s (attribute
access, `.get`, interpolations resolved on read), with the few keys the pipeline reads
for every model and dataset typed beside them. Hydra's structured configs (`ConfigStore`
schemas) would type the fixed part as well, but a schema of the open groups must accept
any key, and the composed config would then refuse a wrong value with Hydra's multi-line
error rather than the one line naming the setting and its choices that `validate` gives;
so the schema is these dataclasses, filled from the config that Hydra composed as usual.
The defaults live in the YAML files only: every field here is read from the config.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from omegaconf import DictConfig, OmegaConf

from sanity_cli.sharding import Shard, parse_shard
from sanity_cli.validation import validate
from sanity_cli.verdict import VerdictSettings


@dataclass(frozen=True)
class TrainSettings:
    """`train`: how the models that need it (cnn, mlp, custom) are trained."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str

    def as_dict(self) -> dict:
        """The settings as a plain dict in the config's order (part of the model cache's key)."""
        return asdict(self)


@dataclass(frozen=True)
class SsimSettings:
    data_range: float
    sigma: float
    sample_covariance: bool


@dataclass(frozen=True)
class HogSettings:
    pixels_per_cell: int
    cells_per_block: int
    orientations: int

    @property
    def block(self) -> int:
        """The side in pixels of one HOG block: maps smaller than it have no HOG feature."""
        return self.pixels_per_cell * self.cells_per_block


@dataclass(frozen=True)
class MetricSettings:
    """`metrics`: the similarities computed, their normalization and options."""

    names: tuple[str, ...]
    normalization: str
    ssim: SsimSettings
    hog: HogSettings


@dataclass(frozen=True)
class ModelSettings:
    """`model`: what the pipeline reads of every model, and the whole group (`group`,
    read-only) for the builder and the cache key, whose keys differ by kind."""

    kind: str
    name: str
    pretrained: bool
    checkpoint: str | None
    gradcam_layer: str | None
    group: DictConfig


@dataclass(frozen=True)
class DatasetSettings:
    """`dataset`: its name, and the whole group (`group`, read-only) for the loader."""

    name: str
    group: DictConfig


@dataclass(frozen=True)
class Settings:
    """Every setting of one run (conf/config.yaml), read-only.

    test, method: the check's and the methods' own settings, read-only `DictConfig`s.
    config: the whole composed config, read-only, for what records it as it is (run.json's
    settings: `results.settings_for_fingerprint`).
    """

    seed: int
    device: str
    n_images: int
    n_examples: int
    target: str
    labels: bool | str
    max_batch: int
    batch: str
    image_chunk: int | None
    reuse_activations: int
    resume: bool
    shard: Shard | None
    data_dir: str
    cache_dir: str
    model: ModelSettings
    dataset: DatasetSettings
    train: TrainSettings
    metrics: MetricSettings
    verdict: VerdictSettings
    test: DictConfig
    method: DictConfig
    config: DictConfig

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        """Check `cfg` (SanityError naming the first bad setting) and read it into Settings.
        The config is copied: later changes to `cfg` do not reach the settings."""
        validate(cfg)
        config = copy.deepcopy(cfg)
        OmegaConf.set_readonly(config, True)
        model, metrics = config.model, config.metrics
        return cls(
            seed=config.seed, device=str(config.device), n_images=config.n_images, n_examples=config.n_examples,
            target=config.target, labels=config.labels, max_batch=config.max_batch, batch=config.batch,
            image_chunk=config.image_chunk, reuse_activations=config.reuse_activations, resume=config.resume,
            shard=parse_shard(config.shard), data_dir=config.data_dir, cache_dir=config.cache_dir,
            model=ModelSettings(model.kind, model.name, bool(model.get("pretrained")), model.get("checkpoint"),
                                model.get("gradcam_layer"), model),
            dataset=DatasetSettings(config.dataset.name, config.dataset),
            train=TrainSettings(**OmegaConf.to_container(config.train, resolve=True)),
            metrics=MetricSettings(tuple(metrics.names), metrics.normalization,
                                   SsimSettings(**OmegaConf.to_container(metrics.ssim, resolve=True)),
                                   HogSettings(**OmegaConf.to_container(metrics.hog, resolve=True))),
            verdict=VerdictSettings.from_mapping(OmegaConf.to_container(config.verdict, resolve=True)
                                                 if config.get("verdict") is not None else None),
            test=config.test, method=config.method, config=config)


def as_settings(cfg: Settings | DictConfig) -> Settings:
    """`cfg` as Settings: built (and so checked) once when it is a composed config."""
    return cfg if isinstance(cfg, Settings) else Settings.from_config(cfg)
