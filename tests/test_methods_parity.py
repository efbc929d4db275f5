"""Parity of sanity_cli.methods with Captum: max |ours - Captum's| <= 1e-5 max |Captum's|.

Models: a small CNN made of nn.ReLU modules (float64), and timm's resnet18 (random
weights, eval mode, in-place ReLUs; float32, as float64 convolutions are slow on the
CPU and float32 already meets the tolerance) on 2 x 3 x 64 x 64 inputs. Captum hooks
nn.ReLU modules, so on these models its guided methods are a valid reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from sanity_cli.methods import explain, explain_all

captum_attr = pytest.importorskip("captum.attr")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOLERANCE = 1e-5


class SmallCNN(nn.Module):
    """conv-relu-pool x2, linear-relu, linear; (B, 3, 16, 16) -> (B, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


# name -> (model builder, input shape, dtype, GradCAM layer name)
MODELS = {
    "small_cnn": (SmallCNN, (2, 3, 16, 16), torch.float64, "features.3"),
    "resnet18": (
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
        (2, 3, 64, 64),
        torch.float32,
        "layer4",
    ),
}


Case = tuple[nn.Module, Tensor, Tensor, str]


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> Case:
    """(model, x, target, layer name): eval mode, target = the argmax."""
    build, shape, dtype, layer = MODELS[request.param]
    torch.manual_seed(0)
    model = build().to(dtype).eval()
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    return model, x, target, layer


def _assert_parity(ours: Tensor, theirs: Tensor) -> None:
    assert ours.shape == theirs.shape
    scale = theirs.abs().max()
    assert scale > 0, "the reference map is all zeros: the comparison would be empty"
    assert (ours - theirs).abs().max() / scale <= TOLERANCE


def test_gradient(case: Case) -> None:
    model, x, target, _ = case
    theirs = captum_attr.Saliency(model).attribute(x, target=target, abs=False)
    _assert_parity(explain(model, x, target, "gradient"), theirs)


def test_input_x_gradient(case: Case) -> None:
    model, x, target, _ = case
    theirs = captum_attr.InputXGradient(model).attribute(x, target=target)
    _assert_parity(explain(model, x, target, "input_x_gradient"), theirs)


@pytest.mark.parametrize(
    "rule",
    ["riemann_trapezoid", "gausslegendre", "riemann_left", "riemann_right", "riemann_middle"],
)
def test_integrated_gradients(case: Case, rule: str) -> None:
    model, x, target, _ = case
    ig = captum_attr.IntegratedGradients(model)
    theirs = ig.attribute(x, baselines=0.25, target=target, n_steps=6, method=rule)
    ours = explain(
        model, x, target, "integrated_gradients", steps=6, rule=rule, baseline=0.25, max_batch=5
    )
    _assert_parity(ours, theirs)


def test_guided_backprop(case: Case) -> None:
    model, x, target, _ = case
    theirs = captum_attr.GuidedBackprop(model).attribute(x, target=target)
    _assert_parity(explain(model, x, target, "guided_backprop"), theirs)


def _named(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def test_gradcam(case: Case) -> None:
    model, x, target, layer = case
    cam = captum_attr.LayerGradCam(model, _named(model, layer)).attribute(
        x, target=target, relu_attributions=True
    )
    theirs = captum_attr.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), "bilinear")
    _assert_parity(explain(model, x, target, "gradcam", layer=layer), theirs)


def test_guided_gradcam(case: Case) -> None:
    model, x, target, layer = case
    guided_gradcam = captum_attr.GuidedGradCam(model, _named(model, layer))
    theirs = guided_gradcam.attribute(x, target=target, interpolate_mode="bilinear")
    _assert_parity(explain(model, x, target, "guided_gradcam", layer=layer), theirs)


def test_all_together_match_captum_too(case: Case) -> None:
    """The shared pass (one forward, two backwards) gives Captum's maps."""
    model, x, target, layer = case
    maps = explain_all(
        model,
        x,
        target,
        {
            "gradient": {},
            "guided_backprop": {},
            "gradcam": {"layer": layer},
            "guided_gradcam": {"layer": layer},
        },
    )
    _assert_parity(
        maps["gradient"], captum_attr.Saliency(model).attribute(x, target=target, abs=False)
    )
    _assert_parity(
        maps["guided_backprop"], captum_attr.GuidedBackprop(model).attribute(x, target=target)
    )
    guided_gradcam = captum_attr.GuidedGradCam(model, _named(model, layer))
    theirs = guided_gradcam.attribute(x, target=target, interpolate_mode="bilinear")
    _assert_parity(maps["guided_gradcam"], theirs)


def test_default_gradcam_layer_of_resnet_is_layer4() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = explain_all(
        model,
        x,
        "predicted",
        {"default": {"method": "gradcam"}, "layer4": {"method": "gradcam", "layer": "layer4"}},
    )
    assert maps["default"].abs().max() > 0
    torch.testing.assert_close(maps["default"], maps["layer4"])


def test_guided_backprop_sees_functional_relus_that_captum_misses() -> None:
    """torchvision's Inception-style F.relu: Captum returns the plain gradient."""

    class FunctionalCNN(SmallCNN):
        def forward(self, x: Tensor) -> Tensor:
            f = self.features
            x = f[2](torch.nn.functional.relu(f[0](x)))
            x = f[5](torch.nn.functional.relu(f[3](x), inplace=True))
            return self.classifier(x)

    torch.manual_seed(0)
    model = FunctionalCNN().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1])
    captum_gbp = captum_attr.GuidedBackprop(model).attribute(x, target=target)
    ours = explain_all(model, x, target, {"gradient": {}, "guided_backprop": {}})
    # Captum still hooks the classifier's nn.ReLU, so compare with a module-ReLU twin.
    twin = SmallCNN().double().eval()
    twin.load_state_dict(model.state_dict())
    _assert_parity(
        ours["guided_backprop"], captum_attr.GuidedBackprop(twin).attribute(x, target=target)
    )
    assert not torch.allclose(captum_gbp, ours["guided_backprop"])
