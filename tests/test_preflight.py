"""Preflight: a method that would silently compute something else on the model is refused
in one line before any work, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sanity_cli.errors import SanityError
from sanity_cli.methods import explain
from sanity_cli.methods.preflight import preflight
from sanity_cli.models import PaperCNN, PaperMLP


class FunctionalRelu(nn.Module):
    """Calls F.relu rather than holding nn.ReLU modules (as torchvision's Inception v3)."""

    def __init__(self, activation=F.relu):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.activation(self.conv(x)).mean(dim=(2, 3)))


class Pooled(nn.Module):
    """Its last convolution sees a 1x1 input: GradCAM there would be constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.last = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.last(self.pool(torch.relu(self.conv(x)))).flatten(1))


class Reused(nn.Module):
    """Calls one convolution twice in its forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(self.conv(x))).mean(dim=(2, 3)))


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4).eval()


def _refused(model: nn.Module, methods: dict, example: Tensor, words: str) -> None:
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(SanityError, match=words) as caught:
        preflight(model, methods, example)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


CNN_X, VIT_X = torch.randn(1, 1, 28, 28), torch.randn(1, 3, 32, 32)


def test_methods_that_fit_pass():
    preflight(PaperCNN().eval(), {"gradient": {}, "gradcam": {"layer": "relu2"}, "guided_backprop": {},
                                  "guided_gradcam": {}, "smoothgrad": {"base": "guided_backprop"}}, CNN_X)
    preflight(FunctionalRelu().eval(), {"guided_backprop": {}}, CNN_X)  # F.relu counts as a ReLU
    preflight(_vit(), {"gradcam": {}, "attention_rollout": {}, "chefer": {}}, VIT_X)
    preflight(_vit(), {"mine": {"method": "callable"}}, VIT_X)  # plug-ins are checked elsewhere


@pytest.mark.parametrize("methods", [{"guided_backprop": {}}, {"gg": {"method": "guided_gradcam", "layer": "conv"}}])
def test_guided_methods_need_a_relu(methods):
    _refused(FunctionalRelu(F.gelu).eval(), methods, CNN_X, "calls no ReLU, so guided backpropagation would be")


def test_a_noise_method_is_checked_through_its_base():
    _refused(_vit(), {"sg": {"method": "smoothgrad", "base": "guided_backprop"}}, VIT_X,
             r"^sg \(base guided_backprop\): VisionTransformer calls no ReLU")


@pytest.mark.parametrize("model, layer, words", [
    (PaperMLP(), None, "no top-level child of PaperMLP outputs a 4-D tensor"),
    (PaperCNN(), "fc1", "layer 'fc1' must output a 4-D"),
    (Pooled(), "last", "layer 'last' gives a 1x1 map, so GradCAM would be constant"),
    (Reused(), "conv", "layer 'conv' runs 2 times in one forward pass"),
])
def test_gradcam_needs_a_spatial_layer_that_runs_once(model, layer, words):
    _refused(model.eval(), {"gradcam": {"layer": layer}}, CNN_X, words)


def test_gradcam_after_the_last_attention_of_a_class_token_vit_is_refused():
    # Past the last attention only the class token reaches the head: the patch tokens'
    # gradient is zero and every map would be 0.
    model = _vit()
    assert explain(model, VIT_X, "predicted", "gradcam", layer="blocks.1").abs().max() == 0
    _refused(model, {"gradcam": {"layer": "blocks.1"}}, VIT_X, "does not depend on the output of layer 'blocks.1'")


def test_attention_methods_need_a_vit_whose_attention_runs_once():
    _refused(PaperCNN().eval(), {"attention_rollout": {}}, CNN_X, "needs a Vision Transformer")
    model = _vit()
    model.blocks = nn.Sequential(model.blocks[0], model.blocks[0])
    _refused(model, {"chefer": {}}, VIT_X, "attention module 'blocks.0.attn' runs 2 times")
