"""Methods for transformers: GradCAM on token maps and NHWC maps, attention rollout and
Chefer's gradient-weighted attention, against closed forms and a written-out ViT forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sanity_cli.errors import SanityError
from sanity_cli.methods import count_passes, explain, explain_all
from sanity_cli.methods.transformers import gradient_weighted, rollout
from sanity_cli.validation import validate

GRID = (4, 6)  # a non-square patch grid: a transposed layout cannot pass
SIZE = (32, 48)


def _vit(depth: int = 2) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=16, depth=depth, num_heads=2, num_classes=5)
    with torch.no_grad():  # timm starts tokens near 0 and biases at 0: move them, as training does
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.double().eval()


def _images(n: int = 3) -> Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _written_out(model: VisionTransformer, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The ViT forward spelled out, with each layer's attention probabilities (B, heads, N, N)."""
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), model.patch_embed(x)], dim=1) + model.pos_embed
    attentions = []
    for block in model.blocks:
        h = block.norm1(tokens)
        batch, n, width = h.shape
        heads = block.attn.num_heads
        q, k, v = block.attn.qkv(h).reshape(batch, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(dim=-1)
        attentions.append(attention)
        tokens = tokens + block.attn.proj((attention @ v).transpose(1, 2).reshape(batch, n, width))
        tokens = tokens + block.mlp(block.norm2(tokens))
    return model.head(model.norm(tokens)[:, 0]), attentions


def _upsampled(grids: np.ndarray) -> Tensor:
    """(B, h, w) relevance grids, upsampled as the methods do; (B, 1, H, W)."""
    return F.interpolate(torch.as_tensor(grids)[:, None], size=SIZE, mode="bilinear")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _fused_flags(model: nn.Module) -> list[bool]:
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


# ---------------------------------------------------------------- closed forms


def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(7).expand(2, 3, 7, 7)
    torch.testing.assert_close(rollout([eye, eye, eye]), torch.eye(7).expand(2, 7, 7))
    torch.testing.assert_close(gradient_weighted([eye, eye], [torch.zeros(2, 3, 7, 7)] * 2),
                               torch.eye(7).expand(2, 7, 7))


def test_rollout_of_uniform_attention_in_closed_form():
    # (I/2 + U/2)^L = I / 2^L + (1 - 1/2^L) U for U = 11^T / N, which is idempotent.
    n, layers = 25, 2
    uniform = torch.full((1, 2, n, n), 1 / n, dtype=torch.float64)
    expected = torch.eye(n, dtype=torch.float64) / 2**layers + (1 - 1 / 2**layers) / n
    torch.testing.assert_close(rollout([uniform] * layers)[0], expected)


def test_rollout_map_of_a_vit_whose_queries_and_keys_are_zero_is_flat():
    model = _vit()
    with torch.no_grad():
        for block in model.blocks:  # q = k = 0: every attention row is uniform
            block.attn.qkv.weight[:32] = 0
            block.attn.qkv.bias[:32] = 0
    maps = explain(model, _images(2), "predicted", "attention_rollout")
    n = 1 + GRID[0] * GRID[1]
    torch.testing.assert_close(maps, torch.full((2, 1, *SIZE), (1 - 0.25) / n, dtype=torch.float64))


# ---------------------------------------------------------------- against the written-out forward


def test_written_out_forward_is_the_models():
    model, x = _vit(), _images()
    torch.testing.assert_close(_written_out(model, x)[0], model(x))


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_rollout_matches_a_reference_over_the_written_out_attention(fusion):
    model, x = _vit(), _images()
    with torch.no_grad():
        attentions = [a.numpy() for a in _written_out(model, x)[1]]
    grids = []
    for b in range(len(x)):
        relevance = np.eye(attentions[0].shape[-1])
        for attention in attentions:
            fused = attention[b].mean(0) if fusion == "mean" else attention[b].max(0)
            step = 0.5 * fused + 0.5 * np.eye(len(fused))
            relevance = step / step.sum(axis=1, keepdims=True) @ relevance
        grids.append(relevance[0, 1:].reshape(GRID))
    ours = explain(model, x, "predicted", "attention_rollout", head_fusion=fusion)
    torch.testing.assert_close(ours, _upsampled(np.stack(grids)))


def test_chefer_matches_a_per_image_reference_over_the_written_out_attention():
    model, x = _vit(), _images()
    target = torch.tensor([0, 3, 4])
    grids = []
    for b in range(len(x)):  # one image at a time: also checks that the batch is kept apart
        logits, attentions = _written_out(model, x[b: b + 1])
        gradients = torch.autograd.grad(logits[0, target[b]], attentions)
        relevance = np.eye(attentions[0].shape[-1])
        for attention, gradient in zip(attentions, gradients, strict=True):
            weighted = np.clip((gradient[0] * attention[0]).detach().numpy(), 0, None).mean(0)
            relevance = relevance + weighted @ relevance
        grids.append(relevance[0, 1:].reshape(GRID))
    torch.testing.assert_close(explain(model, x, target, "chefer"), _upsampled(np.stack(grids)))


def test_gradcam_on_tokens_drops_the_class_token_and_lays_patches_on_their_grid():
    model, x = _vit(), _images()
    target = torch.tensor([1, 2, 0])
    kept = {}
    handle = model.blocks[-1].norm1.register_forward_hook(lambda m, i, out: kept.setdefault("tokens", out))
    logits = model(x)
    handle.remove()
    (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), kept["tokens"])
    as_grid = lambda t: t[:, 1:].reshape(len(x), *GRID, -1).permute(0, 3, 1, 2)  # noqa: E731
    weights = as_grid(gradient).mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * as_grid(kept["tokens"].detach())).sum(dim=1, keepdim=True))
    expected = F.interpolate(cam, size=SIZE, mode="bilinear")
    maps = explain_all(model, x, target, {"default": {"method": "gradcam"},
                                          "named": {"method": "gradcam", "layer": "blocks.1.norm1"}})
    torch.testing.assert_close(maps["default"], expected)
    torch.testing.assert_close(maps["named"], expected)
    assert expected.abs().sum() > 0


