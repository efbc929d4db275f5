"""The registry of method names, their options and defaults.

A request for a method is turned into a :class:`MethodCall`: the method's name and
its complete, validated options (defaults filled in), hashable so that identical
requests under different keys are computed once and so the planner can group calls
that share passes.

Families (how the planner computes them):

* ``pass``: one forward of the batch and one or two backward passes shared by all
  of gradient, input_x_gradient, gradcam, guided_backprop, guided_gradcam.
* ``integrated``: integrated_gradients, on interpolated inputs.
* ``noise``: smoothgrad and vargrad, moments of a base method over noisy copies.
* ``attention``: attention_rollout and chefer, read from the attention of a Vision
  Transformer (see :mod:`sanity_cli.methods.transformers`).
* ``control``: edge and random; use neither the model nor its weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sanity_cli.errors import SanityError

INTEGRATION_RULES = (
    "paper",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area")
EDGE_DETECTORS = ("sobel", "canny")
HEAD_FUSIONS = ("mean", "max", "min")


class MethodError(SanityError, ValueError):
    """A bad method name, option, layer or model for the method asked for."""


@dataclass(frozen=True)
class MethodCall:
    """One method with all its options (defaults filled in); hashable.

    ``options`` is a sorted tuple of (name, value) pairs; a nested base method
    (smoothgrad / vargrad) is itself a ``MethodCall``.
    """

    method: str
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str) -> Any:
        return dict(self.options)[name]

    @property
    def family(self) -> str:
        return METHODS[self.method].family


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: family, option defaults and a one-line summary."""

    name: str
    family: str
    defaults: Mapping[str, Any]
    summary: str
    check: Callable[[dict[str, Any]], None] = lambda options: None


def _fail(method: str, message: str) -> None:
    raise MethodError(f"{method}: {message}")


def _check_choice(method: str, options: dict[str, Any], name: str, choices: tuple) -> None:
    if options[name] not in choices:
        _fail(method, f"{name}={options[name]!r} is not one of {', '.join(choices)}")


def _check_number(method: str, options: dict[str, Any], name: str, minimum: float) -> None:
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        _fail(method, f"{name}={value!r} must be a number >= {minimum}")


def _check_int(method: str, options: dict[str, Any], name: str, minimum: int) -> None:
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(method, f"{name}={value!r} must be an integer >= {minimum}")


def _check_layer(method: str) -> Callable[[dict[str, Any]], None]:
    def check(options: dict[str, Any]) -> None:
        if options["layer"] is not None and not isinstance(options["layer"], str):
            _fail(method, f"layer={options['layer']!r} must be a module name or null")
        _check_choice(method, options, "interpolation", INTERPOLATIONS)

    return check


def _check_integrated(options: dict[str, Any]) -> None:
    _check_int("integrated_gradients", options, "steps", 2)
    _check_choice("integrated_gradients", options, "rule", INTEGRATION_RULES)
    baseline = options["baseline"]
    if baseline != "zero" and (
        isinstance(baseline, bool)
        or not isinstance(baseline, int | float)
        or not math.isfinite(baseline)
    ):
        _fail("integrated_gradients", f"baseline={baseline!r} must be 'zero' or a number")


def _check_noise(method: str) -> Callable[[dict[str, Any]], None]:
    def check(options: dict[str, Any]) -> None:
        _check_int(method, options, "samples", 1)
        _check_number(method, options, "noise", 0.0)
        _check_int(method, options, "seed", 0)
        if not isinstance(options.get("square", False), bool):
            _fail(method, f"square={options['square']!r} must be true or false")
        if METHODS[options["base"].method].family in ("noise", "control"):
            _fail(method, f"base={options['base'].method!r} must be a model-based method")

    return check


def _check_rollout(options: dict[str, Any]) -> None:
    _check_choice("attention_rollout", options, "head_fusion", HEAD_FUSIONS)
    _check_choice("attention_rollout", options, "interpolation", INTERPOLATIONS)


def _check_edge(options: dict[str, Any]) -> None:
    _check_choice("edge", options, "detector", EDGE_DETECTORS)
    _check_number("edge", options, "sigma", 0.0)


def _spec(
    name: str, family: str, summary: str, check=lambda options: None, **defaults
) -> MethodSpec:
    return MethodSpec(name, family, MappingProxyType(defaults), summary, check)


_NOISE_DEFAULTS = dict(base="gradient", base_options={}, noise=0.15, seed=0)

METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            _spec("gradient", "pass", "d logit[target] / d input (signed)"),
            _spec("input_x_gradient", "pass", "gradient * input"),
            _spec(
                "integrated_gradients",
                "integrated",
                "path integral of the gradient from a baseline, times (input - baseline)",
                _check_integrated,
                steps=50,
                baseline="zero",
                rule="paper",
            ),
            _spec(
                "guided_backprop", "pass", "backward passing only positive gradient through ReLUs"
            ),
            _spec(
                "gradcam",
                "pass",
                "ReLU of the gradient-weighted channel sum at a layer, upsampled; (B, 1, H, W)",
                _check_layer("gradcam"),
                layer=None,
                interpolation="bilinear",
            ),
            _spec(
                "guided_gradcam",
                "pass",
                "guided_backprop * gradcam",
                _check_layer("guided_gradcam"),
                layer=None,
                interpolation="bilinear",
            ),
            _spec(
                "attention_rollout",
                "attention",
                "class-token row of the attention rolled out over a ViT's layers; (B, 1, H, W)",
                _check_rollout,
                head_fusion="mean",
                interpolation="bilinear",
            ),
            _spec(
                "chefer",
                "attention",
                "class-token relevance of gradient-weighted ViT attention (Chefer et al. 2021); "
                "(B, 1, H, W)",
                lambda options: _check_choice("chefer", options, "interpolation", INTERPOLATIONS),
                interpolation="bilinear",
            ),
            _spec(
                "smoothgrad",
                "noise",
                "mean of a base method over noisy copies of the input",
                _check_noise("smoothgrad"),
                samples=50,
                square=False,
                **_NOISE_DEFAULTS,
            ),
            _spec(
                "vargrad",
                "noise",
                "variance of a base method over noisy copies of the input",
                _check_noise("vargrad"),
                samples=25,
                **_NOISE_DEFAULTS,
            ),
            _spec(
                "edge",
                "control",
                "edge detector on the input (uses no model)",
                _check_edge,
                detector="sobel",
                sigma=1.0,
            ),
            _spec(
                "random",
                "control",
                "seeded normal noise (uses neither the model nor the input's values)",
                lambda options: _check_int("random", options, "seed", 0),
                seed=0,
            ),
        )
    }
)


def resolve_call(method: str, options: Mapping[str, Any] | None = None) -> MethodCall:
    """Validate ``options`` for ``method`` and fill in the defaults.

    ``options`` may be a plain dict or an OmegaConf ``DictConfig``. Raises
    :class:`MethodError` (a ``ValueError``) on an unknown method or option, or a bad
    value.
    """
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    spec = METHODS[method]
    given = dict(options or {})
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        valid = ", ".join(spec.defaults) or "none"
        raise MethodError(f"{method}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    resolved = {**spec.defaults, **given}
    if spec.family == "noise":
        # The base method is resolved (and validated) like a top-level request.
        resolved["base"] = resolve_call(str(resolved["base"]), resolved.pop("base_options"))
    spec.check(resolved)
    return MethodCall(method, tuple(sorted(resolved.items())))
