"""Guided backpropagation through every ReLU, however the model calls it.

Captum hooks ``nn.ReLU`` modules only, so a model that calls ``F.relu`` (as
torchvision's Inception v3 does) silently gets the plain gradient. Here a
``TorchFunctionMode`` is active during the forward pass and replaces each ReLU call
by :class:`_SwitchableRelu`, whose backward is either the ordinary ReLU backward or
the guided one, chosen by a flag read at backward time. One forward can therefore
serve an ordinary backward (gradient, GradCAM) and a guided backward (GBP).

ReLU entry points covered (checked on torch 2.x): ``nn.ReLU`` and ``nn.ReLU(inplace=
True)`` (both reach ``F.relu``, with ``inplace`` as a keyword), ``F.relu(x,
inplace)``, ``F.relu_`` (which is ``torch.relu_``), ``torch.relu``, ``torch.relu_``,
``Tensor.relu`` and ``Tensor.relu_``. timm's conv-norm-act blocks and ResNets use
``nn.ReLU(inplace=True)``; torchvision's Inception v3 calls ``F.relu(x,
inplace=True)``. Other rectifiers (``F.threshold``, ``clamp(min=0)``, ReLU6) are not
ReLUs here and keep their ordinary backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_OUT_OF_PLACE = (F.relu, torch.relu, Tensor.relu)
_IN_PLACE = (torch.relu_, Tensor.relu_)


@dataclass
class _Switch:
    """Shared by every ReLU of one forward; read when the backward runs."""

    guided: bool = False


def _relu_backward(grad: Tensor, output: Tensor, switch: _Switch) -> Tensor:
    """Ordinary ReLU backward (gradient where the output is positive), or the guided
    one, which also drops the negative gradient."""
    if switch.guided:
        grad = grad.clamp(min=0)
    # torch.where, not a product with the mask, to match autograd's threshold_backward
    # exactly (also where grad is inf or nan).
    return torch.where(output > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


class _SwitchableRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, switch: _Switch) -> Tensor:
        output = torch.relu(x)
        ctx.save_for_backward(output)
        ctx.switch = switch
        return output

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (output,) = ctx.saved_tensors
        return _relu_backward(grad, output, ctx.switch), None


class _SwitchableReluInplace(_SwitchableRelu):
    """In-place variant: the caller may rely on its tensor being modified. The
    backward is the out-of-place one's."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, switch: _Switch) -> Tensor:
        torch.relu_(x)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.switch = switch
        return x


def _relu_inplace(func: Any, args: tuple, kwargs: dict) -> bool | None:
    """True / False for an in-place / out-of-place ReLU call, None for any other."""
    if func is F.relu:
        return bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
    if any(func is relu for relu in _OUT_OF_PLACE):
        return False
    if any(func is relu for relu in _IN_PLACE):
        return True
    return None


class SwitchableReluMode(TorchFunctionMode):
    """Replaces every ReLU call by one whose backward :attr:`guided` switches.

    Active only around the forward pass (``with SwitchableReluMode() as relus:``);
    the backward passes run after it is left and read :attr:`guided` then.
    :attr:`relu_calls` counts the ReLU calls seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._switch = _Switch()
        self.relu_calls = 0

    @property
    def guided(self) -> bool:
        return self._switch.guided

    @guided.setter
    def guided(self, value: bool) -> None:
        self._switch.guided = value

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        inplace = _relu_inplace(func, args, kwargs)
        if inplace is None:
            return func(*args, **kwargs)
        self.relu_calls += 1
        x = args[0] if args else kwargs["input"]
        relu = _SwitchableReluInplace if inplace else _SwitchableRelu
        return relu.apply(x, self._switch)


@contextmanager
def switchable_relus(enabled: bool) -> Iterator[SwitchableReluMode | None]:
    """``SwitchableReluMode`` while the block runs if ``enabled``, else nothing."""
    if not enabled:
        yield None
        return
    with SwitchableReluMode() as mode:
        yield mode
