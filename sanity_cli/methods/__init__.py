"""Saliency methods, built-in and plugged, computed in batches that share passes.

Public API::

    explain(model, x, target, method, *, max_batch=64, **options) -> Tensor
    explain_all(model, x, target, {key: options}, *, max_batch=64, ids=None, apart=nullcontext)
        -> {key: Tensor}
    preflight_all(model, {key: options}, images, targets=None)  # SanityError before any work
    check_options(key, options)                                 # SanityError; no model needed
    options_for_state({key: options}, layer=, run_seed=, seed=, step=) -> {key: options}
    entry(key, options) -> MethodSpec; kind_of, is_control, is_plugged, needs_hooks
    count_passes() -> context manager yielding a PassCount
    REGISTRY: {name: MethodSpec(name, family, defaults, summary, ...)}, every method
    METHODS: the built-in ones; CONTROLS: the controls' names

x is (B, C, H, W); target is a (B,) LongTensor or "predicted". The model must be in
eval() mode. See :mod:`sanity_cli.methods.planner` for how passes are shared. Code
outside this package asks the registry what a selected method needs, never its name.
"""

from __future__ import annotations

from sanity_cli.methods.counting import PassCount, count_passes
from sanity_cli.methods.planner import explain, explain_all
from sanity_cli.methods.preflight import check_options, preflight_all
from sanity_cli.methods.registry import (
    CONTROLS,
    HOOK_FREE,
    METHODS,
    REGISTRY,
    MethodCall,
    MethodError,
    MethodSpec,
    entry,
    is_control,
    is_plugged,
    kind_of,
    needs_hooks,
    options_for_state,
    resolve_call,
)

__all__ = [
    "CONTROLS",
    "HOOK_FREE",
    "METHODS",
    "REGISTRY",
    "MethodCall",
    "MethodError",
    "MethodSpec",
    "PassCount",
    "check_options",
    "count_passes",
    "entry",
    "explain",
    "explain_all",
    "is_control",
    "is_plugged",
    "kind_of",
    "needs_hooks",
    "options_for_state",
    "preflight_all",
    "resolve_call",
]
