"""Reusing the trained blocks' activations across states (`reuse_activations`) gives the
maps and scores of plain passes, and reuses only what a state provably leaves trained."""

from __future__ import annotations

import logging
from functools import partial
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from sanity_cli import pipeline
from sanity_cli.methods import explain_all
from sanity_cli.models import PaperCNN
from sanity_cli.randomization import TrainedWeights, cascading_states, independent_states, plan_blocks
from sanity_cli.reuse import ActivationReuse
from small_runs import Runs, quickly

METHODS = {"gradient": {}, "input_x_gradient": {}, "integrated_gradients": {"steps": 3},
           "smoothgrad": {"samples": 3}, "vargrad": {"samples": 3}, "guided_backprop": {},
           "gradcam": {"layer": "conv2"}}
MiB = 2**20


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return PaperCNN(in_channels=1, num_classes=10, image_size=12).eval()


def small_resnet() -> nn.Module:
    """Batch norm, residual additions and in-place ReLUs on block outputs (bn1's)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def maps_of_states(model: nn.Module, x: torch.Tensor, states, reuse: ActivationReuse, methods: dict,
                   chunks: int = 2) -> list[dict[str, torch.Tensor]]:
    """Every state's maps, the images explained `chunks` at a time, as the pipeline does."""
    out = []
    ids = torch.arange(len(x))
    for _ in states:
        with reuse.state(model):
            parts = []
            for index, rows in enumerate(torch.arange(len(x)).tensor_split(chunks)):
                with reuse.chunk(index):
                    parts.append(explain_all(model, x[rows], torch.zeros(len(rows), dtype=torch.long), methods,
                                             max_batch=4, ids=ids[rows]))
        out.append({name: torch.cat([part[name] for part in parts]) for name in methods})
    return out


def plain_and_reused(model, x, make_states, methods=METHODS, max_bytes=512 * MiB):
    blocks = plan_blocks(model, x[:1])
    trained = TrainedWeights(model)
    plain = maps_of_states(model, x, make_states(model, blocks, trained), ActivationReuse(model, blocks, {}, 0),
                           methods)
    reuse = ActivationReuse(model, blocks, trained.state, max_bytes)
    reused = maps_of_states(model, x, make_states(model, blocks, trained), reuse, methods)
    trained.check(model)
    return plain, reused, reuse


def cascade(model, blocks, trained):
    return cascading_states(model, blocks, trained, seed=3, init="default")


def assert_same_maps(plain, reused):
    for step, (a, b) in enumerate(zip(plain, reused, strict=True)):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=f"step {step}, {name}")


@pytest.mark.parametrize("make_model, shape", [(small_cnn, (6, 1, 12, 12)), (small_resnet, (4, 3, 16, 16))],
                         ids=["cnn", "resnet"])
def test_a_cascade_with_reuse_gives_the_maps_of_plain_passes(make_model, shape):
    model = make_model()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    methods = METHODS if make_model is small_cnn else {**METHODS, "gradcam": {"layer": "layer4"}}
    plain, reused, reuse = plain_and_reused(model, x, cascade, methods)
    assert_same_maps(plain, reused)
    # IG's and the noise methods' passes were kept at step 0 and used in the states after it
    assert reuse.stats["kept"] > 0 and reuse.stats["reused"] > 0
    assert plain[-1]["gradient"].abs().sum() > 0 and not torch.equal(plain[-1]["gradient"], plain[0]["gradient"])


@pytest.mark.parametrize("method", ["guided_backprop", "gradcam"])
def test_a_pass_that_needs_hooks_or_guided_relus_is_never_reused(method):
    # each alone, so that nothing else in the pass makes it plain
    model = small_cnn()
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    options = {"layer": "conv2"} if method == "gradcam" else {}
    plain, reused, reuse = plain_and_reused(model, x, cascade, {method: options})
    assert_same_maps(plain, reused)
    assert reuse.stats["kept"] == reuse.stats["reused"] == 0 and reuse.stats["plain"] > 0


def test_a_block_output_changed_in_place_is_handed_out_as_a_copy():
    model = small_resnet()  # relu(inplace=True) on bn1's output, which is a block of its own
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plain, reused, reuse = plain_and_reused(model, x, cascade, {"gradient": {}})
    assert_same_maps(plain, reused)
    assert reuse.names.index("bn1") in reuse.copies and len(reuse.copies) < len(reuse.names)
    assert reuse.stats["reused"] > 0


