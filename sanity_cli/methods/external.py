"""Methods from outside the project: Captum attributions by class name, zennit LRP
composites, and any function of the user's.

Kinds (the ``method:`` of a method's options):

* ``captum``: a class of ``captum.attr`` named in ``attribution`` (DeepLift,
  GradientShap, Occlusion, LayerGradCam, NoiseTunnel around ``base``, ...), built on
  the model with ``kwargs`` and called with ``attribute_kwargs`` and the explained
  classes as ``target``. A layer method's (B, K, h, w) map is summed over K and
  resized to the input, (B, 1, H, W).
* ``lrp``: a zennit composite (``EpsilonPlusFlat``, ...) with its canonizers; the
  relevance of the explained logit, seeded with a one-hot output relevance.
* ``callable``: ``fn(model, x, target, **kwargs)`` named in ``_target_``; x is
  (B, C, H, W), target (B,); it returns (B, C, H, W) or (B, 1, H, W).

They share nothing with the built-in planner: each is called on chunks of the
batch, so that no forward sees more than about ``max_batch`` inputs (a chunk is
``max_batch`` divided by the inputs a method makes of one image: GradientShap's
``n_samples``, NoiseTunnel's ``nt_samples``, Occlusion's ``perturbations_per_eval``).
Torch's and NumPy's random generators are seeded the same way for every model
state (and restored afterwards), so a method that draws noise draws the same noise
in every state; attributes that Captum leaves on modules are removed.

`preflight_external` calls a method once on two images before any work, and
refuses a method that returns the wrong shape or non-finite values, changes the
weights, or leaves hooks behind; and a method that is known to be silently wrong
on the model's structure (each case measured against the same model written
without it):

* GuidedBackprop, GuidedGradCam, Deconvolution and DeepLift hook ``nn.ReLU``
  modules, so a ReLU called as a function (``F.relu``) gets the plain gradient
  (Captum #1082, #837); GuidedBackprop on a model without any ``nn.ReLU`` is
  the plain gradient.
* DeepLift keeps one input and output per non-linear module, zennit one input per
  layer: a module that runs twice in one forward (a reused ReLU for DeepLift, a
  reused convolution for zennit) is refused. (A reused ReLU is right for
  GuidedBackprop, Deconvolution and zennit; Captum's LRP refuses reuse itself.)
* Captum's LRP has no rule for some modules (``nn.Flatten``): refused by name.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from sanity_cli import plugins
from sanity_cli.errors import SanityError
from sanity_cli.methods.registry import INTERPOLATIONS

EXTERNAL_KINDS = ("captum", "lrp", "callable")
EXTRAS = {"captum": ("captum", "captum"), "lrp": ("zennit", "lrp")}  # kind: (module, pip extra)
OPTIONS = {
    "captum": ("method", "attribution", "kwargs", "attribute_kwargs", "layer", "baselines", "base", "base_kwargs",
               "interpolation", "seed"),
    "lrp": ("method", "composite", "composite_kwargs", "canonizers"),
}
CALLABLE_SEED = 0  # the seed a plugged function's random draws start from, in every state
# Captum classes that hook nn.ReLU modules and nothing else.
RELU_HOOKS = ("GuidedBackprop", "Deconvolution", "GuidedGradCam")
# Captum classes that replace the backward of the non-linear modules they find.
DEEPLIFT = ("DeepLift", "DeepLiftShap", "LayerDeepLift", "LayerDeepLiftShap")
# Captum classes that need a propagation rule on every leaf module.
CAPTUM_LRP = ("LRP", "LayerLRP")
# Captum classes whose map of an image depends on the other images of its batch.
ACROSS_BATCH = ("FeaturePermutation", "LayerFeaturePermutation")
_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def is_external(kind: str) -> bool:
    """Whether a method kind is computed here rather than by the built-in planner."""
    return kind in EXTERNAL_KINDS


@dataclass
class _Plan:
    """How one external method explains a chunk: (b, C, H, W), (b,) -> maps."""

    describe: str                                  # e.g. "captum DeepLift", for messages
    explain: Callable[[Tensor, Tensor], Tensor]
    inputs_per_image: int = 1                      # inputs one image becomes in a forward
    functional_relu_fails: bool = False            # a ReLU called as a function is mishandled
    reuse_breaks: Callable[[nn.Module], bool] | None = None  # leaf modules that must run once per forward
    needs_relu_module: bool = False
    without_rule: list[str] = field(default_factory=list)  # Captum LRP: leaf modules it has no rule for


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Validate an external method's options before any work (no model needed);
    raise a one-line SanityError naming the setting."""
    kind = options.get("method") or name
    if kind == "callable":
        plugins.method_function(options, f"method.{name}")
        return
    _require_extra(kind, name)
    unknown = sorted(set(options) - set(OPTIONS[kind]))
    if unknown:
        raise SanityError(f"method.{name}: unknown option(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(OPTIONS[kind][1:])}")
    if kind == "captum":
        _check_captum(name, options)
    else:
        _zennit_composite(name, options)


