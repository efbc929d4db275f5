"""The registry of methods: every method, built-in or plugged, is an entry here,
with its family, options and defaults, and what it needs of the model.

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
* ``plugged``: captum, lrp and callable, methods from outside, computed on chunks of
  the batch by their adapters (see :mod:`sanity_cli.methods.external`).

Code outside this package asks the registry what a selected method is (:func:`entry`,
:func:`is_control`, :func:`needs_hooks`), never its name.
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
    """A registered method: family, option defaults, a one-line summary, and what it
    needs of the model.

    ``hooks``: it hooks the model's modules or swaps its ReLUs whatever its options
    (a TorchScript model takes neither); a plugged method says so per class, in its
    own part of the preflight. ``relus``: it swaps the ReLUs' backward (guided).
    ``takes_layer``: its ``layer`` option, when unset, is the model's GradCAM layer;
    ``needs_layer``: it needs a layer with a spatial map (a model without a
    convolution has none). ``seed_follows``: its ``seed`` is offset by the run's seed
    ("run") or by the state's ("state"), so that its noise is drawn anew there.
    """

    name: str
    family: str
    defaults: Mapping[str, Any]
    summary: str
    check: Callable[[dict[str, Any]], None] = lambda options: None
    hooks: bool = False
    relus: bool = False
    takes_layer: bool = False
    needs_layer: bool = False
    seed_follows: str | None = None

    @property
    def control(self) -> bool:
        """A control (edge, random): it uses no model, and its scores are the baseline."""
        return self.family == "control"

    @property
    def plugged(self) -> bool:
        """Computed by a library or a function from outside (Captum, zennit, a callable)."""
        return self.family == "plugged"


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
    name: str,
    family: str,
    summary: str,
    check: Callable[[dict[str, Any]], None] = lambda options: None,
    *,
    defaults: Mapping[str, Any] | None = None,
    **needs: Any,
) -> MethodSpec:
    return MethodSpec(name, family, MappingProxyType(dict(defaults or {})), summary, check, **needs)


_NOISE_DEFAULTS = dict(base="gradient", base_options={}, noise=0.15, seed=0)
_CAM = dict(hooks=True, takes_layer=True, needs_layer=True)

REGISTRY: Mapping[str, MethodSpec] = MappingProxyType(
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
                defaults=dict(steps=50, baseline="zero", rule="paper"),
            ),
            _spec(
                "guided_backprop",
                "pass",
                "backward passing only positive gradient through ReLUs",
                hooks=True,
                relus=True,
            ),
            _spec(
                "gradcam",
                "pass",
                "ReLU of the gradient-weighted channel sum at a layer, upsampled; (B, 1, H, W)",
                _check_layer("gradcam"),
                defaults=dict(layer=None, interpolation="bilinear"),
                **_CAM,
            ),
            _spec(
                "guided_gradcam",
                "pass",
                "guided_backprop * gradcam",
                _check_layer("guided_gradcam"),
                defaults=dict(layer=None, interpolation="bilinear"),
                relus=True,
                **_CAM,
            ),
            _spec(
                "attention_rollout",
                "attention",
                "class-token row of the attention rolled out over a ViT's layers; (B, 1, H, W)",
                _check_rollout,
                defaults=dict(head_fusion="mean", interpolation="bilinear"),
                hooks=True,
            ),
            _spec(
                "chefer",
                "attention",
                "class-token relevance of gradient-weighted ViT attention (Chefer et al. 2021); "
                "(B, 1, H, W)",
                lambda options: _check_choice("chefer", options, "interpolation", INTERPOLATIONS),
                defaults=dict(interpolation="bilinear"),
                hooks=True,
            ),
            _spec(
                "smoothgrad",
                "noise",
                "mean of a base method over noisy copies of the input",
                _check_noise("smoothgrad"),
                defaults=dict(samples=50, square=False, **_NOISE_DEFAULTS),
                seed_follows="run",
            ),
            _spec(
                "vargrad",
                "noise",
                "variance of a base method over noisy copies of the input",
                _check_noise("vargrad"),
                defaults=dict(samples=25, **_NOISE_DEFAULTS),
                seed_follows="run",
            ),
            _spec(
                "edge",
                "control",
                "edge detector on the input (uses no model)",
                _check_edge,
                defaults=dict(detector="sobel", sigma=1.0),
            ),
            _spec(
                "random",
                "control",
                "seeded normal noise (uses neither the model nor the input's values)",
                lambda options: _check_int("random", options, "seed", 0),
                defaults=dict(seed=0),
                seed_follows="state",
            ),
            # Plugged methods: their options are checked, and their maps computed, by the
            # adapters of sanity_cli.methods.external.
            _spec(
                "captum",
                "plugged",
                "a class of captum.attr by name (attribution), built on the model",
                takes_layer=True,
            ),
            _spec("lrp", "plugged", "a zennit LRP composite by name (composite)"),
            _spec(
                "callable", "plugged", "a function fn(model, x, target, **kwargs) named in _target_"
            ),
        )
    }
)
# The methods of the planner (every family but the plugged one), by name.
METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {name: spec for name, spec in REGISTRY.items() if not spec.plugged}
)
# The controls, in the registry's order.
CONTROLS: tuple[str, ...] = tuple(name for name, spec in REGISTRY.items() if spec.control)


def kind_of(key: str, options: Mapping[str, Any] | None = None) -> str:
    """The method that a selected key names: its options' ``method:``, else the key
    itself (``{"smoothgrad_gbp": {"method": "smoothgrad", ...}}`` is a smoothgrad)."""
    return str((options or {}).get("method") or key)


def entry(key: str, options: Mapping[str, Any] | None = None) -> MethodSpec:
    """The registry's entry of the method that ``key`` (with ``options``) selects;
    MethodError naming the valid methods when there is none."""
    kind = kind_of(key, options)
    if kind not in REGISTRY:
        raise MethodError(f"unknown method '{kind}'; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[kind]


def is_control(key: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``key`` (with ``options``) selects a control; False for a name that
    the registry does not know (a run's files may name anything)."""
    spec = REGISTRY.get(kind_of(key, options))
    return spec is not None and spec.control


