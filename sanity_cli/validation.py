"""Checks of a composed config before any work: names, types and ranges.

Every problem becomes a SanityError with one line that names the setting and what
it accepts, so a typo costs a second, not a training run and a traceback.
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from sanity_cli import checks
from sanity_cli.configs import top_level_keys
from sanity_cli.errors import SanityError
from sanity_cli.methods import METHODS, resolve_call
from sanity_cli.methods.external import EXTERNAL_KINDS, check_options, is_external
from sanity_cli.metrics import METRICS, NORMALIZATIONS
from sanity_cli.models import MODEL_INITS
from sanity_cli.randomization import INIT_POLICIES, ORDERS
from sanity_cli.sharding import parse_shard
from sanity_cli.verdict import VerdictSettings

TARGETS = ("predicted", "label", "original")

# (setting, type, bound): whole numbers must be at least the bound, numbers above it
# (or at least it, for the settings in INCLUSIVE); None: any value. Settings that a
# config group does not have are skipped.
NUMBERS = [
    ("seed", int, 0), ("n_images", int, 1), ("n_examples", int, 1), ("max_batch", int, 1),
    ("image_chunk", int, 1), ("reuse_activations", int, 0),
    ("train.epochs", int, 1), ("train.batch_size", int, 1), ("train.lr", float, 0.0),
    ("metrics.ssim.data_range", float, 0.0), ("metrics.ssim.sigma", float, 0.0),
    ("metrics.hog.pixels_per_cell", int, 1), ("metrics.hog.cells_per_block", int, 1),
    ("metrics.hog.orientations", int, 1),
    ("test.bins", int, 1), ("test.samples", int, 1), ("test.noise", float, 0.0),
    ("test.shuffled_epochs", int, 1), ("test.memorization_threshold", float, 0.0), ("test.shuffled_subset", int, 1),
    ("test.shuffled_lr", float, 0.0),
    ("test.latent_dim", int, 1), ("test.vae_epochs", int, 1), ("test.vae_lr", float, 0.0),
    ("test.margin", float, 0.0), ("test.min_reconstruction", float, 0.0),
    ("dataset.image_size", int, 8), ("dataset.test_fraction", float, 0.0),
]
INCLUSIVE = {"test.noise", "test.memorization_threshold", "test.margin", "test.min_reconstruction"}
# Upper bounds (inclusive): seeds fit the 32 bits that every random generator used here takes.
SEED_LIMIT = 2**32 - 1
MAXIMA = {"seed": SEED_LIMIT, "test.margin": 1.0, "test.min_reconstruction": 1.0}  # fractions and R^2: at most 1


def validate(cfg: DictConfig) -> None:
    """Raise SanityError for the first unknown name or bad value in `cfg`."""
    _check_keys(cfg)
    _check_names(cfg)
    _check_methods(cfg)
    for key, kind, bound in NUMBERS:
        _check_number(cfg, key, kind, bound)
    _check_lists(cfg)
    _check_shard(cfg)
    _check_verdict(cfg)
    if cfg.labels not in (True, "true", "shuffled"):
        raise SanityError(f"unknown labels '{cfg.labels}'; choose true or shuffled")
    if cfg.labels == "shuffled" and cfg.test.name == "data":
        raise SanityError("test=data trains its own shuffled-label model next to the true-label one; "
                          "drop labels=shuffled")
    fraction = OmegaConf.select(cfg, "dataset.test_fraction")
    if fraction is not None and fraction >= 1:
        raise SanityError("dataset.test_fraction must be between 0 and 1, e.g. 0.2")


def _check_keys(cfg: DictConfig) -> None:
    """A setting added with `+` that no part of the program reads would be ignored: refuse it."""
    unknown = sorted(set(cfg) - top_level_keys())
    if unknown:
        raise SanityError(f"unknown setting '{unknown[0]}'; the settings are {', '.join(sorted(top_level_keys()))} "
                          "(`sanity run --cfg job` shows them all)")


def _check_names(cfg: DictConfig) -> None:
    names = [("test", cfg.test.name, checks.CHECKS), ("target", cfg.target, TARGETS),
             ("normalization", cfg.metrics.normalization, NORMALIZATIONS)]
    if cfg.test.name in checks.MODEL_CHECKS:
        names.append(("init", cfg.test.init, INIT_POLICIES))
        names.append(("order", cfg.test.get("order", "top_down"), ORDERS))
    if cfg.model.get("kind") in ("cnn", "mlp"):
        names.append(("model.init", cfg.model.get("init", "torch"), MODEL_INITS))
    for what, value, valid in names:
        if value not in valid:
            raise SanityError(f"unknown {what} '{value}'; choose one of: {', '.join(valid)}")


def _check_methods(cfg: DictConfig) -> None:
    if not cfg.get("method"):
        raise SanityError("no method selected; pick one with method=NAME (see `sanity list`)")
    for name, options in (OmegaConf.to_container(cfg.method, resolve=True) or {}).items():
        options = dict(options or {})
        kind = options.pop("method", None) or name
        if is_external(kind):  # Captum, zennit and user functions check their own options
            check_options(name, {**options, "method": kind})
            continue
        if kind not in METHODS:
            raise SanityError(f"unknown method '{kind}'; choose one of: {', '.join((*METHODS, *EXTERNAL_KINDS))}")
        resolve_call(kind, {k: v for k, v in options.items() if k != "layer" or v})  # MethodError: a SanityError


def _check_number(cfg: DictConfig, key: str, kind: type, bound: float | None) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    is_kind = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not is_kind:
        raise SanityError(f"{key} must be {'a number' if kind is float else 'a whole number'}, not '{value}'")
    if bound is None:
        return
    if kind is int or key in INCLUSIVE:
        if value < bound:
            raise SanityError(f"{key} must be at least {bound}, not {value}")
    elif value <= bound:
        raise SanityError(f"{key} must be above {bound}, not {value}")
    if key in MAXIMA and value > MAXIMA[key]:
        raise SanityError(f"{key} must be at most {MAXIMA[key]}, not {value}")


def _check_shard(cfg: DictConfig) -> None:
    """shard=K/N, and no more shards than images (each shard must explain at least one)."""
    shard = parse_shard(cfg.get("shard"))
    if shard is not None and isinstance(cfg.n_images, int) and shard.count > cfg.n_images:
        raise SanityError(f"shard={shard} splits n_images={cfg.n_images} images {shard.count} ways, so some "
                          f"shards are empty; use at most {cfg.n_images} shards or raise n_images")


def _check_verdict(cfg: DictConfig) -> None:
    """The verdict settings, and a deciding metric that the run computes."""
    values = OmegaConf.to_container(cfg.verdict, resolve=True) if cfg.get("verdict") is not None else None
    VerdictSettings.from_mapping(values).check_run(list(cfg.metrics.names), cfg.test.name)


def _check_lists(cfg: DictConfig) -> None:
    names = cfg.metrics.names
    if not isinstance(names, ListConfig) or not names:
        raise SanityError(f"metrics.names must be a non-empty list, e.g. metrics.names=[spearman_abs,ssim]; "
                          f"got '{names}'")
    for name in names:
        if name not in METRICS:
            raise SanityError(f"unknown metric '{name}'; choose one of: {', '.join(METRICS)}")
    seeds = OmegaConf.select(cfg, "test.seeds")
    if seeds is not None and (not isinstance(seeds, ListConfig) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise SanityError(f"test.seeds must be a list of whole numbers, e.g. test.seeds=[0,1,2]; got '{seeds}'")
    if seeds is not None and not all(0 <= s <= SEED_LIMIT for s in seeds):
        raise SanityError(f"test.seeds must lie between 0 and {SEED_LIMIT}; got '{seeds}'")
    classes = OmegaConf.select(cfg, "dataset.classes")
    if isinstance(classes, int) and classes < 1:
        raise SanityError(f"dataset.classes must be at least 1, or a list of class folder names; got {classes}")