def test_gradcam_on_an_nhwc_swin_permutes_to_channels_first():
    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 1),
                            num_heads=(1, 1), num_classes=3).double().eval()
    x, target = _images(2)[:, :, :32, :32], torch.tensor([0, 2])
    kept = {}
    handle = model.norm.register_forward_hook(lambda m, i, out: kept.setdefault("nhwc", out))
    logits = model(x)
    handle.remove()
    (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), kept["nhwc"])
    weights = gradient.mean(dim=(1, 2), keepdim=True)  # over h, w of (B, h, w, C)
    cam = torch.relu((weights * kept["nhwc"].detach()).sum(dim=3))[:, None]
    torch.testing.assert_close(explain(model, x, target, "gradcam"),
                               F.interpolate(cam, size=(32, 32), mode="bilinear"))


# ---------------------------------------------------------------- passes, batches, restoring


def test_chefer_makes_one_forward_and_backward_per_chunk_and_batches_independently():
    model, x = _vit(), _images(3)
    target = torch.tensor([2, 1, 0])
    whole = explain(model, x, target, "chefer")
    with count_passes() as passes:
        chunked = explain(model, x, target, "chefer", max_batch=2)
    assert (passes.forward_calls, passes.backward_calls, passes.backward_samples) == (2, 2, 3)
    torch.testing.assert_close(chunked, whole)


@pytest.mark.parametrize("method", ["attention_rollout", "chefer", "gradcam"])
def test_model_restored_after_the_method_and_after_an_error(method):
    model, x = _vit(), _images(2)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    before = {name: p.clone() for name, p in model.state_dict().items()}
    explain(model, x, "predicted", method)
    assert _fused_flags(model) == [True, True] and _hooks(model) == 0

    def fail(*_):
        raise RuntimeError("head failed")

    handle = model.head.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="head failed"):
        explain(model, x, torch.tensor([0, 1]), method)
    handle.remove()
    assert _fused_flags(model) == [True, True] and _hooks(model) == 0
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert not any(p.grad is not None for p in model.parameters())


def test_attention_methods_refuse_other_models_and_reused_attention():
    with pytest.raises(SanityError, match="chefer: needs a Vision Transformer with a class token") as caught:
        explain(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(2)).double().eval(),
                _images(1), "predicted", "chefer")
    assert "\n" not in str(caught.value)
    model = _vit()
    model.blocks = nn.Sequential(model.blocks[0], model.blocks[0])
    with pytest.raises(SanityError, match="1 attention modules ran 2 times in one forward; each must run once"):
        explain(model, _images(1), "predicted", "attention_rollout")


def test_attention_methods_are_registered_with_configs(make_cfg):
    cfg = make_cfg(["method=[attention_rollout,chefer]"])
    assert dict(cfg.method.attention_rollout) == {"head_fusion": "mean", "interpolation": "bilinear"}
    assert dict(cfg.method.chefer) == {"interpolation": "bilinear"}
    validate(cfg)
    with pytest.raises(SanityError, match="attention_rollout: head_fusion='sum' is not one of mean, max, min"):
        validate(make_cfg(["method=attention_rollout", "method.attention_rollout.head_fusion=sum"]))