def explain_external(model: nn.Module, x: Tensor, targets: Tensor, options: Mapping[str, Any], *,
                     max_batch: int = 64, name: str | None = None) -> Tensor:
    """The maps of one external method for x (B, C, H, W) and classes `targets` (B,).

    `options` are the method's settings (its config node, `method:` naming the kind;
    else `name` does). Returns (B, C, H, W), or (B, 1, H, W) for layer methods and
    functions that return one channel. The model must be in eval() mode.
    """
    key = name or str(options.get("method"))
    options = plugins.plain(options)
    plan = _plan(model, options, key, x[:1].detach(), max_batch)
    chunk = max(1, max_batch // plan.inputs_per_image)
    maps = []
    with torch.enable_grad():
        for images, classes in zip(x.detach().split(chunk), targets.split(chunk)):
            maps.append(_checked_shape(key, plan, plan.explain(images, classes), images).detach())
    return torch.cat(maps)


def preflight_external(model: nn.Module, name: str, options: Mapping[str, Any], x: Tensor, targets: Tensor) -> None:
    """Call the method once on the first two images (x (B, C, H, W), targets (B,)) and
    refuse it, in one line naming it, where it would be wrong: see the module docstring."""
    options = plugins.plain(options)
    check_options(name, options)
    plan = _plan(model, options, name, x[:1].detach(), 2)
    _refuse_known_failures(model, name, plan, x[:1].detach())
    before = _model_state(model)
    maps = explain_external(model, x[:2], targets[:2], options, max_batch=2, name=name)
    problem = _state_change(before, _model_state(model))
    if problem is None and not bool(torch.isfinite(maps).all()):
        problem = "returned NaN or infinite values"
    if problem:
        raise SanityError(f"method '{name}' ({plan.describe}) {problem}; fix the method or choose another")


# -- kinds ------------------------------------------------------------------------------------------


def _plan(model: nn.Module, options: dict, key: str, example: Tensor, max_batch: int) -> _Plan:
    kind = options.get("method") or key
    if kind == "callable":
        return _callable_plan(model, options, key)
    _require_extra(kind, key)
    if kind == "captum":
        return _captum_plan(model, options, key, example, max_batch)
    if kind == "lrp":
        return _lrp_plan(model, options, key)
    raise SanityError(f"method '{key}' is not an external method; choose one of: {', '.join(EXTERNAL_KINDS)}")


def _callable_plan(model: nn.Module, options: dict, key: str) -> _Plan:
    function, kwargs = plugins.method_function(options, f"method.{key}")
    target = options["_target_"]

    def explain(x: Tensor, classes: Tensor) -> Tensor:
        with _seeded(CALLABLE_SEED, x.device):
            try:
                return function(model, x, classes, **kwargs)
            except SanityError:
                raise
            except Exception as error:  # noqa: BLE001 - the user's code may fail any way; say where, in one line
                raise SanityError(f"method '{key}' ({target}) failed{_where(error)}: {_one_line(error)}") from None

    return _Plan(f"function {target}", explain)


def _captum_plan(model: nn.Module, options: dict, key: str, example: Tensor, max_batch: int) -> _Plan:
    cls, base = _check_captum(key, options)
    explained = base or cls  # the class whose attribute() gets the baselines and batch settings
    attribute_kwargs = _tuples(plugins.keyword_arguments(options.get("attribute_kwargs"),
                                                         f"method.{key}.attribute_kwargs"))
    attribute_params = inspect.signature(explained.attribute).parameters
    if "internal_batch_size" in attribute_params:
        attribute_kwargs.setdefault("internal_batch_size", max_batch)
    method = _captum_instance(model, options, key, example, cls, base)
    interpolation, seed = options.get("interpolation") or "bilinear", int(options.get("seed") or 0)
    describe = f"captum {cls.__name__}" + (f" around {base.__name__}" if base else "")

    def explain(x: Tensor, classes: Tensor) -> Tensor:
        kwargs = {**_baselines(explained, options.get("baselines"), x, attribute_kwargs), **attribute_kwargs}
        with _seeded(seed, x.device), _attributes_restored(model), _quiet_captum():
            try:
                attributions = method.attribute(x, target=classes, **kwargs)
            except Exception as error:  # noqa: BLE001 - Captum reports bad settings with many error types
                raise SanityError(f"method '{key}' ({describe}) failed: {_one_line(error)}") from None
        attributions = attributions[0] if isinstance(attributions, tuple) else attributions
        return _as_input_map(attributions, x, interpolation, f"method '{key}' ({describe})")

    names = {cls.__name__, getattr(base, "__name__", "")}
    return _Plan(describe, explain, _inputs_per_image(cls, base, attribute_kwargs),
                 functional_relu_fails=bool(names & {*RELU_HOOKS, *DEEPLIFT}),
                 reuse_breaks=_deeplift_state if names & set(DEEPLIFT) else None,
                 needs_relu_module=bool(names & set(RELU_HOOKS)),
                 without_rule=_without_lrp_rule(model) if names & set(CAPTUM_LRP) else [])


def _lrp_plan(model: nn.Module, options: dict, key: str) -> _Plan:
    from zennit.attribution import Gradient

    composite_cls, kwargs, canonizers = _zennit_composite(key, options)

    def explain(x: Tensor, classes: Tensor) -> Tensor:
        composite = composite_cls(canonizers=[canonizer() for canonizer in canonizers], **kwargs)
        # The relevance starts as the one-hot of the explained class at the logits.
        def one_hot(logits: Tensor) -> Tensor:
            return F.one_hot(classes, logits.shape[1]).to(logits.dtype)

        try:
            with Gradient(model=model, composite=composite) as attributor:
                _, relevance = attributor(x, one_hot)
        except Exception as error:  # noqa: BLE001 - zennit reports a model it cannot handle with many types
            raise SanityError(f"method '{key}' (zennit {composite_cls.__name__}) failed: {_one_line(error)}") \
                from None
        return relevance

    return _Plan(f"zennit {composite_cls.__name__}", explain, reuse_breaks=_zennit_state)


# -- Captum -----------------------------------------------------------------------------------------


def _check_captum(key: str, options: Mapping[str, Any]) -> tuple[type, type | None]:
    """The Captum class (and NoiseTunnel's base class) the options name, checked."""
    cls = _captum_class(options.get("attribution"), f"method.{key}.attribution")
    base = None
    if cls.__name__ == "NoiseTunnel":
        base = _captum_class(options.get("base"), f"method.{key}.base")
        if base.__name__ == "NoiseTunnel":
            raise SanityError(f"method.{key}.base: NoiseTunnel cannot wrap another NoiseTunnel")
    elif options.get("base"):
        raise SanityError(f"method.{key}.base applies to attribution=NoiseTunnel only; drop it")
    for checked in filter(None, (cls, base)):
        _check_arguments(key, checked, options, checked is base)
    layer, baselines = options.get("layer"), options.get("baselines")
    if layer is not None and not isinstance(layer, str):
        raise SanityError(f"method.{key}.layer must be a module name or null, not '{layer}'")
    if baselines is not None and (isinstance(baselines, bool) or not isinstance(baselines, (int, float))):
        raise SanityError(f"method.{key}.baselines must be null or a number, not '{baselines}'")
    if (options.get("interpolation") or "bilinear") not in INTERPOLATIONS:
        raise SanityError(f"method.{key}.interpolation must be one of: {', '.join(INTERPOLATIONS)}")
    seed = options.get("seed") or 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SanityError(f"method.{key}.seed must be a whole number of at least 0, not '{seed}'")
    return cls, base


def _captum_class(value: Any, setting: str) -> type:
    import captum.attr
    from captum.attr._utils.attribution import Attribution

    names = sorted(n for n, c in vars(captum.attr).items()
                   if inspect.isclass(c) and issubclass(c, Attribution) and hasattr(c, "attribute"))
    if value in (None, plugins.MISSING, ""):
        raise SanityError(f"{setting} is not set; name a class of captum.attr, e.g. {setting}=DeepLift")
    if value not in names:
        raise SanityError(f"{setting}: captum.attr has no attribution class '{value}'; choose one of: "
                          f"{', '.join(names)}")
    cls = getattr(captum.attr, value)
    first = list(inspect.signature(cls.__init__).parameters)[1:2]
    if value != "NoiseTunnel" and first not in (["model"], ["forward_func"]):
        raise SanityError(f"{setting}: captum {value} does not explain a model's input image (it is built from "
                          f"{', '.join(first) or 'nothing'}, not the model); choose another class")
    if value in ACROSS_BATCH:
        raise SanityError(f"{setting}: captum {value} permutes features across the images of a batch, so an "
                          "image's map depends on the others; choose FeatureAblation or Occlusion instead")
    if value != "NoiseTunnel" and "target" not in inspect.signature(cls.attribute).parameters:
        raise SanityError(f"{setting}: captum {value} explains a neuron or a layer, not a class (its attribute() "
                          "takes no target); choose a class that takes one, e.g. a Layer* method")
    return cls


def _check_arguments(key: str, cls: type, options: Mapping[str, Any], is_base: bool) -> None:
    """Required constructor and attribute() arguments must be given in the options."""
    kwargs_key = "base_kwargs" if is_base else "kwargs"
    given = plugins.keyword_arguments(options.get(kwargs_key), f"method.{key}.{kwargs_key}")
    automatic = {"self", "model", "forward_func", "attribution_method", "layer"}
    for setting, params, values, skip in (
        (kwargs_key, inspect.signature(cls.__init__).parameters, given, automatic),
        ("attribute_kwargs", inspect.signature(cls.attribute).parameters,
         plugins.keyword_arguments(options.get("attribute_kwargs"), f"method.{key}.attribute_kwargs"),
         {"self", "inputs", "target", "baselines"}),
    ):
        required = [p for p, v in params.items() if v.default is inspect.Parameter.empty
                    and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD) and p not in skip and p not in values]
        if required:
            raise SanityError(f"captum {cls.__name__} needs {', '.join(required)}: give method.{key}.{setting}."
                              f"{required[0]}=VALUE" + (" (e.g. [1, 4, 4] for one-channel images)"
                                                       if required[0] == "sliding_window_shapes" else ""))


