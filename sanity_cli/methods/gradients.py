"""The one-pass methods: gradient, input_x_gradient, gradcam, guided_backprop and
guided_gradcam, all computed from ONE forward pass of the batch.

Cost of :func:`shared_pass` on a batch of B inputs:

* one forward (with the ReLUs made switchable if a guided method is asked for, and
  forward hooks on the GradCAM layers);
* one ordinary backward (``autograd.grad`` of the summed target logits with respect
  to the input and the GradCAM layers' outputs) if gradient, input_x_gradient,
  gradcam or guided_gradcam is asked for;
* one guided backward (with respect to the input) if guided_backprop or
  guided_gradcam is asked for, on the same graph (kept by ``retain_graph``).

The backward differentiates the sum over the batch of ``logits[i, target[i]]``: one
backward gives every sample's gradient, and no sample's map depends on another's as
long as the model treats samples independently. That is the caller's duty: call the
methods with the model in ``eval()`` mode (batch norm in train mode mixes the batch);
the mode is never changed here.

Only gradients with respect to the inputs and hooked activations are taken (never
``.backward()``), so parameters get no ``.grad``, and their ``requires_grad`` flags are
left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sanity_cli.methods.counting import record_backward, record_forward
from sanity_cli.methods.gradcam import LayerCapture, gradcam_map
from sanity_cli.methods.guided import switchable_relus
from sanity_cli.methods.registry import MethodCall, MethodError

PREDICTED = "predicted"
Target = Tensor | str

_GUIDED = {"guided_backprop", "guided_gradcam"}
_NEEDS_INPUT_GRADIENT = {"gradient", "input_x_gradient"}
_NEEDS_CAM = {"gradcam", "guided_gradcam"}


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for sums of many maps (MPS has no float64: float32 there)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def logits_of(model: nn.Module, inputs: Tensor) -> Tensor:
    """``model(inputs)``, counted as one forward, checked to be (B, K) logits."""
    logits = model(inputs)
    record_forward(len(inputs))
    if not isinstance(logits, Tensor) or logits.dim() != 2 or len(logits) != len(inputs):
        shape = tuple(getattr(logits, "shape", ()))
        raise MethodError(
            f"the model must return (B, K) logits for B inputs; got {type(logits).__name__} "
            f"{shape} for B={len(inputs)} (is it in eval() mode?)"
        )
    return logits


def target_score(logits: Tensor, target: Tensor) -> Tensor:
    """Sum over i of ``logits[i, target[i]]``: a scalar whose gradient holds every
    sample's gradient of its own target logit."""
    return logits.gather(1, target[:, None]).sum()


def resolve_target(logits: Tensor, target: Target) -> Tensor:
    """The (B,) target classes: ``target`` itself, or the logits' argmax."""
    return logits.detach().argmax(dim=1) if isinstance(target, str) else target


def predict(model: nn.Module, x: Tensor, max_batch: int) -> Tensor:
    """The model's argmax class for each input of x (B, C, H, W), no gradient; (B,)."""
    with torch.no_grad():
        return torch.cat([logits_of(model, chunk).argmax(dim=1) for chunk in x.split(max_batch)])


def input_gradient(model: nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """d logits[i, target[i]] / d inputs[i] for every i, (N, C, H, W); one forward
    and one backward."""
    inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        score = target_score(logits_of(model, inputs), target)
        (gradient,) = torch.autograd.grad(score, inputs)
    record_backward(len(inputs))
    return gradient


def shared_pass(
    model: nn.Module, x: Tensor, target: Target, calls: Sequence[MethodCall]
) -> tuple[dict[MethodCall, Tensor], Tensor]:
    """Every one-pass method of ``calls`` on x (B, C, H, W) from one forward.

    ``target`` is a (B,) LongTensor or "predicted" (the argmax of this forward's
    logits). Returns the maps, (B, C, H, W) or (B, 1, H, W) for gradcam, and the
    (B,) target used. See the module docstring for the passes it makes.
    """
    methods = {call.method for call in calls}
    guided = bool(methods & _GUIDED)
    layers = sorted({call.option("layer") for call in calls if call.method in _NEEDS_CAM}, key=str)
    inputs = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with LayerCapture(model, set(layers)) as capture, switchable_relus(guided) as relus:
            logits = logits_of(model, inputs)
        if relus is not None and relus.relu_calls == 0:
            raise MethodError(
                f"guided_backprop needs a ReLU network; {type(model).__name__} has no ReLU "
                "(no nn.ReLU, F.relu, torch.relu or Tensor.relu call in its forward)"
            )
        target = resolve_target(logits, target)
        score = target_score(logits, target)
        # Ordinary backward first (guided switched off), keeping the graph for the
        # guided backward; a guided_gradcam needs both.
        wrt = ([inputs] if methods & _NEEDS_INPUT_GRADIENT else []) + [
            capture.activation(layer) for layer in layers
        ]
        grads: list[Tensor | None] = []
        if wrt:
            grads = list(torch.autograd.grad(score, wrt, retain_graph=guided, allow_unused=True))
            record_backward(len(x))
        guided_gradient = None
        if relus is not None:
            relus.guided = True
            (guided_gradient,) = torch.autograd.grad(score, inputs)
            record_backward(len(x))
    input_grad = grads.pop(0) if methods & _NEEDS_INPUT_GRADIENT else None
    cams = {
        layer: (capture.activation(layer).detach(), _used(grad, layer))
        for layer, grad in zip(layers, grads, strict=True)
    }
    maps = {call: _one_pass_map(call, x, input_grad, guided_gradient, cams) for call in calls}
    return maps, target


def _used(gradient: Tensor | None, layer: str | None) -> Tensor:
    if gradient is None:
        raise MethodError(f"gradcam: the target logit does not depend on layer {layer!r}")
    return gradient


def _one_pass_map(
    call: MethodCall,
    x: Tensor,
    input_grad: Tensor | None,
    guided_grad: Tensor | None,
    cams: dict[str | None, tuple[Tensor, Tensor]],
) -> Tensor:
    """The map of one call from the gradients of :func:`shared_pass`."""
    if call.method == "gradient":
        return input_grad
    if call.method == "input_x_gradient":
        return input_grad * x
    if call.method == "guided_backprop":
        return guided_grad
    activation, gradient = cams[call.option("layer")]
    cam = gradcam_map(activation, gradient, tuple(x.shape[2:]), call.option("interpolation"))
    return cam if call.method == "gradcam" else guided_grad * cam
