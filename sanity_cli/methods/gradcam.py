"""GradCAM: capturing a layer's output during the forward, and the map from it.

A layer's output becomes a (B, K, h, w) feature map by its layout:

* (B, K, h, w) tensors (convolutions) as they are;
* (B, h, w, K) tensors of a timm model whose ``output_fmt`` is NHWC (Swin), except
  the outputs of convolutions, permuted to (B, K, h, w);
* (B, N, D) tokens of a ViT-style model (timm VisionTransformer, DeiT: a
  ``patch_embed.grid_size`` and ``num_prefix_tokens``): the class / distillation /
  register tokens dropped and the N - prefix patch tokens laid out on their (h, w)
  grid, row by row as the patch embedding flattened them, giving (B, D, h, w).

The default layer (``layer: null``) of a ViT-style model is the first norm of its
last block, ``blocks.{L-1}.norm1``: the input of the last attention. The output of
the last block itself is no use when the head reads the class token only, since
the patch tokens there no longer reach the logits (their gradient is zero). For
other models the default is the last of the model's top-level children, in forward
order, whose output is a feature map with more than one spatial position (h * w >
1): ``layer4`` of a ResNet, ``Mixed_7c`` of timm's Inception v3, ``norm`` of a Swin,
the last conv/ReLU/pool child of a flat ``nn.Sequential``. A model whose top-level
children never give such an output (e.g. a wrapper with one child) needs ``layer`` set.

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

from sanity_cli.hooks import Hooks, forward_census
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


def token_grid(model: nn.Module) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, (h, w) patch grid) of a ViT-style model, else None."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    blocks = getattr(model, "blocks", None)
    has_blocks = isinstance(blocks, nn.Sequential | nn.ModuleList)
    if grid is None or not isinstance(prefix, int) or not has_blocks:
        return None
    return prefix, (int(grid[0]), int(grid[1]))


def default_layer(model: nn.Module) -> str | None:
    """The named default GradCAM layer of a ViT-style model (module docstring); None
    for other models, whose default is found during the forward."""
    if token_grid(model) is None or len(model.blocks) == 0:
        return None
    last = f"blocks.{len(model.blocks) - 1}"
    return f"{last}.norm1" if hasattr(model.blocks[-1], "norm1") else last


def default_gradcam_layer(model: nn.Module, example: Tensor) -> str | None:
    """The name of the last module, in forward order, that outputs a (B, K, h, w) tensor
    with h * w > 1 and runs once per forward: GradCAM's layer for a model whose config
    names none (and Captum's layer methods' default). None where there is no such
    module (or the model takes no hooks, as a TorchScript model). `example` is one
    input batch (1, C, H, W) on the model's device; the forward runs in eval() mode.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return None
    return forward_census(model, example, eval_mode=True).last_spatial_once()


Rebuild = Callable[[Tensor], Tensor]


def feature_map(model: nn.Module, module: nn.Module, output: Any) -> tuple[Tensor, Rebuild] | None:
    """``output`` of ``module`` as a (B, K, h, w) map (layouts in the module docstring),
    with the function that turns that map back into a new output for the rest of the
    network; None when the output is no feature map. The network goes on with the
    rebuilt output, so the map lies on the path to the logits (its gradient is the
    forward's) and no later in-place op (``ReLU(inplace=True)``) can change it."""
    if not isinstance(output, Tensor):
        return None
    tokens = token_grid(model)
    if output.dim() == 3 and tokens is not None:
        prefix, (h, w) = tokens
        if output.shape[1] != prefix + h * w:
            raise MethodError(
                f"gradcam: {output.shape[1]} tokens do not make {prefix} prefix tokens and a "
                f"{h}x{w} patch grid; give the model inputs of the size it was built for"
            )
        grid = output[:, prefix:].transpose(1, 2).reshape(len(output), -1, h, w)
        return grid, lambda g: torch.cat([output[:, :prefix], g.flatten(2).transpose(1, 2)], dim=1)
    if output.dim() != 4:
        return None
    channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
    if channels_last and not isinstance(module, nn.modules.conv._ConvNd):
        return output.permute(0, 3, 1, 2), lambda g: g.permute(0, 2, 3, 1).clone()
    return output, lambda g: g.clone()


class LayerCapture:
    """Forward hooks that keep the outputs of GradCAM layers; removed on exit.

    ``names`` are module names; ``None`` asks for the default layer (see the module
    docstring). Each hook keeps the layer's output as a (B, K, h, w) feature map
    (:func:`feature_map`) and hands the rest of the network a new tensor rebuilt from
    it. After the forward, :meth:`activation` gives the kept map of a layer.
    """

    def __init__(self, model: nn.Module, names: set[str | None]) -> None:
        self._model = model
        default = default_layer(model)
        self._resolved = {name: default if name is None else name for name in names}
        self._layers = {
            name: find_layer(model, resolved)
            for name, resolved in self._resolved.items()
            if resolved is not None
        }
        self._wants_default = None in names and default is None
        self._outputs: dict[str | None, list[Tensor]] = {name: [] for name in self._layers}
        self._default: tuple[str, Tensor] | None = None
        self._hooks = Hooks()

    def __enter__(self) -> LayerCapture:
        try:
            for name, module in self._layers.items():
                self._hooks.add(module.register_forward_hook(self._keep(name)))
            if self._wants_default:
                for name, child in self._model.named_children():
                    self._hooks.add(child.register_forward_hook(self._keep_candidate(name)))
        except BaseException:
            self._hooks.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._hooks.remove()

    def _keep(self, name: str | None) -> Callable[[nn.Module, Any, Any], Tensor]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor:
            converted = feature_map(self._model, module, output)
            if converted is None:
                shape = tuple(getattr(output, "shape", ()))
                raise MethodError(
                    f"gradcam: layer {self._resolved[name]!r} must output a 4-D (B, K, h, w) "
                    f"tensor or ViT tokens, got {type(output).__name__} {shape}"
                )
            grid, rebuild = converted
            self._outputs[name].append(grid)
            return rebuild(grid)

        return hook

    def _keep_candidate(self, name: str) -> Callable[[nn.Module, Any, Any], Tensor | None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
            converted = feature_map(self._model, module, output)
            if converted is None or output.dim() != 4:
                return None
            grid, rebuild = converted
            if grid.shape[2] * grid.shape[3] > 1:
                self._default = (name, grid)  # drop the earlier candidate: saves memory
                return rebuild(grid)
            return None

        return hook

    def layer_name(self, name: str | None) -> str | None:
        """The module behind ``name`` (None: the default layer; None if not yet found)."""
        if self._resolved[name] is not None:
            return self._resolved[name]
        return self._default[0] if self._default else None

    def activation(self, name: str | None) -> Tensor:
        """The (B, K, h, w) output of layer ``name`` (None: the default layer)."""
        if name is None and self._wants_default:
            if self._default is None:
                raise MethodError(
                    f"gradcam: no top-level child of {type(self._model).__name__} outputs a "
                    "4-D tensor with spatial size > 1; set the option `layer`"
                )
            return self._default[1]
        outputs = self._outputs[name]
        if len(outputs) != 1:
            raise MethodError(
                f"gradcam: layer {self._resolved[name]!r} ran {len(outputs)} times in one forward; "
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
