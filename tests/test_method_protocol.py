"""One registry for every method, built-in or plugged: what an entry says about its
method, the options of a state, and explain_all / preflight_all over both kinds."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sanity_cli import methods
from sanity_cli.errors import SanityError
from sanity_cli.methods.external import explain_external
from sanity_cli.models import PaperCNN

PLUGGED = {"captum", "lrp", "callable"}
APART: list[bool] = []  # True while explain_all's `apart` block is open


def doubled_gradient(model: nn.Module, x: Tensor, target: Tensor, scale: float = 2.0) -> Tensor:
    """A plugged method with a closed form: scale * the gradient of the target logit."""
    assert APART == [] or APART[-1], "a plugged method ran outside apart()"
    x = x.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    return scale * gradient


def nan_maps(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return torch.full_like(x, float("nan"))


@contextlib.contextmanager
def apart():
    APART.append(True)
    try:
        yield
    finally:
        APART[-1] = False


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return PaperCNN().eval()


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(3, 1, 28, 28, generator=generator), torch.tensor([2, 7, 1])


def mine(**options) -> dict:
    return {"method": "callable", "_target_": "test_method_protocol.doubled_gradient", **options}


def test_every_method_is_an_entry_of_one_registry() -> None:
    assert set(methods.REGISTRY) == set(methods.METHODS) | PLUGGED
    assert {name for name, spec in methods.REGISTRY.items() if spec.plugged} == PLUGGED
    assert methods.CONTROLS == ("edge", "random")
    assert [name for name, spec in methods.REGISTRY.items() if spec.needs_layer] == ["gradcam", "guided_gradcam"]
    assert [name for name, spec in methods.REGISTRY.items() if spec.takes_layer] == [
        "gradcam", "guided_gradcam", "captum"]
    assert [name for name, spec in methods.REGISTRY.items() if spec.relus] == ["guided_backprop", "guided_gradcam"]


@pytest.mark.parametrize("key, options, kind, control, plugged", [
    ("random", None, "random", True, False),
    ("noise_map", {"method": "random", "seed": 3}, "random", True, False),
    ("edge", {"method": None}, "edge", True, False),  # method: null names the key's method
    ("gradient", {}, "gradient", False, False),
    ("deeplift", {"method": "captum", "attribution": "DeepLift"}, "captum", False, True),
    ("smoothgrad_gbp", {"method": "smoothgrad", "base": "guided_backprop"}, "smoothgrad", False, False),
    ("no_such_method", {}, "no_such_method", False, False),  # a run's files may name anything
])
def test_what_a_selected_key_is(key, options, kind, control, plugged) -> None:
    assert methods.kind_of(key, options) == kind
    assert methods.is_control(key, options) is control
    assert methods.is_plugged(key, options) is plugged


@pytest.mark.parametrize("key, options, hooks", [
    ("gradient", {}, False),
    ("gradcam", {}, True),
    ("guided_backprop", {}, True),
    ("chefer", {}, True),
    ("smoothgrad", {}, False),  # its base, gradient, needs none
    ("sg", {"method": "smoothgrad", "base": "guided_backprop"}, True),
    ("vg", {"method": "vargrad", "base": "gradcam"}, True),
    ("random", {}, False),
    ("captum", {"attribution": "GuidedBackprop"}, False),  # per class, in the adapters' preflight
    ("nope", {}, True),
])
def test_which_methods_need_hooks(key, options, hooks) -> None:
    assert methods.needs_hooks(key, options) is hooks


def test_the_hook_free_methods_in_the_registrys_order() -> None:
    assert methods.HOOK_FREE == ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad",
                                 "edge", "random")


def test_the_options_of_a_state() -> None:
    selected = {"gradcam": {}, "cam1": {"method": "gradcam", "layer": "conv1"}, "captum": {"attribution": "Saliency"},
                "sg": {"method": "smoothgrad", "seed": 2}, "vargrad": {}, "random": {}, "r5": {"method": "random",
                "seed": 5}, "gradient": {}, "guided_backprop": {}}
    settled = methods.options_for_state(selected, layer="relu2", run_seed=7, seed=3, step=4)
    assert settled == {"gradcam": {"layer": "relu2"}, "cam1": {"method": "gradcam", "layer": "conv1"},
                       "captum": {"attribution": "Saliency", "layer": "relu2"},
                       "sg": {"method": "smoothgrad", "seed": 9}, "vargrad": {"seed": 7},
                       "random": {"seed": 3004}, "r5": {"method": "random", "seed": 3009},
                       "gradient": {}, "guided_backprop": {}}
    assert selected["gradcam"] == {} and selected["sg"]["seed"] == 2  # the caller's options are not changed
    other_state = methods.options_for_state(selected, layer=None, run_seed=7, seed=3, step=5)
    assert other_state["random"] == {"seed": 3005} and other_state["sg"] == settled["sg"]


def test_explain_all_computes_built_in_and_plugged_methods_in_one_call(cnn, batch) -> None:
    x, t = batch
    selected = {"mine": mine(), "gradient": {}, "random": {"seed": 1}, "triple": mine(scale=3.0)}
    maps = methods.explain_all(cnn, x, t, selected, max_batch=2)
    assert list(maps) == list(selected)  # the caller's order, plugged or not
    assert torch.allclose(maps["mine"], 2.0 * maps["gradient"], atol=1e-6)
    assert torch.allclose(maps["triple"], 3.0 * maps["gradient"], atol=1e-6)
    assert torch.equal(maps["mine"], explain_external(cnn, x, t, mine(), max_batch=2, name="mine"))
    assert torch.equal(maps["random"], methods.explain(cnn, x, t, "random", seed=1))


def test_a_plugged_method_explains_the_predicted_classes(cnn, batch) -> None:
    x, _ = batch
    predicted = cnn(x).argmax(dim=1)
    alone = methods.explain_all(cnn, x, "predicted", {"mine": mine()})["mine"]
    with_pass = methods.explain_all(cnn, x, "predicted", {"mine": mine(), "gradient": {}})
    assert torch.equal(alone, explain_external(cnn, x, predicted, mine(), name="mine"))
    assert torch.allclose(with_pass["mine"], 2.0 * with_pass["gradient"], atol=1e-6)


def test_each_plugged_method_runs_inside_apart(cnn, batch) -> None:
    x, t = batch
    APART.clear()
    entered = []

    @contextlib.contextmanager
    def counted():
        entered.append(1)
        with apart():
            yield

    methods.explain_all(cnn, x, t, {"gradient": {}, "a": mine(), "b": mine(), "edge": {}}, apart=counted)
    assert len(entered) == 2 and APART == [False, False]
    APART.clear()


class GeluCNN(nn.Module):
    """A convolution and GELU: no ReLU for guided backpropagation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.gelu(self.conv(x)).mean(dim=(2, 3)))


