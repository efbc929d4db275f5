"""Plugged methods: Captum classes by name, zennit composites and user functions, with
parity to calling those libraries directly, and the preflight's refusals."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sanity_cli.errors import SanityError
from sanity_cli.methods import explain
from sanity_cli.methods.external import check_options, explain_external, is_external, preflight_external
from sanity_cli.models import PaperCNN
from sanity_cli.validation import validate

ca = pytest.importorskip("captum.attr")


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return PaperCNN().eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(4, 1, 28, 28, generator=generator), torch.tensor([3, 1, 4, 1])


def captum(attribution: str, **options) -> dict:
    return {"method": "captum", "attribution": attribution, **options}


def seeded(seed: int = 0) -> None:
    """What the wrapper does before each call of a method that draws random numbers."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def one_line_error(call) -> str:
    with pytest.raises(SanityError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_external_kinds():
    assert [is_external(k) for k in ("captum", "lrp", "callable", "gradient", "smoothgrad")] == [True] * 3 + [False] * 2


def test_deeplift_occlusion_and_gradientshap_match_captum_called_directly(cnn, batch):
    x, t = batch
    ours = explain_external(cnn, x, t, captum("DeepLift"), max_batch=64)
    assert torch.allclose(ours, ca.DeepLift(cnn).attribute(x, target=t), atol=1e-6)
    window = {"sliding_window_shapes": [1, 7, 7], "strides": [1, 7, 7]}
    ours = explain_external(cnn, x, t, captum("Occlusion", attribute_kwargs=window), max_batch=64)
    direct = ca.Occlusion(cnn).attribute(x, target=t, sliding_window_shapes=(1, 7, 7), strides=(1, 7, 7))
    assert torch.allclose(ours, direct, atol=1e-6)
    ours = explain_external(cnn, x, t, captum("GradientShap", seed=5), max_batch=64)
    seeded(5)  # our default baselines: a distribution of two zero images
    direct = ca.GradientShap(cnn).attribute(x, baselines=torch.zeros(2, 1, 28, 28), target=t)
    assert torch.allclose(ours, direct, atol=1e-6)
    assert ours.abs().sum() > 0 and not torch.allclose(ours, explain_external(
        cnn, x, t, captum("GradientShap", seed=6), max_batch=64))  # the seed matters


def test_chunks_of_max_batch_give_the_same_maps(cnn, batch):
    x, t = batch
    whole = explain_external(cnn, x, t, captum("DeepLift"), max_batch=64)
    assert torch.allclose(explain_external(cnn, x, t, captum("DeepLift"), max_batch=1), whole, atol=1e-6)
    ig = captum("IntegratedGradients", attribute_kwargs={"n_steps": 8})
    assert torch.allclose(explain_external(cnn, x, t, ig, max_batch=3), ca.IntegratedGradients(cnn).attribute(
        x, target=t, n_steps=8), atol=1e-6)


def test_layer_methods_are_summed_over_channels_and_resized_to_the_input(cnn, batch):
    x, t = batch
    ours = explain_external(cnn, x, t, captum("LayerGradCam", layer="conv1"), max_batch=64)
    layer = ca.LayerGradCam(cnn, cnn.conv1).attribute(x, target=t)  # (4, 1, 28, 28): conv1 keeps the size
    assert ours.shape == (4, 1, 28, 28) and torch.allclose(ours, layer, atol=1e-6)
    ours = explain_external(cnn, x, t, captum("LayerGradientXActivation", layer="relu2"), max_batch=64)
    layer = ca.LayerGradientXActivation(cnn, cnn.relu2).attribute(x, target=t).sum(1, keepdim=True)
    assert torch.allclose(ours, ca.LayerAttribution.interpolate(layer, (28, 28), "bilinear"), atol=1e-6)
    # no layer set: the last module with a (B, K, h, w) output, pool2 (7x7)
    ours = explain_external(cnn, x, t, captum("LayerGradCam"), max_batch=64)
    layer = ca.LayerGradCam(cnn, cnn.pool2).attribute(x, target=t)
    assert torch.allclose(ours, F.interpolate(layer, size=(28, 28), mode="bilinear"), atol=1e-6)


def test_noise_tunnel_wraps_its_base_with_seeded_noise(cnn, batch):
    x, t = batch
    options = captum("NoiseTunnel", base="Saliency", attribute_kwargs={"nt_samples": 3, "stdevs": 0.2, "abs": False})
    ours = explain_external(cnn, x, t, options, max_batch=64)
    seeded(0)
    direct = ca.NoiseTunnel(ca.Saliency(cnn)).attribute(x, target=t, nt_samples=3, stdevs=0.2, abs=False)
    assert torch.allclose(ours, direct, atol=1e-6)


def test_the_callers_random_state_is_left_alone(cnn, batch):
    x, t = batch
    torch.manual_seed(11)
    np.random.seed(11)
    explain_external(cnn, x, t, captum("GradientShap"), max_batch=64)
    after = torch.rand(3), np.random.rand(3)
    torch.manual_seed(11)
    np.random.seed(11)
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(3))


