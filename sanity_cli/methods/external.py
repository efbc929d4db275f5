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

Captum's and zennit's specifics live in :mod:`~sanity_cli.methods.captum_adapter` and
:mod:`~sanity_cli.methods.zennit_adapter`; each adapter returns a
:class:`~sanity_cli.methods.adapter.Plan`, and this module runs and checks plans.

They are entries of the one registry (family ``plugged``): ``explain_all`` hands each
to :func:`explain_external` and the one preflight to :func:`preflight_external`. They
share no pass with the built-in methods: each is called on chunks of the batch, so
that no forward sees more than about ``max_batch`` inputs (a chunk is
``max_batch`` divided by the inputs a method makes of one image: GradientShap's
``n_samples``, NoiseTunnel's ``nt_samples``, Occlusion's ``perturbations_per_eval``).
Torch's and NumPy's random generators are seeded the same way for every model
state (and restored afterwards), so a method that draws noise draws the same noise
in every state; attributes that Captum leaves on modules are removed.

`preflight_external`, the plugged part of ``preflight_all``, calls a method once on
two images before any work, and
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

import traceback
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sanity_cli import plugins
from sanity_cli.errors import SanityError, one_line
from sanity_cli.hooks import forward_census
from sanity_cli.methods.adapter import Plan, seeded
from sanity_cli.methods.captum_adapter import captum_plan, check_captum
from sanity_cli.methods.registry import REGISTRY, kind_of
from sanity_cli.methods.zennit_adapter import lrp_plan, zennit_composite

EXTERNAL_KINDS = tuple(name for name, spec in REGISTRY.items() if spec.plugged)
EXTRAS = {"captum": ("captum", "captum"), "lrp": ("zennit", "lrp")}  # kind: (module, pip extra)
OPTIONS = {
    "captum": ("method", "attribution", "kwargs", "attribute_kwargs", "layer", "baselines", "base", "base_kwargs",
               "interpolation", "seed"),
    "lrp": ("method", "composite", "composite_kwargs", "canonizers"),
}
CALLABLE_SEED = 0  # the seed a plugged function's random draws start from, in every state
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def is_external(kind: str) -> bool:
    """Whether a method kind is computed here rather than by the built-in planner."""
    return kind in EXTERNAL_KINDS


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Validate an external method's options before any work (no model needed);
    raise a one-line SanityError naming the setting."""
    kind = kind_of(name, options)
    if kind == "callable":
        plugins.method_function(options, f"method.{name}")
        return
    _require_extra(kind, name)
    unknown = sorted(set(options) - set(OPTIONS[kind]))
    if unknown:
        raise SanityError(f"method.{name}: unknown option(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(OPTIONS[kind][1:])}")
    if kind == "captum":
        check_captum(name, options)
    else:
        zennit_composite(name, options)


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


def _plan(model: nn.Module, options: dict, key: str, example: Tensor, max_batch: int) -> Plan:
    kind = kind_of(key, options)
    if kind == "callable":
        return _callable_plan(model, options, key)
    _require_extra(kind, key)
    if kind == "captum":
        return captum_plan(model, options, key, example, max_batch)
    if kind == "lrp":
        return lrp_plan(model, options, key)
    raise SanityError(f"method '{key}' is not an external method; choose one of: {', '.join(EXTERNAL_KINDS)}")


def _callable_plan(model: nn.Module, options: dict, key: str) -> Plan:
    function, kwargs = plugins.method_function(options, f"method.{key}")
    target = options["_target_"]

    def explain(x: Tensor, classes: Tensor) -> Tensor:
        with seeded(CALLABLE_SEED, x.device):
            try:
                return function(model, x, classes, **kwargs)
            except SanityError:
                raise
            except Exception as error:  # noqa: BLE001 - the user's code may fail any way; say where, in one line
                raise SanityError(f"method '{key}' ({target}) failed{_where(error)}: {one_line(error)}") from None

    return Plan(f"function {target}", explain)


def _refuse_known_failures(model: nn.Module, name: str, plan: Plan, example: Tensor) -> None:
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
    census = forward_census(model, example, relu_functions=True)
    calls, functional = census.calls, census.functional_relus
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


def _checked_shape(key: str, plan: Plan, maps: Any, x: Tensor) -> Tensor:
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


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
