"""GradCAM: capturing a layer's output during the forward, and the map from it.

The default layer (``layer: null``) is the last of the model's top-level children,
in forward order, whose output is a 4-D tensor with more than one spatial position
(H * W > 1): ``layer4`` of a ResNet, ``Mixed_7c`` of timm's Inception v3, the last
conv/ReLU/pool child of a flat ``nn.Sequential``. A model whose top-level children
never give such an output (e.g. a wrapper with one child) needs ``layer`` set.

The map is upsampled with ``interpolation`` (default bilinear) for gradcam and
guided_gradcam alike. Captum's ``GuidedGradCam`` upsamples with "nearest" unless
given ``interpolate_mode="bilinear"``; compare with that.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sanity_cli.methods.registry import MethodError


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model.named_modules()``."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        children = ", ".join(n for n, _ in model.named_children())
        raise MethodError(
            f"gradcam: {type(model).__name__} has no layer {name!r}; "
            f"use a name from model.named_modules() (top-level: {children})"
        )
    return modules[name]


class LayerCapture:
    """Forward hooks that keep the outputs of GradCAM layers; removed on exit.

    ``names`` are module names; ``None`` asks for the default layer (see the module
    docstring). Each hook keeps the module's output and hands the rest of the
    network a clone, so that a later in-place op (``ReLU(inplace=True)``) cannot
    change the tensor whose gradient GradCAM needs. After the forward,
    :meth:`activation` gives the kept (B, K, h, w) output of a layer.
    """

    def __init__(self, model: nn.Module, names: set[str | None]) -> None:
        self._model = model
        self._layers = {name: find_layer(model, name) for name in names if name is not None}
        self._wants_default = None in names
        self._outputs: dict[str, list[Tensor]] = {name: [] for name in self._layers}
        self._default: tuple[str, Tensor] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayerCapture:
        try:
            for name, module in self._layers.items():
                self._handles.append(module.register_forward_hook(self._keep(name)))
            if self._wants_default:
                for name, child in self._model.named_children():
                    self._handles.append(child.register_forward_hook(self._keep_candidate(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep(self, name: str) -> Callable[[nn.Module, Any, Any], Tensor]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor:
            if not isinstance(output, Tensor) or output.dim() != 4:
                raise MethodError(
                    f"gradcam: layer {name!r} must output a 4-D (B, K, h, w) tensor, "
                    f"got {type(output).__name__} {tuple(getattr(output, 'shape', ()))}"
                )
            self._outputs[name].append(output)
            return output.clone()

        return hook

    def _keep_candidate(self, name: str) -> Callable[[nn.Module, Any, Any], Tensor | None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
            if (
                isinstance(output, Tensor)
                and output.dim() == 4
                and output.shape[2] * output.shape[3] > 1
            ):
                self._default = (name, output)  # drop the earlier candidate: saves memory
                return output.clone()
            return None

        return hook

    def activation(self, name: str | None) -> Tensor:
        """The (B, K, h, w) output of layer ``name`` (None: the default layer)."""
        if name is None:
            if self._default is None:
                raise MethodError(
                    f"gradcam: no top-level child of {type(self._model).__name__} outputs a "
                    "4-D tensor with spatial size > 1; set the option `layer`"
                )
            return self._default[1]
        outputs = self._outputs[name]
        if len(outputs) != 1:
            raise MethodError(
                f"gradcam: layer {name!r} ran {len(outputs)} times in one forward; "
                "GradCAM needs a layer that runs once"
            )
        return outputs[0]


def gradcam_map(
    activation: Tensor, gradient: Tensor, size: tuple[int, int], interpolation: str
) -> Tensor:
    """GradCAM from a layer's output and the gradient there, both (B, K, h, w).

    Channel weights are the spatial mean of the gradient; the map is the ReLU of the
    weighted channel sum, (B, 1, h, w), resized to ``size`` = (H, W) with
    ``F.interpolate(mode=interpolation)`` (align_corners left at its default), as
    Captum's ``LayerGradCam`` followed by ``LayerAttribution.interpolate``.
    """
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=size, mode=interpolation)