def _captum_instance(model: nn.Module, options: dict, key: str, example: Tensor, cls: type,
                     base: type | None) -> Any:
    def build(klass: type, kwargs_key: str) -> Any:
        kwargs = plugins.keyword_arguments(options.get(kwargs_key), f"method.{key}.{kwargs_key}")
        if "layer" in inspect.signature(klass.__init__).parameters:
            kwargs["layer"] = _layer(model, options.get("layer"), key, example)
        try:
            return klass(model, **kwargs)
        except Exception as error:  # noqa: BLE001 - a bad argument may raise anything
            raise SanityError(f"method '{key}': captum {klass.__name__}(model, ...) failed: {_one_line(error)}; "
                              f"check method.{key}.{kwargs_key}") from None

    if base is None:
        return build(cls, "kwargs")
    return cls(build(base, "base_kwargs"), **plugins.keyword_arguments(options.get("kwargs"), f"method.{key}.kwargs"))


def _layer(model: nn.Module, name: str | None, key: str, example: Tensor) -> nn.Module:
    """The module named `name`, or the model's last module with a 4-D output."""
    from sanity_cli.models import default_gradcam_layer

    name = name or default_gradcam_layer(model, example)
    modules = dict(model.named_modules())
    if not name or name not in modules:
        found = f"no module '{name}'" if name else "no module with a (B, K, h, w) output"
        raise SanityError(f"method '{key}': the model has {found}; set method.{key}.layer to a name from "
                          "model.named_modules()")
    return modules[name]


