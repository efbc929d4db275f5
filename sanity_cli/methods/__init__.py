"""Saliency methods, computed in batches that share forward and backward passes.

Public API::

    explain(model, x, target, method, *, max_batch=64, **options) -> Tensor
    explain_all(model, x, target, {key: options}, *, max_batch=64) -> {key: Tensor}
    count_passes() -> context manager yielding a PassCount
    METHODS: {name: MethodSpec(name, family, defaults, summary)}

x is (B, C, H, W); target is a (B,) LongTensor or "predicted". The model must be in
eval() mode. See :mod:`sanity_cli.methods.planner` for how passes are shared.
"""

from sanity_cli.methods.counting import PassCount, count_passes
from sanity_cli.methods.planner import explain, explain_all
from sanity_cli.methods.registry import METHODS, MethodCall, MethodError, MethodSpec, resolve_call

__all__ = [
    "METHODS",
    "MethodCall",
    "MethodError",
    "MethodSpec",
    "PassCount",
    "count_passes",
    "explain",
    "explain_all",
    "resolve_call",
]
