"""Modern timm architectures (random weights, small inputs): their blocks, a cascade that
re-initializes every parameter tensor by its last step, the model restored exactly
afterwards, and which methods apply to each."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from torch import nn

from sanity_cli.errors import SanityError
from sanity_cli.methods.preflight import preflight
from sanity_cli.randomization import TrainedWeights, cascading_states, plan_blocks

PAPER_INCEPTION = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                   "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                   "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"]
VIT = ["patch_embed", *[f"blocks.{i}" for i in range(12)], "norm", "head"]


def _stages(prefix: str, depths: tuple[int, ...]) -> list[str]:
    """timm's staged names: PREFIX.N.downsample (from stage 1 on), PREFIX.N.blocks.M."""
    names = []
    for stage, depth in enumerate(depths):
        names += [f"{prefix}.{stage}.downsample"] if stage else []
        names += [f"{prefix}.{stage}.blocks.{block}" for block in range(depth)]
    return names


EFFICIENTNET_B0 = [f"blocks.{stage}.{block}" for stage, depth in enumerate((1, 2, 2, 3, 3, 4, 1))
                   for block in range(depth)]
SWIN = ["patch_embed", *_stages("layers", (2, 2, 6, 2)), "norm", "head"]

# name, create_model arguments, input size, blocks in forward order
MODELS = {
    "resnet18": ({}, 64, ["conv1", "bn1", *[f"layer{i}.{j}" for i in range(1, 5) for j in range(2)], "fc"]),
    "convnext_atto": ({}, 64, ["stem", *_stages("stages", (2, 2, 6, 2)), "head"]),
    "efficientnet_b0": ({}, 64, ["conv_stem", "bn1", *EFFICIENTNET_B0, "conv_head", "bn2", "classifier"]),
    "vit_tiny_patch16_224": ({"img_size": 64}, 64, VIT),
    "deit_tiny_patch16_224": ({"img_size": 64}, 64, VIT),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 2}, 64, SWIN),
    "inception_v3": ({}, 139, PAPER_INCEPTION),  # any size from 75 gives the same blocks
}
# Which methods each family's preflight admits (guided methods need ReLUs; the attention
# methods a ViT's attention).
METHODS_OK = {
    "resnet18": {"gradient", "gradcam", "guided_backprop"},
    "convnext_atto": {"gradient", "gradcam"},
    "efficientnet_b0": {"gradient", "gradcam"},
    "vit_tiny_patch16_224": {"gradient", "gradcam", "attention_rollout", "chefer"},
    "deit_tiny_patch16_224": {"gradient", "gradcam", "attention_rollout", "chefer"},
    "swin_tiny_patch4_window7_224": {"gradient", "gradcam"},
    "inception_v3": {"gradient", "gradcam", "guided_backprop"},
}
TRIED = ("gradient", "gradcam", "guided_backprop", "attention_rollout", "chefer")


@pytest.fixture(scope="module", params=list(MODELS))
def built(request) -> tuple[str, nn.Module, torch.Tensor]:
    """A timm model with every parameter moved off its initial values (as if trained)."""
    name = request.param
    kwargs, size, _ = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 + 0.01 * torch.randn_like(param))
    return name, model, torch.randn(1, 3, size, size)


def test_blocks_follow_the_architecture(built):
    name, model, example = built
    plan = plan_blocks(model, example)
    assert list(plan) == MODELS[name][2]
    assert len(plan.counted) == sum(1 for _ in model.parameters())  # every tensor counts: no unused module


def test_cascade_randomizes_every_tensor_and_restores_the_model(built, caplog):
    name, model, example = built
    trained = TrainedWeights(model)
    plan = plan_blocks(model, example)
    with caplog.at_level(logging.WARNING, logger="sanity_cli.randomization"):
        for state in cascading_states(model, plan, trained, seed=0):
            if state.step == len(plan):
                untouched = [n for n, p in model.named_parameters() if torch.equal(p, trained.state[n])]
    assert (state.params_randomized, state.tensors_left_trained) == (1.0, 0)
    assert untouched == [] and not caplog.records
    trained.check(model)


def test_methods_that_apply(built):
    name, model, example = built
    admitted = set()
    for method in TRIED:
        try:
            preflight(model, {method: {}}, example)
            admitted.add(method)
        except SanityError as error:
            assert "\n" not in str(error)
    assert admitted == METHODS_OK[name]


def test_bottom_up_starts_at_the_input_of_a_vit():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    plan = plan_blocks(model, torch.zeros(1, 3, 32, 32))
    trained = TrainedWeights(model)
    ends = {}
    for order in ("bottom_up", "top_down"):
        states = list(cascading_states(model, plan, trained, seed=0, order=order))
        ends[order] = (states[-1].randomized, [s.block for s in states[1:]])
    assert ends["bottom_up"][1] == ["patch_embed", "blocks.0", "blocks.1", "norm", "head"]
    assert ends["top_down"][1] == ends["bottom_up"][1][::-1]
    assert set(ends["bottom_up"][0]) == set(ends["top_down"][0]) == set(plan)
    trained.check(model)