def _baselines(cls: type, value: Any, x: Tensor, given: Mapping[str, Any]) -> dict[str, Any]:
    """Captum's `baselines` argument: a constant image of `value` (null: zero) where the
    method needs baselines, or `value` where one is given; else nothing (Captum's default)."""
    params = inspect.signature(cls.attribute).parameters
    if "baselines" not in params or "baselines" in given:
        return {}
    required = params["baselines"].default is inspect.Parameter.empty
    if value is None and not required:
        return {}
    level = float(value or 0.0)
    if required:  # a distribution to draw from (the Shap methods); Captum wants more than one
        return {"baselines": torch.full((2, *x.shape[1:]), level, dtype=x.dtype, device=x.device)}
    return {"baselines": level}


def _inputs_per_image(cls: type, base: type | None, kwargs: Mapping[str, Any]) -> int:
    """How many inputs one image becomes in one forward of the method."""
    params = inspect.signature((base or cls).attribute).parameters
    count = int(kwargs.get("perturbations_per_eval", 1)) if "perturbations_per_eval" in params else 1
    if "n_samples" in params and "perturbations_per_eval" not in params:  # GradientShap's samples per image
        count *= int(kwargs.get("n_samples", params["n_samples"].default))
    elif "baselines" in params and params["baselines"].default is inspect.Parameter.empty:
        count *= 2  # DeepLiftShap: each image against each of the two baselines of _baselines
    if base is not None:
        nt = inspect.signature(cls.attribute).parameters
        count *= int(kwargs.get("nt_samples_batch_size") or kwargs.get("nt_samples", nt["nt_samples"].default))
    return max(count, 1)