class ShiftedInPlace(nn.Module):
    """Adds to its first block's output in place (not idempotent), where autograd sees it or not."""

    def __init__(self, seen: bool):
        super().__init__()
        self.a, self.b, self.seen = nn.Linear(4, 6), nn.Linear(6, 3), seen

    def forward(self, x):
        h = self.a(x.flatten(1))
        if self.seen:
            h += 0.5
        else:
            with torch.no_grad():
                h.add_(0.5)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("seen", [True, False], ids=["autograd sees it", "under no_grad"])
def test_a_block_output_changed_in_place_after_it_is_returned_is_kept_unchanged(seen):
    torch.manual_seed(0)
    model = ShiftedInPlace(seen).eval()
    x = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(6)) * 3
    plain, reused, reuse = plain_and_reused(model, x, cascade, {"gradient": {}, "integrated_gradients": {"steps": 2}})
    assert_same_maps(plain, reused)
    assert reuse.copies == {0} and reuse.stats["reused"] > 0


class LateShift(nn.Module):
    """From the second state on, adds to its first block's output in place after the second
    block has used it: what reuse cannot learn while recording at step 0."""

    def __init__(self, seen: bool):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.seen, self.late = seen, False

    def forward(self, x):
        h = self.a(x.flatten(1))
        g = self.b(torch.tanh(h))  # tanh keeps its output, so h may change afterwards
        if self.late and self.seen:
            h += 1.0
        elif self.late:
            with torch.no_grad():
                h.add_(1.0)
        return self.c(torch.tanh(g) + h)


@pytest.mark.parametrize("seen", [True, False], ids=["autograd sees it", "under no_grad"])
def test_a_block_output_changed_in_place_only_in_a_later_state_runs_that_pass_plainly(seen):
    torch.manual_seed(0)
    model = LateShift(seen).eval()
    x = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(7))

    def late_states(m, b, t):
        for state in cascade(m, b, t):
            m.late = state.step > 0
            yield state
        m.late = False

    plain, reused, reuse = plain_and_reused(model, x, late_states, {"gradient": {}})
    assert_same_maps(plain, reused)
    assert plain[1]["gradient"].abs().sum() > 0
    if seen:  # refused by autograd: the outputs become copies, and the kept passes stay
        assert reuse.copies == {0, 1, 2} and reuse.stats["reused"] > 0
    else:  # changed unseen: the kept pass is forgotten and the state runs plainly
        assert not reuse.kept and reuse.stats["reused"] == 0


