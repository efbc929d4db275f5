"""Attention maps of Vision Transformers (timm ViT and DeiT): attention rollout
(Abnar & Zuidema 2020) and gradient-weighted attention (Chefer et al. 2021, "Generic
attention-model explainability"). Both give (B, 1, H, W): the class token's relevance
to each patch, laid out on the patch grid and upsampled to the input.

Reading attention. timm's ``Attention`` multiplies explicit probabilities
softmax(q k^T / sqrt(d)) with the values only when its ``fused_attn`` flag is off;
otherwise ``F.scaled_dot_product_attention`` never materializes them.
:func:`attention_probabilities` turns the flag off on every attention module of the
model and keeps the output of each module's ``attn_drop`` (a dropout, the identity in
eval mode): the (B, heads, N, N) probabilities that the forward itself goes on with,
so their gradient is the forward's. Flags and hooks are restored on exit, also on error.

* Rollout: each layer's attention fused over heads (mean by default, or max / min),
  averaged with the identity for the residual connection, rows renormalized; the
  product from the first layer to the last; the class token's row. It does not
  depend on the explained class.
* Chefer: R = I, then for each layer from the first, R <- R + mean_heads((dA * A)^+) R,
  with dA the gradient of the explained logit with respect to that layer's
  attention A; the class token's row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sanity_cli.hooks import Hooks
from sanity_cli.methods.counting import record_backward
from sanity_cli.methods.gradcam import token_grid
from sanity_cli.methods.gradients import logits_of, target_score
from sanity_cli.methods.registry import MethodError


def attention_modules(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    """The (name, module) of every timm attention module of a ViT-style model with a
    class token; a MethodError naming ``method`` for any other model."""
    if token_grid(model) is None or getattr(model, "cls_token", None) is None:
        raise MethodError(
            f"{method}: needs a Vision Transformer with a class token (timm ViT or DeiT); "
            f"{type(model).__name__} is not one"
        )
    found = [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "fused_attn")
        and isinstance(getattr(module, "attn_drop", None), nn.Dropout)
    ]
    if not found:
        raise MethodError(
            f"{method}: {type(model).__name__} has no timm Attention module "
            "(one with `fused_attn` and `attn_drop`) to read attention from"
        )
    return found


@contextmanager
def attention_probabilities(model: nn.Module, method: str) -> Iterator[list[Tensor]]:
    """While the block runs, each forward appends every attention layer's probabilities
    (B, heads, N, N) to the yielded list, in forward order; fused attention is off."""
    modules = attention_modules(model, method)
    kept: list[Tensor] = []
    flags = [module.fused_attn for _, module in modules]

    def keep(module: nn.Module, inputs: Any, output: Tensor) -> None:
        kept.append(output)

    try:
        with Hooks() as hooks:
            for _, module in modules:
                module.fused_attn = False
                hooks.add(module.attn_drop.register_forward_hook(keep))
            yield kept
    finally:
        for (_, module), flag in zip(modules, flags, strict=True):
            module.fused_attn = flag


def _forward(model: nn.Module, x: Tensor, method: str) -> tuple[Tensor, list[Tensor]]:
    """Logits (B, K) and every layer's attention (B, heads, N, N) from one forward."""
    with attention_probabilities(model, method) as kept:
        logits = logits_of(model, x)
    layers = len(attention_modules(model, method))
    if len(kept) != layers:
        raise MethodError(
            f"{method}: {layers} attention modules ran {len(kept)} times in one forward; "
            "each must run once"
        )
    return logits, kept


def rollout(attentions: Sequence[Tensor], head_fusion: str = "mean") -> Tensor:
    """Attention rollout of per-layer attentions (B, heads, N, N), first layer first;
    (B, N, N). Identity attention everywhere gives the identity."""
    fused = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    result: Tensor | None = None
    for attention in attentions:
        eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
        step = 0.5 * fused[head_fusion](attention) + 0.5 * eye
        step = step / step.sum(dim=-1, keepdim=True)
        result = step if result is None else step @ result
    return result


def gradient_weighted(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """Chefer et al.'s relevance of per-layer attentions and their gradients, each
    (B, heads, N, N), first layer first; (B, N, N)."""
    batch, _, tokens, _ = attentions[0].shape
    eye = torch.eye(tokens, dtype=attentions[0].dtype, device=attentions[0].device)
    relevance = eye.expand(batch, tokens, tokens)
    for attention, gradient in zip(attentions, gradients, strict=True):
        weighted = (gradient * attention).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance


def class_token_map(
    model: nn.Module, relevance: Tensor, size: tuple[int, int], interpolation: str
) -> Tensor:
    """The class token's row of relevance (B, N, N) over the patch tokens, on the patch
    grid, resized to ``size`` = (H, W); (B, 1, H, W)."""
    prefix, (h, w) = token_grid(model)
    grid = relevance[:, 0, prefix:].reshape(len(relevance), 1, h, w)
    return F.interpolate(grid, size=size, mode=interpolation)


def attention_rollout(
    model: nn.Module, x: Tensor, *, head_fusion: str, interpolation: str, max_batch: int
) -> Tensor:
    """Rollout maps (B, 1, H, W) of x (B, C, H, W), ``max_batch`` inputs per forward."""
    maps = []
    with torch.no_grad():
        for chunk in x.split(max_batch):
            _, attentions = _forward(model, chunk, "attention_rollout")
            relevance = rollout(attentions, head_fusion)
            maps.append(class_token_map(model, relevance, tuple(x.shape[2:]), interpolation))
    return torch.cat(maps)


def chefer(
    model: nn.Module, x: Tensor, target: Tensor, *, interpolation: str, max_batch: int
) -> Tensor:
    """Gradient-weighted attention maps (B, 1, H, W) of x (B, C, H, W) for the (B,)
    target classes: one forward and one backward per ``max_batch`` inputs."""
    maps = []
    for chunk, chunk_target in zip(x.split(max_batch), target.split(max_batch), strict=True):
        inputs = chunk.detach().requires_grad_(True)  # a graph even where no parameter needs one
        with torch.enable_grad():
            logits, attentions = _forward(model, inputs, "chefer")
            gradients = torch.autograd.grad(target_score(logits, chunk_target), attentions)
        record_backward(len(chunk))
        relevance = gradient_weighted([a.detach() for a in attentions], gradients)
        maps.append(class_token_map(model, relevance, tuple(x.shape[2:]), interpolation))
    return torch.cat(maps)