def is_plugged(key: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``key`` (with ``options``) selects a plugged method (captum, lrp, callable)."""
    spec = REGISTRY.get(kind_of(key, options))
    return spec is not None and spec.plugged


def needs_hooks(key: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether the method hooks the model's modules or swaps its ReLUs whatever its
    options (see :class:`MethodSpec`); a noise method as its base method does."""
    spec = REGISTRY.get(kind_of(key, options))
    if spec is None:
        return True
    if spec.family == "noise":
        return needs_hooks(str((options or {}).get("base", "gradient")))
    return spec.hooks


# The methods that a model without hooks (TorchScript) can run, in the registry's order.
HOOK_FREE: tuple[str, ...] = tuple(name for name in METHODS if not needs_hooks(name))


def options_for_state(
    selected: Mapping[str, Mapping[str, Any] | None],
    *,
    layer: str | None,
    run_seed: int,
    seed: int = 0,
    step: int = 0,
) -> dict[str, dict[str, Any]]:
    """The options of each selected method ({key: options}) for one state of a run:
    ``layer`` (the model's GradCAM layer) where a method takes a layer and names none;
    the seed of a method whose noise follows the run offset by ``run_seed``, and that of
    one whose noise follows the state (the random control) by ``1000 * seed + step``
    (``seed``: the randomization's seed, ``step``: the state's)."""
    settled: dict[str, dict[str, Any]] = {}
    for key, given in selected.items():
        options = dict(given or {})
        spec = REGISTRY.get(kind_of(key, options))
        if spec is not None and spec.takes_layer and not options.get("layer"):
            options["layer"] = layer
        if spec is not None and spec.seed_follows == "run":
            options["seed"] = int(options.get("seed", 0)) + int(run_seed)
        if spec is not None and spec.seed_follows == "state":
            options["seed"] = int(options.get("seed", 0)) + 1000 * seed + step
        settled[key] = options
    return settled


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
