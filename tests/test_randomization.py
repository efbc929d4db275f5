"""Blocks in forward order, re-initialization, receipts, and the states of the randomization tests."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
import torchvision
from timm.layers import LayerNorm2d, LayerScale, RmsNorm
from torch import Tensor, nn

from sanity_cli.errors import SanityError
from sanity_cli.models import PaperCNN, PaperMLP
from sanity_cli.randomization import (
    ORIGINAL,
    TrainedWeights,
    block_seed,
    cascading_states,
    find_blocks,
    independent_states,
    parameter_kind,
    plan_blocks,
    reinitialize,
)
from sanity_cli.validation import validate

CNN_BLOCKS = ["conv1", "conv2", "fc1", "fc2"]
# Element counts of the CNN's blocks on 28x28 inputs: weights + biases.
CNN_SIZES = {"conv1": 32 * 25 + 32, "conv2": 64 * 32 * 25 + 64, "fc1": 64 * 7 * 7 * 1024 + 1024,
             "fc2": 1024 * 10 + 10}
CNN_TOTAL = sum(CNN_SIZES.values())


class Reordered(nn.Module):
    """Registers its layers in an order unlike the order the forward pass calls them."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.stem = nn.Linear(4, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.stem(x)))


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x):
        return x + self.norm(self.conv(x))


class Stage(nn.Module):
    """A downsampling layer, then a container of repeated residual blocks (timm's stages)."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.downsample = nn.Sequential(nn.Conv2d(width, width, 2, stride=2), nn.BatchNorm2d(width))
        self.blocks = nn.Sequential(*[Residual(width) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class Staged(nn.Module):
    """stem, stages (a ModuleList of stages), a ModuleList of repeated linear layers, an
    unused auxiliary head, and a VGG-like mixed Sequential as the classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.stages = nn.ModuleList([Stage(4, 2), Stage(4, 1)])
        self.aux = nn.Linear(4, 3)
        self.mixers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.classifier = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        x = x.mean(dim=(2, 3))
        for mixer in self.mixers:
            x = mixer(x)
        return self.classifier(x)


class WindowAttention(nn.Module):
    """Holds a table of its own next to its children, as Swin's attention does."""

    def __init__(self, width: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, width))
        self.qkv = nn.Linear(width, width)

    def forward(self, x):
        return self.qkv(x) + self.table.mean(0)