def _deeplift_state(module: nn.Module) -> bool:
    """DeepLift keeps the input and output of each non-linear module it replaces."""
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    return isinstance(module, tuple(SUPPORTED_NON_LINEAR))


def _zennit_state(module: nn.Module) -> bool:
    """zennit's rules keep each layer's input; activations just pass the relevance on
    (a reused ReLU gives the same relevance as two, a reused convolution does not)."""
    from zennit.types import Activation

    return not isinstance(module, Activation)


def _without_lrp_rule(model: nn.Module) -> list[str]:
    """Leaf modules that Captum's LRP has no rule for (it cannot pass relevance through them)."""
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS

    known = (*SUPPORTED_LAYERS_WITH_RULES, *SUPPORTED_NON_LINEAR_LAYERS)
    return [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
            if name and not any(True for _ in m.children()) and type(m) not in known and not hasattr(m, "rule")]


def _as_input_map(attributions: Tensor, x: Tensor, interpolation: str, who: str) -> Tensor:
    """Input-shaped attributions as they are; a layer's (B, K, h, w) summed over K and
    resized to the input: (B, 1, H, W)."""
    if attributions.shape == x.shape:
        return attributions
    if attributions.dim() == 4 and len(attributions) == len(x):
        return F.interpolate(attributions.sum(dim=1, keepdim=True), size=x.shape[-2:], mode=interpolation)
    raise SanityError(f"{who} gives attributions of shape {tuple(attributions.shape)} for inputs "
                      f"{tuple(x.shape)}; choose a layer with a (B, K, h, w) output")


@contextlib.contextmanager
def _attributes_restored(model: nn.Module) -> Iterator[None]:
    """Remove the attributes a method sets on modules (Captum's LRP leaves `rule` and
    `activations` behind when it fails, and `activations` when it succeeds)."""
    before = {name: set(vars(module)) for name, module in model.named_modules()}
    try:
        yield
    finally:
        for name, module in model.named_modules():
            for attribute in set(vars(module)) - before.get(name, set()):
                delattr(module, attribute)


# -- zennit -----------------------------------------------------------------------------------------


def _zennit_composite(key: str, options: Mapping[str, Any]) -> tuple[type, dict, list[type]]:
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


# -- preflight --------------------------------------------------------------------------------------


def _refuse_known_failures(model: nn.Module, name: str, plan: _Plan, example: Tensor) -> None:
    """Refuse a method that is known to be silently wrong on this model's structure."""
    who = f"method '{name}' ({plan.describe})"
    if plan.without_rule:
        raise SanityError(f"{who} has no LRP rule for module {plan.without_rule[0]}; use method=lrp (zennit), "
                          "or reshape with a function call (x.flatten(1)) instead of a module")
    if not (plan.functional_relu_fails or plan.reuse_breaks or plan.needs_relu_module):
        return
    if isinstance(model, torch.jit.ScriptModule):
        raise SanityError(f"{who} needs hooks on the model's modules, and a TorchScript model takes none; "
                          "load its weights into model._target_ instead")
    calls, functional = _module_usage(model, example)
    if plan.functional_relu_fails and functional:
        raise SanityError(f"{who} would be silently wrong: {functional[0]} calls ReLU as a function (F.relu), which "
                          "Captum's hooks on nn.ReLU modules never see (Captum #1082, #837); give each ReLU "
                          "its own nn.ReLU module, or use another method (guided_backprop is built in)")
    modules = dict(model.named_modules())
    reused = [n for n, count in calls.items() if count > 1 and plan.reuse_breaks is not None
              and not any(True for _ in modules[n].children()) and plan.reuse_breaks(modules[n])]
    if reused:
        module = modules[reused[0]]
        raise SanityError(f"{who} would be silently wrong: module '{reused[0]}' ({type(module).__name__}) runs "
                          f"{calls[reused[0]]} times in one forward, and the method keeps one state per module; "
                          "give each use its own module")
    if plan.needs_relu_module and not any(isinstance(m, nn.ReLU) for m in modules.values()):
        raise SanityError(f"{who} would be the plain gradient: the model has no nn.ReLU module to hook")