def test_reuse_leaves_the_model_as_it_found_it():
    model = small_cnn()
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(8))
    own = partial(type(model.conv1).forward, model.conv1)  # a forward set on the instance, as wrappers do
    model.conv1.forward = own
    blocks = plan_blocks(model, x[:1])
    trained = TrainedWeights(model)
    reuse = ActivationReuse(model, blocks, trained.state, 64 * MiB)
    with reuse.chunk(0):  # outside state(): nothing is patched or kept
        assert "forward" not in model.__dict__
        explain_all(model, x, torch.zeros(4, dtype=torch.long), {"gradient": {}})
    assert reuse.stats == {"kept": 0, "reused": 0, "plain": 0}
    maps_of_states(model, x, cascade(model, blocks, trained), reuse, {"gradient": {}})
    assert reuse.stats["reused"] > 0
    assert model.conv1.__dict__["forward"] is own and "forward" not in model.__dict__
    assert all("forward" not in module.__dict__ for module in model.modules() if module is not model.conv1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    trained.check(model)
    reuse.clear()
    assert not reuse.kept and reuse.held == 0


class PreActivation(nn.Module):
    """Its body changes its own input in place (a ReLU with inplace=True first), and the
    forward uses that input again: answering the body would skip the change."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.body = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 6))

    def forward(self, x):
        h = self.stem(x.flatten(1)) * 1.0  # not a block's output: no copy would help
        return self.head(h + self.body(h))


class EarlyGate(nn.Module):
    """Uses a part of its last block before its first block runs. The part is frozen, so
    that no graph shows it: only its call does."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Module()
        self.head.gate, self.head.out = nn.Linear(4, 4).requires_grad_(False), nn.Linear(6, 3)
        self.head.forward = lambda h: self.head.out(h)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(self.a(x * torch.sigmoid(self.head.gate(x))))


class EarlyScale(nn.Module):
    """Uses a parameter of its last block directly, before its first block runs."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.head.scale = nn.Parameter(torch.full((4,), 0.5))

    def forward(self, x):
        return self.head(self.a(x.flatten(1) * self.head.scale))


class Positions(nn.Module):
    """A block whose output does not depend on the input (a position table)."""

    def __init__(self, frozen: bool):
        super().__init__()
        self.patch, self.pos, self.head = nn.Linear(4, 6), nn.Embedding(1, 6), nn.Linear(6, 3)
        self.pos.weight.requires_grad_(not frozen)

    def forward(self, x):
        return self.head(torch.tanh(self.patch(x.flatten(1)) + self.pos(torch.zeros(1, dtype=torch.long))))


@pytest.mark.parametrize("make, reach", [
    (PreActivation, lambda reuse: reuse.limit == 1),  # the body is never answered, the stem is
    (EarlyGate, lambda reuse: reuse.influence == [0, 0]),  # head's changes reach block a
    (EarlyScale, lambda reuse: reuse.influence == [0, 0]),
    (partial(Positions, frozen=True), lambda reuse: reuse.influence == [0, 1, 2]),
    (partial(Positions, frozen=False), lambda reuse: reuse.influence == [0, 1, 2]),
], ids=["block changes its input", "part of a later block used early", "parameter of a later block used early",
        "constant block, frozen", "constant block"])
def test_reuse_learns_what_a_block_can_reach_from_the_first_pass(make, reach):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(9)) - 0.5
    methods = {"gradient": {}, "integrated_gradients": {"steps": 2}}
    plain, reused, reuse = plain_and_reused(model, x, cascade, methods)
    assert_same_maps(plain, reused)
    assert reach(reuse), (reuse.influence, reuse.limit)


def test_a_forward_set_on_the_model_instance_is_the_one_reused():
    model = small_cnn()
    model.forward = partial(type(model).forward, model)  # as a wrapper would; checked below to be called
    calls = []
    model.forward = lambda x, inner=model.forward: calls.append(1) or inner((x - 0.5) / 0.25)
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(10))
    own = model.forward
    plain, reused, reuse = plain_and_reused(model, x, cascade, {"gradient": {}, "integrated_gradients": {"steps": 2}})
    assert_same_maps(plain, reused)
    assert calls and reuse.stats["reused"] > 0 and model.__dict__["forward"] is own


def test_each_state_reuses_the_blocks_below_its_first_changed_one():
    model = small_cnn()
    x = torch.rand(2, 1, 12, 12)
    blocks = plan_blocks(model, x)
    trained = TrainedWeights(model)
    reuse = ActivationReuse(model, blocks, trained.state, 64 * MiB)
    assert list(blocks) == ["conv1", "conv2", "fc1", "fc2"]
    cascading = [reuse.unchanged_prefix() for _ in cascade(model, blocks, trained)]
    assert cascading == [4, 3, 2, 1, 0]
    independent = [reuse.unchanged_prefix() for _ in independent_states(model, blocks, trained, 3, init="default")]
    assert independent == [4, 3, 2, 1, 0]  # only its own block random, from the logits down
    bottom_up = [reuse.unchanged_prefix()
                 for _ in cascading_states(model, blocks, trained, 3, init="default", order="bottom_up")]
    assert bottom_up == [4, 0, 0, 0, 0]


def test_independent_randomization_with_reuse_gives_the_maps_of_plain_passes():
    model = small_cnn()
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    plain, reused, reuse = plain_and_reused(
        model, x, lambda m, b, t: independent_states(m, b, t, 3, init="default"), METHODS)
    assert_same_maps(plain, reused)
    assert reuse.stats["reused"] > 0


class Scaled(nn.Module):
    """A parameter of the root, used after every block: in no block."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.body(x) * self.scale


def test_a_changed_tensor_outside_every_block_turns_reuse_off_for_that_state():
    model = Scaled().eval()
    x = torch.rand(2, 1, 12, 12)
    blocks = plan_blocks(model, x, ["body.conv1", "body.conv2"])
    reuse = ActivationReuse(model, blocks, TrainedWeights(model).state, 64 * MiB)
    assert reuse.unchanged_prefix() == 2
    with torch.no_grad():
        model.scale.fill_(2.0)
    assert reuse.unchanged_prefix() == 0


def test_the_bound_limits_what_is_kept_and_the_rest_runs_plainly():
    model = small_cnn()
    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    methods = {"integrated_gradients": {"steps": 4}}
    _, _, unbounded = plain_and_reused(model, x, cascade, methods)
    one_pass = unbounded.held // unbounded.stats["kept"]
    plain, reused, bounded = plain_and_reused(model, x, cascade, methods, max_bytes=2 * one_pass + one_pass // 2)
    assert_same_maps(plain, reused)
    assert bounded.stats["kept"] == 2 and bounded.held <= 2 * one_pass + one_pass // 2 and bounded.full
    assert bounded.stats["reused"] == 2 * 3  # the two kept passes, in each of the 3 states that reuse


class Twice(nn.Module):
    """Calls one block twice: its output is no single tensor to keep."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = x.flatten(1)
        return self.b(torch.tanh(self.a(torch.tanh(self.a(h)))))


def test_a_model_that_calls_a_block_twice_runs_plainly(caplog):
    model = Twice().eval()
    x = torch.rand(4, 1, 2, 2)
    methods = {"gradient": {}, "integrated_gradients": {"steps": 2}}
    with caplog.at_level(logging.INFO, logger="sanity_cli.reuse"):
        plain, reused, reuse = plain_and_reused(model, x, cascade, methods)
    assert_same_maps(plain, reused)
    assert not reuse.enabled and reuse.stats["reused"] == 0 and not reuse.kept
    assert "activation reuse is off for this run: block a is called out of the planned order" in caplog.text


def test_a_model_with_a_backward_hook_runs_plainly():
    model = small_cnn()
    # only a backward hook, as attribution libraries register: it doubles conv1's input gradient
    model.conv1.register_full_backward_hook(lambda module, grad_in, grad_out: tuple(2 * g for g in grad_in))
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(11))
    plain, reused, reuse = plain_and_reused(model, x, cascade, {"gradient": {}, "integrated_gradients": {"steps": 2}})
    assert_same_maps(plain, reused)
    assert reuse.stats["kept"] == reuse.stats["reused"] == 0


def test_a_second_order_gradient_through_reused_activations_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 8), nn.Softplus(), nn.Linear(8, 2)).eval()
    x = torch.rand(3, 1, 3, 3)
    blocks = plan_blocks(model, x[:1])
    trained = TrainedWeights(model)
    reuse = ActivationReuse(model, blocks, trained.state, 64 * MiB)
    states = cascade(model, blocks, trained)
    for state in states:
        with reuse.state(model), reuse.chunk(0):
            leaf = x.clone().requires_grad_(True)
            if state.step == 0:
                (grad,) = torch.autograd.grad(model(leaf)[:, 0].sum(), leaf, create_graph=False)
                continue
            with pytest.raises(RuntimeError, match="second-order gradient cannot go through reused activations"):
                torch.autograd.grad(model(leaf)[:, 0].sum(), leaf, create_graph=True)
            with reuse.paused():  # how methods from outside the project run: plainly
                (grad,) = torch.autograd.grad(model(leaf)[:, 0].sum(), leaf, create_graph=True)
                (second,) = torch.autograd.grad(grad.pow(2).sum(), leaf)
            assert second.abs().sum() > 0
        break
    states.close()  # the trained weights back
    trained.check(model)


@pytest.fixture
def runs(make_cfg, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.getbasetemp() / "reuse_runs", make_cfg)


def test_a_run_with_reuse_writes_the_scores_of_a_plain_run(runs, warm):
    overrides = ["method=[gradient,integrated_gradients,smoothgrad,gradcam]", "method.integrated_gradients.steps=4",
                 "method.smoothgrad.samples=3", "image_chunk=5"]
    made = []

    def kept(*args, **kwargs):
        made.append(ActivationReuse(*args, **kwargs))
        return made[-1]

    with quickly():
        plain = runs(*overrides)
        with mock.patch.object(pipeline.explain, "ActivationReuse", kept):
            reused = runs.fresh(*overrides, "reuse_activations=256")
    assert made[0].max_bytes == 256 * MiB and made[0].stats["reused"] > 0
    for name in ("results.csv", "robustness.csv"):
        a, b = (pd.read_csv(run.dir / name) for run in (plain, reused))
        pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
        np.testing.assert_allclose(b["value"], a["value"], rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(reused.states, plain.states)