class TinyViT(nn.Module):
    """pos_embed and cls_token held by the model itself, next to its children."""

    def __init__(self, width: int = 6, depth: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, width))
        self.blocks = nn.Sequential(*[WindowAttention(width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def _perturbed(model: nn.Module) -> nn.Module:
    """The model with every parameter moved off any value an initializer gives, as training does."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 + 0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _changed(model: nn.Module, trained: TrainedWeights) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p, trained.state[name])}


# ---------------------------------------------------------------- blocks


def test_cnn_and_mlp_blocks_in_forward_order():
    assert find_blocks(PaperCNN().eval(), torch.zeros(1, 1, 28, 28)) == CNN_BLOCKS
    assert find_blocks(PaperMLP().eval(), torch.zeros(1, 1, 28, 28)) == ["fc1", "fc2", "fc3", "fc4"]


def test_blocks_follow_execution_not_registration():
    assert find_blocks(Reordered(), torch.zeros(1, 4)) == ["stem", "head"]


def test_block_rule_descends_into_repeated_containers_and_stages():
    blocks = find_blocks(Staged().eval(), torch.zeros(1, 3, 8, 8))
    assert blocks == ["stem", "stages.0.downsample", "stages.0.blocks.0", "stages.0.blocks.1",
                      "stages.1.downsample", "stages.1.blocks.0", "mixers.0", "mixers.1", "classifier"]


def test_torchvision_resnet_gets_its_residual_blocks():
    model = torchvision.models.resnet18(num_classes=3).eval()
    assert find_blocks(model, torch.zeros(1, 3, 32, 32)) == [
        "conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
        "layer4.1", "fc"]


def test_unused_modules_are_no_block_and_are_not_counted():
    model = Staged().eval()
    plan = plan_blocks(model, torch.zeros(1, 3, 8, 8))
    assert "aux" not in plan and not any(name.startswith("aux.") for name in plan.counted)
    assert len(plan.counted) == sum(1 for _ in model.parameters()) - 2
    with pytest.raises(SanityError, match="'aux' is never called by the forward pass"):
        plan_blocks(model, torch.zeros(1, 3, 8, 8), ["aux", "stem"])


def test_layer_granularity_and_explicit_names():
    model = PaperCNN().eval()
    assert find_blocks(model, torch.zeros(1, 1, 28, 28), "layer") == CNN_BLOCKS
    assert find_blocks(model, torch.zeros(1, 1, 28, 28), ["fc2", "conv1"]) == ["conv1", "fc2"]
    with pytest.raises(SanityError, match="no module named 'fc9'"):
        find_blocks(model, torch.zeros(1, 1, 28, 28), ["fc9"])
    with pytest.raises(SanityError, match="module 'relu1' holds no parameters") as caught:
        find_blocks(model, torch.zeros(1, 1, 28, 28), ["relu1", "fc2"])
    assert "\n" not in str(caught.value)
    with pytest.raises(SanityError, match="unknown granularity 'stage'"):
        find_blocks(model, torch.zeros(1, 1, 28, 28), "stage")


# ---------------------------------------------------------------- every parameter in some block


def test_parameters_outside_blocks_go_with_the_first_block_inside_their_module():
    plan = plan_blocks(TinyViT().eval(), torch.zeros(1, 3, 8, 8))
    assert list(plan) == ["patch_embed", "blocks.0", "blocks.1", "norm", "head"]
    assert plan.parameters["patch_embed"] == ("patch_embed.weight", "patch_embed.bias", "cls_token", "pos_embed")
    assert plan.parameters["blocks.0"] == ("blocks.0.table", "blocks.0.qkv.weight", "blocks.0.qkv.bias")


def test_layer_granularity_gives_a_module_its_own_parameters_only():
    plan = plan_blocks(TinyViT().eval(), torch.zeros(1, 3, 8, 8), "layer")
    assert list(plan) == ["patch_embed", "blocks.0", "blocks.0.qkv", "blocks.1", "blocks.1.qkv", "norm", "head"]
    assert plan.parameters["blocks.0"] == ("blocks.0.table",)
    assert plan.parameters["blocks.0.qkv"] == ("blocks.0.qkv.weight", "blocks.0.qkv.bias")
    assert plan.parameters["patch_embed"][-2:] == ("cls_token", "pos_embed")


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_full_cascade_randomizes_every_tensor_and_says_so(granularity, caplog):
    model = _perturbed(TinyViT())
    trained = TrainedWeights(model)
    plan = plan_blocks(model, torch.zeros(1, 3, 8, 8), granularity)
    with caplog.at_level(logging.WARNING, logger="sanity_cli.randomization"):
        states = []
        for state in cascading_states(model, plan, trained, seed=0):
            states.append(state)
            # The receipt agrees with what actually changed.
            assert len(list(model.parameters())) - len(_changed(model, trained)) == state.tensors_left_trained
    assert (states[-1].params_randomized, states[-1].tensors_left_trained) == (1.0, 0)
    assert (states[0].params_randomized, states[0].tensors_left_trained) == (0.0, 14)
    assert not caplog.records
    trained.check(model)


def test_explicit_list_leaves_the_rest_trained_and_the_last_state_names_it(caplog):
    model = _perturbed(TinyViT())
    trained = TrainedWeights(model)
    plan = plan_blocks(model, torch.zeros(1, 3, 8, 8), ["head", "blocks.1"])
    with caplog.at_level(logging.WARNING, logger="sanity_cli.randomization"):
        states = list(cascading_states(model, plan, trained, seed=0))
    assert states[-1].tensors_left_trained == 9
    head_and_block = 6 * 3 + 3 + 5 * 6 + 6 * 6 + 6
    total = head_and_block + 6 * 3 * 16 + 6 + 6 + 5 * 6 + (5 * 6 + 6 * 6 + 6) + 6 + 6
    assert states[-1].params_randomized == pytest.approx(head_and_block / total)
    assert [record.getMessage() for record in caplog.records] == [
        "the fully randomized model still holds 9 trained parameter tensor(s): cls_token, pos_embed, "
        "patch_embed.weight, patch_embed.bias, blocks.0.table and 4 more; they are in no block "
        "(use test.granularity=block or list their modules)"]


def test_a_plain_list_of_names_attaches_outside_parameters_too():
    model = _perturbed(TinyViT())
    trained = TrainedWeights(model)
    names = find_blocks(model, torch.zeros(1, 3, 8, 8))
    for state in cascading_states(model, names, trained, seed=0):  # the weights are restored when it ends
        last, changed = state, _changed(model, trained)
    assert (last.params_randomized, last.tensors_left_trained) == (1.0, 0)
    assert changed == {name for name, _ in model.named_parameters()}
    trained.check(model)


def test_cnn_receipt_in_closed_form():
    model = PaperCNN().eval()
    states = list(cascading_states(model, CNN_BLOCKS, TrainedWeights(model), seed=0))
    sizes = [0, CNN_SIZES["fc2"], CNN_SIZES["fc1"], CNN_SIZES["conv2"], CNN_SIZES["conv1"]]
    expected = [sum(sizes[: k + 1]) / CNN_TOTAL for k in range(5)]
    assert [s.params_randomized for s in states] == pytest.approx(expected)
    assert [s.tensors_left_trained for s in states] == [8, 6, 4, 2, 0]
    independent = list(independent_states(model, CNN_BLOCKS, TrainedWeights(model), seed=0))
    assert [s.params_randomized for s in independent] == pytest.approx([0.0] + [s / CNN_TOTAL for s in sizes[1:]])
    assert [s.tensors_left_trained for s in independent] == [8, 6, 6, 6, 6]


# ---------------------------------------------------------------- order


@pytest.mark.parametrize("order, sequence", [("top_down", CNN_BLOCKS[::-1]), ("bottom_up", CNN_BLOCKS)])
def test_cascade_order_randomizes_and_labels_blocks_in_that_order(order, sequence):
    model = PaperCNN().eval()
    trained = TrainedWeights(model)
    seen = []
    for state in cascading_states(model, CNN_BLOCKS, trained, seed=0, order=order):
        changed = sorted({name.split(".")[0] for name in _changed(model, trained)})
        seen.append((state.step, state.block, state.randomized, changed))
    assert seen == [(0, ORIGINAL, (), [])] + [
        (k, sequence[k - 1], tuple(sequence[:k]), sorted(sequence[:k])) for k in range(1, 5)]
    trained.check(model)


def test_both_orders_end_at_the_same_fully_random_model():
    model = PaperCNN().eval()
    trained = TrainedWeights(model)
    ends = []
    for order in ("top_down", "bottom_up"):
        *_, last = cascading_states(model, CNN_BLOCKS, trained, seed=4, order=order)
        ends.append((set(last.randomized), {n: p.clone() for n, p in model.named_parameters()}))
    assert ends[0][0] == ends[1][0] == set(CNN_BLOCKS)
    assert all(torch.equal(ends[0][1][name], ends[1][1][name]) for name in ends[0][1])
    trained.check(model)


def test_independent_order_only_changes_the_sequence():
    model = PaperCNN().eval()
    trained = TrainedWeights(model)
    labels = [s.block for s in independent_states(model, CNN_BLOCKS, trained, seed=0, order="bottom_up")]
    assert labels == [ORIGINAL, *CNN_BLOCKS]


def test_unknown_order_is_refused_in_the_config_and_the_iteration(make_cfg):
    with pytest.raises(SanityError, match="unknown order 'sideways'; choose one of: top_down, bottom_up") as caught:
        validate(make_cfg(["test.order=sideways"]))
    assert "\n" not in str(caught.value)
    for test in ("cascade", "independent", "smooth_cascade", "entropy"):
        assert make_cfg([f"test={test}"]).test.order == "top_down"
    model = PaperCNN().eval()
    with pytest.raises(SanityError, match="unknown order 'sideways'"):
        next(cascading_states(model, CNN_BLOCKS, TrainedWeights(model), seed=0, order="sideways"))


# ---------------------------------------------------------------- states and restoring


def test_independent_randomizes_one_block_at_a_time_with_the_cascade_weights():
    model = PaperCNN().eval()
    trained = TrainedWeights(model)
    cascade_weights = {s.block: model.get_submodule(s.block).weight.clone()
                       for s in cascading_states(model, CNN_BLOCKS, trained, seed=5) if s.step}
    for state in independent_states(model, CNN_BLOCKS, trained, seed=5):
        if state.step:
            assert torch.equal(model.get_submodule(state.block).weight, cascade_weights[state.block])
            others = [b for b in CNN_BLOCKS if b != state.block]
            assert all(torch.equal(model.get_submodule(b).weight, trained.state[f"{b}.weight"]) for b in others)
    trained.check(model)


def test_independent_restores_attached_parameters_between_states():
    model = _perturbed(TinyViT())
    trained = TrainedWeights(model)
    blocks = find_blocks(model, torch.zeros(1, 3, 8, 8))
    # Bottom-up, so that the states after patch_embed's would show its tables left random.
    for state in independent_states(model, blocks, trained, seed=0, order="bottom_up"):
        expected = {"patch_embed.weight", "patch_embed.bias", "cls_token", "pos_embed"} if state.block == (
            "patch_embed") else {n for n, _ in model.named_parameters() if n.startswith(f"{state.block}.")}
        assert _changed(model, trained) == expected
    trained.check(model)


def test_model_restored_when_the_run_fails_midway():
    model = PaperCNN().eval()
    trained = TrainedWeights(model)
    with pytest.raises(RuntimeError):
        for state in cascading_states(model, CNN_BLOCKS, trained, seed=0):
            if state.step == 2:
                raise RuntimeError("explanation failed")
    trained.check(model)


# ---------------------------------------------------------------- re-initialization by kind


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


class ConvNeXtLike(nn.Module):
    """Holds a layer-scale gamma itself, without recording its init value (as timm's ConvNeXt block)."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((64,), 0.3))
        self.norm = LayerNorm2d(64)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x) * self.gamma.view(1, -1, 1, 1)


def test_paper_init_by_kind_of_parameter():
    attention = nn.MultiheadAttention(64, 4)
    scale, convnext, rms, table = LayerScale(64, init_values=1e-5), ConvNeXtLike(), RmsNorm(64), TinyViT(width=64)
    embedding = nn.Embedding(5000, 64)
    for module in (attention, scale, convnext, rms, embedding, table):
        _perturbed(module)
        reinitialize(module, seed=3)
    assert parameter_kind(attention, "in_proj_weight", attention.in_proj_weight) == "weight"
    assert abs(attention.in_proj_weight.std().item() - (2 / 64) ** 0.5) < 0.01
    assert torch.all(attention.in_proj_bias == 0) and torch.all(attention.out_proj.bias == 0)
    assert torch.all(scale.gamma == 1e-5)  # its module records the init value
    assert torch.all(convnext.gamma == 1.0)  # no recorded value: the fallback
    assert torch.all(convnext.norm.weight == 1) and torch.all(convnext.norm.bias == 0)
    assert torch.all(rms.weight == 1)
    for values in (embedding.weight, table.pos_embed, table.cls_token):
        assert abs(values.std().item() - 0.02) < 0.004 and abs(values.mean().item()) < 0.004
    assert parameter_kind(table, "pos_embed", table.pos_embed) == "table"


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
    trained = TrainedWeights(blocks[0])
    for states in (cascading_states, independent_states):  # refused before any state
        with pytest.raises(SanityError, match="^unknown init 'xavier'"):
            next(states(blocks[0], ["0"], trained, 0, init="xavier"))


def test_default_init_uses_reset_parameters_and_the_paper_rule_for_the_rest():
    model = _perturbed(TinyViT(width=64))
    trained = TrainedWeights(model)
    blocks = find_blocks(model, torch.zeros(1, 3, 8, 8))
    for state in cascading_states(model, blocks, trained, seed=0, init="default"):
        if state.step < len(blocks):
            continue
        # nn.Linear's reset_parameters draws uniformly within 1 / sqrt(fan_in); the tables'
        # module has no reset_parameters and they get the paper rule (std 0.02).
        assert 0.8 * 64**-0.5 < model.head.weight.abs().max().item() <= 64**-0.5
        assert abs(model.pos_embed.std().item() - 0.02) < 0.006 and torch.all(model.norm.weight == 1)
        assert state.tensors_left_trained == 0
        assert _changed(model, trained) == {name for name, _ in model.named_parameters()}
    trained.check(model)


def test_the_weights_fingerprint_hashes_every_tensor_by_name_and_bytes():
    # the receipt's fingerprint: the SHA-256 of each tensor's name and raw bytes, in name order,
    # so that anyone can recompute it from a state_dict
    torch.manual_seed(0)
    state = {"b.weight": torch.randn(3, 2), "a.bias": torch.randn(4).to(torch.bfloat16), "a.count": torch.tensor(7)}
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert TrainedWeights.fingerprint(state) == digest.hexdigest()
    changed = {**state, "b.weight": state["b.weight"].clone().index_fill_(0, torch.tensor([1]), 0.5)}
    assert TrainedWeights.fingerprint(changed) != digest.hexdigest()
