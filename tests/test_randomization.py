"""Blocks in forward order, re-initialization, and the states of the randomization tests."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from sanity_cli.errors import SanityError
from sanity_cli.models import PaperCNN, PaperMLP
from sanity_cli.randomization import (ORIGINAL, TrainedWeights, block_seed, cascading_states, find_blocks,
                                      independent_states, reinitialize)

PAPER_INCEPTION_CASCADE = ["fc", "Mixed_7c", "Mixed_7b", "Mixed_7a", "Mixed_6e", "Mixed_6d", "Mixed_6c", "Mixed_6b",
                           "Mixed_6a", "Mixed_5d", "Mixed_5c", "Mixed_5b", "Conv2d_4a_3x3", "Conv2d_3b_1x1",
                           "Conv2d_2b_3x3", "Conv2d_2a_3x3", "Conv2d_1a_3x3"]


class Reordered(nn.Module):
    """Registers its layers in an order unlike the order the forward pass calls them."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.stem = nn.Linear(4, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.stem(x)))


def test_cnn_and_mlp_blocks_in_forward_order():
    assert find_blocks(PaperCNN().eval(), torch.zeros(1, 1, 28, 28)) == ["conv1", "conv2", "fc1", "fc2"]
    assert find_blocks(PaperMLP().eval(), torch.zeros(1, 1, 28, 28)) == ["fc1", "fc2", "fc3", "fc4"]


def test_blocks_follow_execution_not_registration():
    assert find_blocks(Reordered(), torch.zeros(1, 4)) == ["stem", "head"]


def test_inception_v3_has_the_papers_17_blocks():
    model = timm.create_model("inception_v3.tf_in1k", pretrained=False).eval()
    blocks = find_blocks(model, torch.zeros(1, 3, 299, 299))
    assert len(blocks) == 17
    assert list(reversed(blocks)) == PAPER_INCEPTION_CASCADE


def test_timm_resnet_and_vit_blocks_are_their_top_level_children():
    resnet = timm.create_model("resnet18", pretrained=False).eval()
    assert find_blocks(resnet, torch.zeros(1, 3, 64, 64)) == ["conv1", "bn1", "layer1", "layer2", "layer3",
                                                               "layer4", "fc"]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    assert find_blocks(vit, torch.zeros(1, 3, 224, 224)) == ["patch_embed", "blocks", "norm", "head"]
    layers = find_blocks(vit, torch.zeros(1, 3, 224, 224), "layer")
    assert layers[:3] == ["patch_embed.proj", "blocks.0.norm1", "blocks.0.attn.qkv"] and layers[-1] == "head"


def test_layer_granularity_and_explicit_names():
    model = PaperCNN().eval()
    assert find_blocks(model, torch.zeros(1, 1, 28, 28), "layer") == ["conv1", "conv2", "fc1", "fc2"]
    assert find_blocks(model, torch.zeros(1, 1, 28, 28), ["fc2", "conv1"]) == ["conv1", "fc2"]
    with pytest.raises(SanityError, match="no module named 'fc9'"):
        find_blocks(model, torch.zeros(1, 1, 28, 28), ["fc9"])


def test_cascade_is_cumulative_from_the_top_and_restores_the_model():
    model = PaperCNN().eval()
    trained = TrainedWeights(model)
    seen = []
    for state in cascading_states(model, ["conv1", "conv2", "fc1", "fc2"], trained, seed=0):
        changed = [name for name in ("conv1", "conv2", "fc1", "fc2")
                   if not torch.equal(model.get_submodule(name).weight, trained.state[f"{name}.weight"])]
        seen.append((state.step, state.block, sorted(changed)))
    assert seen == [(0, ORIGINAL, []), (1, "fc2", ["fc2"]), (2, "fc1", ["fc1", "fc2"]),
                    (3, "conv2", ["conv2", "fc1", "fc2"]), (4, "conv1", ["conv1", "conv2", "fc1", "fc2"])]
    trained.check(model)


def test_independent_randomizes_one_block_at_a_time_with_the_cascade_weights():
    model = PaperCNN().eval()
    trained = TrainedWeights(model)
    blocks = ["conv1", "conv2", "fc1", "fc2"]
    cascade_weights = {s.block: model.get_submodule(s.block).weight.clone()
                       for s in cascading_states(model, blocks, trained, seed=5) if s.step}
    for state in independent_states(model, blocks, trained, seed=5):
        if state.step:
            assert torch.equal(model.get_submodule(state.block).weight, cascade_weights[state.block])
            others = [b for b in blocks if b != state.block]
            assert all(torch.equal(model.get_submodule(b).weight, trained.state[f"{b}.weight"]) for b in others)
    trained.check(model)


def test_model_restored_when_the_run_fails_midway():
    model = PaperCNN().eval()
    trained = TrainedWeights(model)
    with pytest.raises(RuntimeError):
        for state in cascading_states(model, ["conv1", "conv2", "fc1", "fc2"], trained, seed=0):
            if state.step == 2:
                raise RuntimeError("explanation failed")
    trained.check(model)


def test_paper_init_statistics_and_kept_batch_norm_stats():
    block = nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32))
    block[1].running_mean.fill_(3.0)
    block[1].weight.data.fill_(5.0)
    reinitialize(block, seed=1)
    fan_in = 16 * 9
    assert abs(block[0].weight.std().item() - (2 / fan_in) ** 0.5) < 0.01
    assert torch.all(block[0].bias == 0) and torch.all(block[1].weight == 1) and torch.all(block[1].bias == 0)
    assert torch.all(block[1].running_mean == 3.0)
    reinitialize(block, seed=1, reset_bn_stats=True)
    assert torch.all(block[1].running_mean == 0.0)


def test_block_seed_depends_on_run_seed_and_name():
    assert block_seed(0, "fc") == block_seed(0, "fc")
    assert len({block_seed(0, "fc"), block_seed(1, "fc"), block_seed(0, "fc1")}) == 3


def test_default_init_is_reproducible_and_keeps_running_stats():
    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)) for _ in range(2)]
    for block in blocks:
        block[1].running_var.fill_(7.0)
        reinitialize(block, seed=11, init="default")
    assert torch.equal(blocks[0][0].weight, blocks[1][0].weight)
    assert torch.all(blocks[0][1].running_var == 7.0)
    with pytest.raises(SanityError, match="unknown init 'xavier'"):
        reinitialize(blocks[0], seed=0, init="xavier")
