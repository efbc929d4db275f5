"""Hooks on a model's modules, removed whatever happens, and the one forward census.

Every hook this package puts on a model goes through :class:`Hooks`, a list of
handles that removes them all when its block ends, on error too (as zennit's
handle lists do)::

    with Hooks() as hooks:
        hooks.add(module.register_forward_hook(keep))
        model(x)

:func:`forward_census` runs one forward and records, for each module, how often
and in which order it runs and what it returns; the blocks of a randomization, the
default GradCAM layer and the methods' preflight all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)


class Hooks:
    """Hook handles that are removed together when the ``with`` block ends, or by
    :meth:`remove`; a hook registered inside the block never outlives it."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Keep ``handle`` (what ``register_*_hook`` returns) for removal."""
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.remove()


@dataclass
class Census:
    """What one forward did, module by module (names as in ``model.named_modules()``,
    the model itself as "")."""

    calls: dict[str, int] = field(default_factory=dict)  # name -> times it ran
    order: dict[str, int] = field(default_factory=dict)  # name -> position of its first call
    spatial: list[str] = field(default_factory=list)     # modules (not the model) whose call returned a
    # (B, K, h, w) tensor with h * w > 1, in the order the calls finished
    functional_relus: list[str] = field(default_factory=list)  # where ReLU was called as a function
    # outside an nn.ReLU module ("module 'name' (Type)", or "the model's forward")

    def last_spatial_once(self) -> str | None:
        """The last module, in the order calls finish, with a spatial output and one call."""
        once = [name for name in self.spatial if self.calls[name] == 1]
        return once[-1] if once else None


class _ReluCalls(TorchFunctionMode):
    """Notes the running module whenever ReLU is called as a function outside an nn.ReLU."""

    def __init__(self, running: list[tuple[str, nn.Module]], outside: list[str]) -> None:
        super().__init__()
        self.running, self.outside = running, outside

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name, module = self.running[-1]
        if any(func is relu for relu in _RELU_FUNCTIONS) and not isinstance(module, nn.ReLU):
            self.outside.append(f"module '{name}' ({type(module).__name__})" if name else "the model's forward")
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def forward_census(model: nn.Module, example: Tensor, *,
                   forward: Callable[[nn.Module, Tensor], Any] | None = None,
                   eval_mode: bool = False, relu_functions: bool = False) -> Census:
    """Run one forward of ``example`` (1, C, H, W) without gradients and record it.

    forward: how to call the model (``model(example)`` when None); eval_mode: run in
    eval() mode and restore the model's mode after; relu_functions: also note where
    ReLU is called as a function (:attr:`Census.functional_relus`). The hooks are
    removed on exit, on error too."""
    census = Census()
    running: list[tuple[str, nn.Module]] = [("", model)]

    def enter(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            census.calls[name] = census.calls.get(name, 0) + 1
            census.order.setdefault(name, len(census.order))
            running.append((name, module))
        return hook

    def leave(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            running.pop()
            if name and isinstance(output, Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
                census.spatial.append(name)
        return hook

    was_training = model.training
    with Hooks() as hooks:
        for name, module in model.named_modules():
            hooks.add(module.register_forward_pre_hook(enter(name, module)))
            hooks.add(module.register_forward_hook(leave(name)))
        try:
            if eval_mode:
                model.eval()
            with _ReluCalls(running, census.functional_relus) if relu_functions else nullcontext():
                (forward or _call)(model, example)
        finally:
            if eval_mode:
                model.train(was_training)
    return census


def _call(model: nn.Module, example: Tensor) -> Any:
    return model(example)
