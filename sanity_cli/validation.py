"""Checks of a composed config before any work: names, types and ranges.

Every problem becomes a SanityError with one line that names the setting and what
it accepts, so a typo costs a second, not a training run and a traceback.
"""

from __future__ import annotations

import difflib

from omegaconf import DictConfig, ListConfig, OmegaConf

from sanity_cli import checks
from sanity_cli.artifacts import ARTIFACTS, POSITIONS
from sanity_cli.batching import BATCH_CHOICES
from sanity_cli.configs import top_level_keys
from sanity_cli.errors import SanityError
from sanity_cli.methods import check_options
from sanity_cli.metrics import METRICS, NORMALIZATIONS
from sanity_cli.models import MODEL_INITS
from sanity_cli.randomization import INIT_POLICIES, ORDERS
from sanity_cli.rundir import plain_name
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
    ("test.aligned_class", int, 0), ("test.rate", float, 0.0), ("test.tag_size", float, 0.0),
    ("test.tag_value", float, 0.0), ("test.stripes_period", int, 2), ("test.stripes_strength", float, 0.0),
    ("test.blur_sigma", float, 0.0), ("test.reliance_margin", float, 0.0), ("test.detect_margin", float, -2.0),
]
INCLUSIVE = {"test.noise", "test.memorization_threshold", "test.tag_value", "test.reliance_margin", "test.margin",
             "test.min_reconstruction"}
# Upper bounds (inclusive): seeds fit the 32 bits that every random generator used here takes.
SEED_LIMIT = 2**32 - 1
MAX_DRAWS = 100  # test.seeds as a number: each draw explains every state again
# A share, a fraction of the side, a pixel value and R^2 are at most 1; a gain of a similarity in [-1, 1] at most 2.
MAXIMA = {"seed": SEED_LIMIT, "test.rate": 1, "test.tag_size": 1, "test.tag_value": 1, "test.stripes_strength": 1,
          "test.reliance_margin": 1, "test.detect_margin": 2, "test.margin": 1, "test.min_reconstruction": 1}


def run_seeds(seed: int, seeds) -> list[int]:
    """The randomization's seeds from a run's `seed` and `test.seeds` setting: a list as it is,
    a number as that many draws from the run's seed on (`draw_seeds`), null as the run's seed alone."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return draw_seeds(int(seed), seeds)
    return [int(s) for s in seeds] if seeds else [int(seed)]


def draw_seeds(seed: int, draws: int) -> list[int]:
    """The seeds of `draws` randomization draws from the run's seed on: seed, seed + 1, ...
    (past the largest seed, on from 0)."""
    return [(seed + k) % (SEED_LIMIT + 1) for k in range(draws)]


def validate(cfg: DictConfig) -> None:
    """Raise SanityError for the first unknown name or bad value in `cfg`."""
    _check_keys(cfg)
    _check_file_names(cfg)
    _check_names(cfg)
    _check_methods(cfg)
    for key, kind, bound in NUMBERS:
        _check_number(cfg, key, kind, bound)
    _check_lists(cfg)
    _check_shard(cfg)
    _check_verdict(cfg)
    if cfg.labels not in (True, "true", "shuffled"):
        raise SanityError(f"unknown labels '{cfg.labels}'; choose true or shuffled")
    if cfg.labels == "shuffled" and checks.get(cfg.test.name).needs_shuffled_model:
        raise SanityError(f"test={cfg.test.name} trains its own shuffled-label model next to the true-label one; "
                          "drop labels=shuffled")
    fraction = OmegaConf.select(cfg, "dataset.test_fraction")
    if fraction is not None and fraction >= 1:
        raise SanityError("dataset.test_fraction must be between 0 and 1, e.g. 0.2")


def _check_keys(cfg: DictConfig) -> None:
    """A setting added with `+` that no part of the program reads would be ignored: refuse it."""
    unknown = sorted(set(cfg) - top_level_keys())
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(top_level_keys()), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"the settings are {', '.join(sorted(top_level_keys()))}"
        raise SanityError(f"unknown setting '{unknown[0]}'; {hint} (`sanity run --cfg job` shows them all)")


def _check_file_names(cfg: DictConfig) -> None:
    """The names that become part of file names (the model cache's entries, the keys of
    maps.npz, the figures' names) stay inside their directories."""
    for key in ("model.name", "dataset.name", "test.name"):
        value = OmegaConf.select(cfg, key)
        if value is not None:
            plain_name(value, key)
    for name in cfg.get("method") or {}:
        plain_name(name, f"method.{name}" if isinstance(name, str) and name.isidentifier() else "method key")


def _check_names(cfg: DictConfig) -> None:
    names = [("test", cfg.test.name, checks.CHECKS), ("target", cfg.target, TARGETS),
             ("batch", cfg.batch, BATCH_CHOICES), ("normalization", cfg.metrics.normalization, NORMALIZATIONS)]
    if cfg.test.name in checks.MODEL_CHECKS:
        names.append(("init", cfg.test.init, INIT_POLICIES))
        names.append(("order", cfg.test.get("order", "top_down"), ORDERS))
    if "artifact" in cfg.test:
        names.append(("test.artifact", cfg.test.artifact, ARTIFACTS))
        names.append(("test.tag_position", cfg.test.get("tag_position", "corner"), POSITIONS))
    if cfg.model.get("kind") in ("cnn", "mlp"):
        names.append(("model.init", cfg.model.get("init", "torch"), MODEL_INITS))
    for what, value, valid in names:
        if value not in valid:
            raise SanityError(f"unknown {what} '{value}'; choose one of: {', '.join(valid)}")


def _check_methods(cfg: DictConfig) -> None:
    if not cfg.get("method"):
        raise SanityError("no method selected; pick one with method=NAME (see `sanity list`)")
    for name, options in (OmegaConf.to_container(cfg.method, resolve=True) or {}).items():
        check_options(name, options)  # MethodError: a SanityError


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
    granularity = OmegaConf.select(cfg, "test.granularity")
    if isinstance(granularity, ListConfig) and not granularity:
        raise SanityError("test.granularity=[] names no module to randomize; give block, layer, or a list of the "
                          "model's module names, e.g. test.granularity=[fc2,conv1]")
    seeds = OmegaConf.select(cfg, "test.seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if not 1 <= seeds <= MAX_DRAWS:
            raise SanityError(f"test.seeds as a number of draws must lie between 1 and {MAX_DRAWS}; got {seeds}")
        seeds = draw_seeds(cfg.seed, seeds) if isinstance(cfg.seed, int) else None
    elif seeds is not None and (not isinstance(seeds, ListConfig) or not seeds
                                or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise SanityError(f"test.seeds must be a number of draws or a list of whole numbers, e.g. test.seeds=3 or "
                          f"test.seeds=[0,1,2]; got '{seeds}'")
    if seeds is not None and not all(0 <= s <= SEED_LIMIT for s in seeds):
        raise SanityError(f"test.seeds must lie between 0 and {SEED_LIMIT}; got '{seeds}'")
    classes = OmegaConf.select(cfg, "dataset.classes")
    if isinstance(classes, int) and classes < 1:
        raise SanityError(f"dataset.classes must be at least 1, or a list of class folder names; got {classes}")
