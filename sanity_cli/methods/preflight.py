"""Checks of the selected methods against the model, on one example, before any work.

A method that cannot do what it says on this model must fail here, in one line,
rather than compute something else for every state of a run:

* guided_backprop and guided_gradcam on a model that calls no ReLU: the guided
  backward would be the plain gradient;
* gradcam and guided_gradcam at a layer that is not spatial (no (B, K, h, w) map or
  ViT tokens, or a 1x1 map: a constant), that runs more than once in one forward (the
  hook would see two outputs), or where the explained logit's gradient is zero
  everywhere (a ViT's last block when the head reads the class token only: an
  all-zero map);
* attention_rollout and chefer on a model without a ViT's attention, or whose
  attention modules run more than once in one forward.

Noise methods are checked through their base method. :func:`preflight_all` is the one
preflight of a run: these checks, then each plugged method (captum, lrp, callable)
tried once by its adapter (see :mod:`sanity_cli.methods.external`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from sanity_cli.hooks import forward_census
from sanity_cli.methods.gradcam import LayerCapture, default_layer, find_layer
from sanity_cli.methods.gradients import logits_of, predict, resolve_target, target_score
from sanity_cli.methods.guided import switchable_relus
from sanity_cli.methods.registry import (
    METHODS,
    MethodCall,
    MethodError,
    entry,
    is_plugged,
    kind_of,
    resolve_call,
)
from sanity_cli.methods.transformers import attention_modules

MethodOptions = Mapping[str, Mapping[str, Any] | None]


def check_options(key: str, options: Mapping[str, Any] | None) -> None:
    """Validate one selected method's options before any work (no model needed): a
    one-line SanityError naming the setting. A ``layer`` left unset is the model's."""
    options = dict(options or {})
    kind = kind_of(key, options)
    options.pop("method", None)
    if entry(kind).plugged:
        # imported here: it loads Hydra's plug-in machinery
        from sanity_cli.methods.external import check_options as check_plugged

        check_plugged(key, {**options, "method": kind})
    else:
        resolve_call(kind, {k: v for k, v in options.items() if k != "layer" or v})


def preflight_all(
    model: nn.Module, method_options: MethodOptions, images: Tensor, targets: Tensor | None = None
) -> None:
    """The one check of every selected method ({key: options}, as explain_all takes
    them) on ``model`` before any work; a one-line SanityError for the first that
    would compute something else. images (B, C, H, W) on the model's device, targets
    (B,) the classes to explain (None: the model's predicted ones): the built-in methods
    are checked on the first image (:func:`preflight`; not on a TorchScript model, which
    takes no hooks: :func:`sanity_cli.models.check_torchscript` refuses what needs
    them), each plugged method is tried on the first two. The model must be in eval()
    mode and is left as it was."""
    if not isinstance(model, torch.jit.ScriptModule):
        preflight(model, method_options, images[:1])
    plugged = {key: options for key, options in method_options.items() if is_plugged(key, options)}
    if not plugged:
        return
    from sanity_cli.methods.external import preflight_external  # loads Hydra's plug-ins

    targets = predict(model, images[:2], 2) if targets is None else targets
    for key, options in plugged.items():
        preflight_external(model, key, options or {}, images, targets)


def preflight(model: nn.Module, method_options: MethodOptions, example: Tensor) -> None:
    """Raise a one-line MethodError (a SanityError) if a built-in method of
    ``method_options`` ({key: options}, as explain_all takes them) would silently
    compute something else on ``model``. ``example`` is one input batch (1, C, H, W) on
    the model's device; the model must be in eval() mode and is left as it was."""
    calls = dict(_calls(method_options))
    needs_relu = sorted(key for key, call in calls.items() if METHODS[call.method].relus)
    runs, relu_calls = _census(model, example, guided=bool(needs_relu))
    if needs_relu and relu_calls == 0:
        raise MethodError(
            f"{needs_relu[0]}: {type(model).__name__} calls no ReLU, so guided backpropagation "
            "would be the plain gradient; choose gradient or another method"
        )
    for key, call in calls.items():
        if METHODS[call.method].needs_layer:
            _check_gradcam(model, example, key, call.option("layer"), runs)
        elif call.family == "attention":
            _check_attention(model, key, runs)


def _calls(method_options: MethodOptions) -> Iterator[tuple[str, MethodCall]]:
    """(key, call) of every built-in method, and of the base method of each noise method.
    Plugged methods are checked by their adapters' preflight."""
    for key, options in method_options.items():
        options = dict(options or {})
        name = kind_of(key, options)
        options.pop("method", None)
        if name not in METHODS:
            continue
        if options.get("layer") is None:
            options.pop("layer", None)
        call = resolve_call(name, options)
        yield key, call
        if call.family == "noise":
            yield f"{key} (base {call.option('base').method})", call.option("base")


def _census(model: nn.Module, example: Tensor, guided: bool) -> tuple[dict[str, int], int]:
    """How many times each module runs in one forward of ``example``, and how many
    ReLU calls the forward makes (counted only if ``guided``)."""
    relu_calls = 0

    def forward(model: nn.Module, example: Tensor) -> None:
        nonlocal relu_calls
        with switchable_relus(guided) as relus:
            logits_of(model, example)
        relu_calls = relus.relu_calls if relus is not None else 0

    return forward_census(model, example, forward=forward).calls, relu_calls


def _runs_once(key: str, what: str, name: str, runs: dict[str, int]) -> None:
    times = runs.get(name, 0)
    if times != 1:
        raise MethodError(
            f"{key}: {what} {name!r} runs {times} times in one forward pass, and the method "
            "hooks one call per module; use a module the model calls once"
        )


def _check_gradcam(model: nn.Module, example: Tensor, key: str, layer: str | None,
                   runs: dict[str, int]) -> None:
    named = layer or default_layer(model)
    if named is not None:
        find_layer(model, named)
        _runs_once(key, "layer", named, runs)
    inputs = example.detach().requires_grad_(True)
    with torch.enable_grad():
        with LayerCapture(model, {layer}) as capture:
            logits = logits_of(model, inputs)
        activation = capture.activation(layer)
        where = capture.layer_name(layer)
        if activation.shape[2] * activation.shape[3] < 2:
            raise MethodError(
                f"{key}: layer {where!r} gives a 1x1 map, so GradCAM would be constant; "
                "choose a layer with spatial extent"
            )
        score = target_score(logits, resolve_target(logits, "predicted"))
        (gradient,) = torch.autograd.grad(score, activation, allow_unused=True)
    if gradient is None or not bool(gradient.ne(0).any()):
        raise MethodError(
            f"{key}: the explained logit does not depend on the output of layer {where!r} "
            "(zero gradient), so every map would be 0; choose an earlier layer"
        )


def _check_attention(model: nn.Module, key: str, runs: dict[str, int]) -> None:
    for name, _ in attention_modules(model, key):
        _runs_once(key, "attention module", name, runs)