def refused(call) -> str:
    with pytest.raises(SanityError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_one_preflight_checks_built_in_and_plugged_methods(cnn, batch) -> None:
    x, t = batch
    methods.preflight_all(cnn, {"gradient": {}, "guided_backprop": {}, "mine": mine()}, x, t)
    methods.preflight_all(cnn, {"mine": mine()}, x)  # the predicted classes
    message = refused(lambda: methods.preflight_all(GeluCNN().eval(), {"guided_backprop": {}, "mine": mine()}, x))
    assert "guided_backprop: GeluCNN calls no ReLU" in message
    nan = {"method": "callable", "_target_": "test_method_protocol.nan_maps"}
    message = refused(lambda: methods.preflight_all(cnn, {"gradient": {}, "bad": nan}, x, t))
    assert message.startswith("method 'bad' (function test_method_protocol.nan_maps) returned NaN")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in cnn.modules())


@pytest.mark.parametrize("key, options, words", [
    ("mine", {"method": "gradients"}, "unknown method 'gradients'; choose one of: gradient, input_x_gradient"),
    ("gradients", {}, ", captum, lrp, callable"),
    ("ig", {"method": "integrated_gradients", "steps": 1}, "steps=1 must be an integer >= 2"),
    ("gradcam", {"layer": None, "interpolation": "cubic"}, "interpolation='cubic' is not one of"),
    ("f", {"method": "callable", "_target_": "torch.pi"}, "is a float, not a function"),
])
def test_one_check_of_options_for_every_kind(key, options, words) -> None:
    assert words in refused(lambda: methods.check_options(key, options))


def test_options_that_fit_pass_the_check() -> None:
    methods.check_options("gradcam", {"layer": None})  # unset: the model's layer, filled in later
    methods.check_options("sg", {"method": "smoothgrad", "base": "gradcam", "base_options": {"layer": "conv1"}})
    methods.check_options("mine", mine())
