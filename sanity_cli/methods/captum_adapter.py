"""The Captum adapter: a class of ``captum.attr`` named in ``attribution``, built on the
model with ``kwargs`` and called with ``attribute_kwargs`` and the explained classes.

A layer method's (B, K, h, w) map is summed over K and resized to the input, (B, 1,
H, W); NoiseTunnel wraps the class named in ``base``. The plan says which classes are
known to be silently wrong on some models (see :mod:`sanity_cli.methods.external`).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sanity_cli import plugins
from sanity_cli.errors import SanityError, one_line
from sanity_cli.methods.adapter import Plan, seeded
from sanity_cli.methods.gradcam import default_gradcam_layer
from sanity_cli.methods.registry import INTERPOLATIONS

# Captum classes that hook nn.ReLU modules and nothing else.
RELU_HOOKS = ("GuidedBackprop", "Deconvolution", "GuidedGradCam")
# Captum classes that replace the backward of the non-linear modules they find.
DEEPLIFT = ("DeepLift", "DeepLiftShap", "LayerDeepLift", "LayerDeepLiftShap")
# Captum classes that need a propagation rule on every leaf module.
CAPTUM_LRP = ("LRP", "LayerLRP")
# Captum classes whose map of an image depends on the other images of its batch.
ACROSS_BATCH = ("FeaturePermutation", "LayerFeaturePermutation")


def captum_plan(model: nn.Module, options: dict, key: str, example: Tensor, max_batch: int) -> Plan:
    cls, base = check_captum(key, options)
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
        with seeded(seed, x.device), _attributes_restored(model), _quiet_captum():
            try:
                attributions = method.attribute(x, target=classes, **kwargs)
            except Exception as error:  # noqa: BLE001 - Captum reports bad settings with many error types
                raise SanityError(f"method '{key}' ({describe}) failed: {one_line(error)}") from None
        attributions = attributions[0] if isinstance(attributions, tuple) else attributions
        return _as_input_map(attributions, x, interpolation, f"method '{key}' ({describe})")

    names = {cls.__name__, getattr(base, "__name__", "")}
    return Plan(describe, explain, _inputs_per_image(cls, base, attribute_kwargs),
                 functional_relu_fails=bool(names & {*RELU_HOOKS, *DEEPLIFT}),
                 reuse_breaks=_deeplift_state if names & set(DEEPLIFT) else None,
                 needs_relu_module=bool(names & set(RELU_HOOKS)),
                 without_rule=_without_lrp_rule(model) if names & set(CAPTUM_LRP) else [])


def check_captum(key: str, options: Mapping[str, Any]) -> tuple[type, type | None]:
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
            raise SanityError(f"method '{key}': captum {klass.__name__}(model, ...) failed: {one_line(error)}; "
                              f"check method.{key}.{kwargs_key}") from None

    if base is None:
        return build(cls, "kwargs")
    return cls(build(base, "base_kwargs"), **plugins.keyword_arguments(options.get("kwargs"), f"method.{key}.kwargs"))


def _layer(model: nn.Module, name: str | None, key: str, example: Tensor) -> nn.Module:
    """The module named `name`, or the model's last module with a 4-D output."""
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
