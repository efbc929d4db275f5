"""The zennit adapter: an LRP composite by name (``composite``), with its keyword
arguments and canonizers; the relevance of the explained logit, seeded with a one-hot
output relevance."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from sanity_cli import plugins
from sanity_cli.errors import SanityError, one_line
from sanity_cli.methods.adapter import Plan


def lrp_plan(model: nn.Module, options: dict, key: str) -> Plan:
    from zennit.attribution import Gradient

    composite_cls, kwargs, canonizers = zennit_composite(key, options)

    def explain(x: Tensor, classes: Tensor) -> Tensor:
        composite = composite_cls(canonizers=[canonizer() for canonizer in canonizers], **kwargs)
        # The relevance starts as the one-hot of the explained class at the logits.
        def one_hot(logits: Tensor) -> Tensor:
            return F.one_hot(classes, logits.shape[1]).to(logits.dtype)

        try:
            with Gradient(model=model, composite=composite) as attributor:
                _, relevance = attributor(x, one_hot)
        except Exception as error:  # noqa: BLE001 - zennit reports a model it cannot handle with many types
            raise SanityError(f"method '{key}' (zennit {composite_cls.__name__}) failed: {one_line(error)}") \
                from None
        return relevance

    return Plan(f"zennit {composite_cls.__name__}", explain, reuse_breaks=_zennit_state)


def zennit_composite(key: str, options: Mapping[str, Any]) -> tuple[type, dict, list[type]]:
    """The zennit composite class, its keyword arguments and canonizer classes, checked."""
    import zennit.canonizers
    import zennit.composites

    composites = {c.__name__: c for c in zennit.composites.COMPOSITES.values()}  # the named, ready-made ones
    name = options.get("composite")
    if name not in composites:
        raise SanityError(f"method.{key}.composite: zennit has no composite '{name}'; choose one of: "
                          f"{', '.join(sorted(composites))}")
    kwargs = plugins.keyword_arguments(options.get("composite_kwargs"), f"method.{key}.composite_kwargs")
    params = inspect.signature(composites[name].__init__).parameters
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p != "self"
               and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and p not in kwargs]
    if missing:
        raise SanityError(f"zennit {name} needs {', '.join(missing)}: give method.{key}.composite_kwargs."
                          f"{missing[0]}=VALUE (low and high: the bounds of the model's input values)")
    unknown = sorted(set(kwargs) - set(params) - {"canonizers"})
    if unknown and not any(v.kind == v.VAR_KEYWORD for v in params.values()):
        raise SanityError(f"method.{key}.composite_kwargs: zennit {name} takes no {', '.join(unknown)}")
    canonizer_names = plugins.plain(options.get("canonizers")) or []
    canonizers = []
    for canonizer in canonizer_names:
        found = getattr(zennit.canonizers, str(canonizer), None)
        if not (inspect.isclass(found) and issubclass(found, zennit.canonizers.Canonizer)):
            raise SanityError(f"method.{key}.canonizers: zennit.canonizers has no canonizer '{canonizer}'")
        canonizers.append(found)
    return composites[name], kwargs, canonizers


def _zennit_state(module: nn.Module) -> bool:
    """zennit's rules keep each layer's input; activations just pass the relevance on
    (a reused ReLU gives the same relevance as two, a reused convolution does not)."""
    from zennit.types import Activation

    return not isinstance(module, Activation)