class _ReluCalls(TorchFunctionMode):
    """Notes the module that is running whenever ReLU is called as a function outside an nn.ReLU."""

    def __init__(self, running: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.running = running
        self.outside: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name, module = self.running[-1]
        if any(func is relu for relu in _RELU_FUNCTIONS) and not isinstance(module, nn.ReLU):
            self.outside.append(f"module '{name}' ({type(module).__name__})" if name else "the model's forward")
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def _module_usage(model: nn.Module, example: Tensor) -> tuple[dict[str, int], list[str]]:
    """Calls of each module in one forward of `example` (1, C, H, W), and where ReLU is
    called as a function rather than through an nn.ReLU module."""
    running: list[tuple[str, nn.Module]] = [("", model)]
    calls: dict[str, int] = {}

    def enter(name: str, module: nn.Module) -> Callable[..., None]:
        return lambda *_: running.append((name, module))

    def leave(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            running.pop()
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(enter(name, module)),
                        module.register_forward_hook(leave(name))]
    try:
        with _ReluCalls(running) as relus:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls, relus.outside


def _model_state(model: nn.Module) -> dict[str, Any]:
    """What a method must leave as it found it: weights, hooks, modes."""
    hooks = {name: tuple(len(getattr(m, d, None) or {}) for d in _HOOK_DICTS)
             for name, m in model.named_modules()}
    hooks["(global)"] = tuple(len(getattr(nn.modules.module, f"_global{d}", {})) for d in _HOOK_DICTS)
    return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "hooks": hooks, "training": {n: m.training for n, m in model.named_modules()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def _state_change(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    changed = [k for k, v in before["weights"].items()
               if k not in after["weights"] or not torch.equal(v, after["weights"][k])]
    if changed:
        return f"changed the model's weights ({changed[0]}{' and more' if len(changed) > 1 else ''})"
    left = [n or "the model" for n, count in after["hooks"].items() if count != before["hooks"].get(n)]
    if left:
        return f"left hooks behind on {left[0]}"
    if after["training"] != before["training"] or after["requires_grad"] != before["requires_grad"]:
        return "changed the model's train/eval mode or its parameters' requires_grad"
    return None


# -- helpers ----------------------------------------------------------------------------------------


def _checked_shape(key: str, plan: _Plan, maps: Any, x: Tensor) -> Tensor:
    allowed = list(dict.fromkeys([tuple(x.shape), (len(x), 1, *x.shape[2:])]))
    if not isinstance(maps, Tensor) or tuple(maps.shape) not in allowed:
        got = f"{type(maps).__name__} {tuple(maps.shape)}" if isinstance(maps, Tensor) else type(maps).__name__
        raise SanityError(f"method '{key}' ({plan.describe}) returned {got} for inputs {tuple(x.shape)}; "
                          f"it must return {' or '.join(map(str, allowed))}")
    if maps.device != x.device:  # e.g. a meta tensor, which holds no values
        raise SanityError(f"method '{key}' ({plan.describe}) returned maps on device {maps.device}, not on its "
                          f"inputs' device ({x.device}); it must return them where the inputs are")
    return maps


def _require_extra(kind: str, key: str) -> None:
    if kind not in EXTRAS:
        raise SanityError(f"method '{key}' is not an external method; choose one of: {', '.join(EXTERNAL_KINDS)}")
    module, extra = EXTRAS[kind]
    try:
        __import__(module)
    except ImportError:
        raise SanityError(f'method {key} needs {module}, which is not installed: pip install "sanity-cli[{extra}]"') \
            from None


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's (CPU and the device's), NumPy's and Python's generators seeded, and
    restored after: the same draws in every model state, nothing changed for the caller."""
    devices = [device] if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


@contextlib.contextmanager
def _quiet_captum() -> Iterator[None]:
    """Captum's notes on every call (it set requires_grad on the input; it hooks the
    non-linear modules) are what this wrapper expects: keep them out of the log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
        warnings.filterwarnings("ignore", message="Setting (forward, )?backward hooks")
        yield


def _tuples(value: Any) -> Any:
    """Lists from the config as tuples, as Captum wants its shapes (sliding_window_shapes, strides)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}" if text else type(error).__name__
