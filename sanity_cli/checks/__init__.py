"""The sanity checks, one module each, registered by name.

A new check is one module with a `Check` subclass (see `base`) and an entry below,
plus its config in conf/test/.
"""

from __future__ import annotations

from sanity_cli.checks import cascade, data, entropy, independent, manifold, random_logit, smooth_cascade, spurious
from sanity_cli.checks.base import Check, Condition, ModelNeed, Subject, unknown_check

CHECKS: dict[str, Check] = {module.CHECK.name: module.CHECK for module in
                            (cascade, independent, data, random_logit, smooth_cascade, entropy, spurious, manifold)}
MODEL_CHECKS = tuple(name for name, check in CHECKS.items() if check.randomizes_model)


def get(name: str) -> Check:
    """The check registered as `name`, e.g. get("cascade")."""
    if name not in CHECKS:
        raise unknown_check(name, CHECKS)
    return CHECKS[name]


__all__ = ["CHECKS", "MODEL_CHECKS", "Check", "Condition", "ModelNeed", "Subject", "get"]
