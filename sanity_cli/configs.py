"""Where the Hydra config tree lives, what it offers, and the resolvers its files use.

A fact of its own module, so that the CLI, the paper reruns and the Python entry
point all find the configs without importing one another.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

GROUPS = ("model", "dataset", "method", "test")


def config_dir() -> Path:
    """The Hydra config tree: inside the package when installed from a wheel,
    the repository's top-level conf/ in a source checkout or editable install."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def available(group: str) -> list[str]:
    """The config names of one group, e.g. available("model") -> ["cnn", "inception_v3", ...]."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@lru_cache(maxsize=1)
def top_level_keys() -> frozenset[str]:
    """The settings a run's config may hold at its top: those of config.yaml and the groups."""
    primary = OmegaConf.load(config_dir() / "config.yaml")
    return frozenset(key for key in primary if key not in ("defaults", "hydra")) | frozenset(GROUPS)


def register_resolvers() -> None:
    """`${run_id:}`: a short random name, the same wherever one config resolves it (cached
    per config, as Hydra's `${now:}`), so that runs started in the same second get
    directories of their own."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True)


register_resolvers()
