"""Explanation methods of your own, for `method=callable method.callable._target_=my_methods.saliency`.

A method is a function fn(model, x, target, **kwargs): x is a batch (B, C, H, W) of
model inputs, target the (B,) classes to explain; it returns maps (B, C, H, W) or
(B, 1, H, W). It must leave the model as it found it (weights, hooks, mode).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def saliency(model: nn.Module, x: Tensor, target: Tensor, absolute: bool = False) -> Tensor:
    """The gradient of each image's target logit with respect to the image, (B, C, H, W)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return gradient.abs() if absolute else gradient


def input_only(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """The input itself, whatever the model: a "method" that the sanity checks must
    catch, since its maps cannot change when the model is randomized. (B, C, H, W)."""
    return x.detach().clone()