def test_zennit_epsilon_plus_flat_matches_zennit_called_directly(cnn, batch):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    x, t = batch
    ours = explain_external(cnn, x, t, {"method": "lrp", "composite": "EpsilonPlusFlat"}, max_batch=3)
    with Gradient(model=cnn, composite=EpsilonPlusFlat()) as attributor:
        _, direct = attributor(x, torch.eye(10)[t])
    assert torch.allclose(ours, direct, atol=1e-6)
    assert not torch.allclose(ours, explain_external(cnn, x, t, {"method": "lrp", "composite": "EpsilonAlpha2Beta1"}))
    assert all(not m._forward_hooks and not m._backward_hooks for m in cnn.modules())


def test_a_function_is_called_with_model_images_targets_and_its_arguments(cnn, batch, tmp_path, monkeypatch):
    (tmp_path / "user_methods.py").write_text(
        "import torch\n"
        "def saliency(model, x, target, scale=1.0):\n"
        "    x = x.detach().requires_grad_(True)\n"
        "    (g,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)\n"
        "    return scale * g\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x, t = batch
    options = {"method": "callable", "_target_": "user_methods.saliency", "scale": 2.0}
    ours = explain_external(cnn, x, t, options, max_batch=3)
    assert torch.allclose(ours, 2.0 * explain(cnn, x, t, "gradient"), atol=1e-6)
    preflight_external(cnn, "callable", options, x, t)


def broken(model, x, target, problem):
    """Methods that a preflight must refuse."""
    if problem == "shape":
        return torch.zeros(len(x), 2, *x.shape[2:])
    if problem == "nan":
        return torch.full_like(x, float("nan"))
    if problem == "weights":
        with torch.no_grad():
            model.conv1.bias.add_(1.0)
    if problem == "hook":
        model.fc2.register_forward_hook(lambda *args: None)
    if problem == "mode":
        model.train()
    if problem == "raises":
        raise KeyError("no such key")
    return torch.zeros_like(x)


@pytest.mark.parametrize("problem, expected", [
    ("shape", "returned Tensor (2, 2, 28, 28) for inputs (2, 1, 28, 28); it must return (2, 1, 28, 28)"),
    ("nan", "returned NaN or infinite values"),
    ("weights", "changed the model's weights (conv1.bias)"),
    ("hook", "left hooks behind on fc2"),
    ("mode", "changed the model's train/eval mode"),
    ("raises", "failed at test_external_methods.py:"),
])
def test_the_preflight_refuses_a_wrong_method_in_one_line(batch, problem, expected):
    torch.manual_seed(0)
    model = PaperCNN().eval()  # a model of its own: some problems change it
    x, t = batch
    options = {"method": "callable", "_target_": "test_external_methods.broken", "problem": problem}
    message = one_line_error(lambda: preflight_external(model, "mine", options, x, t))
    assert message.startswith("method 'mine' (") and expected in message


class FunctionalRelu(nn.Module):
    """A CNN that calls ReLU as a function, as torchvision's Inception v3 does."""

    def __init__(self, reuse: bool = False, share_conv: bool = False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu, self.relu2, self.fc = nn.ReLU(), nn.ReLU(), nn.Linear(4 * 28 * 28, 10)
        self.reuse, self.share_conv = reuse, share_conv

    def forward(self, x):
        if self.share_conv:  # one convolution module run twice
            x = self.relu2(self.conv2(self.relu(self.conv2(self.relu(self.conv1(x))))))
        elif self.reuse:  # one ReLU module run twice
            x = self.relu(self.conv2(self.relu(self.conv1(x))))
        else:
            x = self.relu2(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("options, model_kwargs, expected", [
    (captum("DeepLift"), {}, "the model's forward calls ReLU as a function (F.relu)"),
    (captum("GuidedBackprop"), {}, "calls ReLU as a function"),
    (captum("Deconvolution"), {}, "calls ReLU as a function"),
    (captum("DeepLift"), {"reuse": True}, "module 'relu' (ReLU) runs 2 times in one forward"),
    ({"method": "lrp", "composite": "EpsilonPlusFlat"}, {"share_conv": True},
     "module 'conv2' (Conv2d) runs 2 times in one forward"),
    (captum("LRP"), {}, "has no LRP rule for module 'flatten' (Flatten)"),
])
def test_captum_and_zennit_are_refused_where_they_would_be_silently_wrong(batch, cnn, options, model_kwargs,
                                                                          expected):
    x, t = batch
    model = cnn if options.get("attribution") == "LRP" else FunctionalRelu(**model_kwargs).eval()
    message = one_line_error(lambda: preflight_external(model, "m", options, x, t))
    assert "would be silently wrong" in message or "no LRP rule" in message
    assert expected in message


def test_what_is_right_on_such_models_passes(batch):
    x, t = batch
    preflight_external(FunctionalRelu().eval(), "ig", captum("IntegratedGradients"), x, t)
    # A reused ReLU is right for GuidedBackprop (its hook keeps no state) and zennit's LRP.
    preflight_external(FunctionalRelu(reuse=True).eval(), "gbp", captum("GuidedBackprop"), x, t)
    preflight_external(FunctionalRelu(reuse=True).eval(), "lrp", {"method": "lrp", "composite": "EpsilonPlus"}, x, t)


@pytest.mark.parametrize("name, options, expected", [
    ("captum", captum("DeepLyft"), "captum.attr has no attribution class 'DeepLyft'; choose one of: "),
    ("captum", captum("???"), "method.captum.attribution is not set; name a class of captum.attr"),
    ("captum", captum("Occlusion"), "captum Occlusion needs sliding_window_shapes: give "
                                    "method.captum.attribute_kwargs.sliding_window_shapes=VALUE"),
    ("captum", captum("NeuronGradient"), "explains a neuron or a layer, not a class"),
    ("captum", captum("FeaturePermutation"), "permutes features across the images of a batch"),
    ("captum", captum("NoiseTunnel"), "method.captum.base is not set"),
    ("captum", captum("DeepLift", steps=3), "method.captum: unknown option(s) steps; valid: attribution,"),
    ("captum", captum("DeepLift", base="Saliency"), "base applies to attribution=NoiseTunnel only"),
    ("captum", captum("DeepLift", kwargs={"no_such": 1}), None),  # Captum's own error, at build time
    ("lrp", {"composite": "EpsilonPlusFlatt"}, "zennit has no composite 'EpsilonPlusFlatt'; choose one of: Beta"),
    ("lrp", {"composite": "EpsilonGammaBox"}, "zennit EpsilonGammaBox needs low, high"),
    ("lrp", {"composite": "EpsilonPlus", "canonizers": ["Nope"]}, "zennit.canonizers has no canonizer 'Nope'"),
    ("callable", {"_target_": "no_such_module.fn"}, "method.callable._target_ 'no_such_module.fn': no module "
                                                   "named 'no_such_module'; is its folder on the Python path?"),
    ("callable", {"_target_": "torch.pi"}, "is a float, not a function"),
])
def test_bad_method_settings_are_one_line_errors(cnn, batch, name, options, expected):
    x, t = batch
    if expected is None:
        message = one_line_error(lambda: explain_external(cnn, x, t, options, name=name))
        assert "captum DeepLift(model, ...) failed: TypeError" in message
        return
    assert expected in one_line_error(lambda: check_options(name, options))


def test_a_missing_extra_says_which_to_install(monkeypatch, cnn, batch):
    monkeypatch.setitem(sys.modules, "zennit", None)  # import zennit now raises ImportError
    message = one_line_error(lambda: check_options("lrp", {"method": "lrp", "composite": "EpsilonPlus"}))
    assert message == 'method lrp needs zennit, which is not installed: pip install "sanity-cli[lrp]"'
    monkeypatch.setitem(sys.modules, "captum", None)
    x, t = batch
    message = one_line_error(lambda: explain_external(cnn, x, t, captum("DeepLift"), name="deeplift"))
    assert message == 'method deeplift needs captum, which is not installed: pip install "sanity-cli[captum]"'


def test_the_config_validates_several_captum_methods_under_their_own_keys(make_cfg):
    cfg = make_cfg(["method=[gradient,captum,lrp]", "method.captum.attribution=DeepLift",
                    "+method.shap={method: captum, attribution: GradientShap, attribute_kwargs: {n_samples: 4}}"])
    validate(cfg)
    assert set(cfg.method) == {"gradient", "captum", "lrp", "shap"}
    bad = make_cfg(["+method.shap={method: captum, attribution: Shap}"])
    assert "method.shap.attribution: captum.attr has no attribution class 'Shap'" in one_line_error(
        lambda: validate(bad))
    unknown = make_cfg(["+method.mine={method: gradients}"])
    assert "choose one of: gradient," in one_line_error(lambda: validate(unknown))
    assert "callable" in one_line_error(lambda: validate(unknown))
