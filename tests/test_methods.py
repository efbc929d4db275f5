"""sanity_cli.methods: closed forms, guided backprop by hand, restoration of the
model after every method (also after errors), shared passes, chunking and options.

Parity with Captum is in test_methods_parity.py. Models are tiny and float64 so that
the comparisons can be tight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sanity_cli.errors import SanityError
from sanity_cli.methods import METHODS, count_passes, explain, explain_all
from sanity_cli.methods.noise import image_seed, noise_scale

PASS_METHODS = ("gradient", "input_x_gradient", "gradcam", "guided_backprop", "guided_gradcam")
# Every method, with options small enough for a quick test.
ALL_METHODS: dict[str, dict] = {
    "gradient": {},
    "input_x_gradient": {},
    "integrated_gradients": {"steps": 5},
    "guided_backprop": {},
    "gradcam": {"layer": "conv2"},
    "guided_gradcam": {"layer": "conv2"},
    "smoothgrad": {"samples": 4},
    "vargrad": {"samples": 3},
    "edge": {},
    "random": {},
    "smoothgrad_gbp": {"method": "smoothgrad", "base": "guided_backprop", "samples": 4},
    "vargrad_gradcam": {
        "method": "vargrad",
        "base": "gradcam",
        "base_options": {"layer": "conv1"},
        "samples": 2,
    },
}


class SmallCNN(nn.Module):
    """conv-relu-pool x2, linear-relu, linear, with nn.ReLU modules; (B, 3, 16, 16) -> (B, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


RELU_CALLS = {
    "F.relu": F.relu,
    "F.relu(inplace=True)": lambda t: F.relu(t, inplace=True),
    "F.relu_": F.relu_,
    "torch.relu": torch.relu,
    "torch.relu_": torch.relu_,
    "Tensor.relu": lambda t: t.relu(),
    "Tensor.relu_": lambda t: t.relu_(),
}


class FunctionalMLP(nn.Module):
    """12 -> 8 -> 6 -> 4 with a ReLU function (no nn.ReLU module) after each hidden layer."""

    def __init__(self, relu: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.relu = relu
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 8), nn.Linear(8, 6), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.relu(self.fc1(x.flatten(1)))
        return self.fc3(self.relu(self.fc2(hidden)))


class Exploding(SmallCNN):
    """SmallCNN whose forward raises after the first block while ``explode`` is set."""

    explode = True

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        if self.explode:
            raise RuntimeError("boom")
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def _model(cls: type[nn.Module] = SmallCNN, *args: object, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls(*args).double().eval()


def _images(batch: int = 3, shape: tuple[int, ...] = (3, 16, 16), seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=generator, dtype=torch.float64)


def _plain_gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    inputs = x.clone().requires_grad_(True)
    logits = model(inputs)
    (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), inputs)
    return gradient


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def _assert_restored(model: nn.Module, before: dict) -> None:
    """No hooks, no function mode, weights, flags and .grad as they were."""
    for name, module in model.named_modules():
        for hooks in (
            "_forward_hooks",
            "_backward_hooks",
            "_forward_pre_hooks",
            "_backward_pre_hooks",
        ):
            assert not getattr(module, hooks), f"{name}.{hooks} left behind"
    assert torch._C._len_torch_function_stack() == 0, "a torch function mode is still active"
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    assert [p.requires_grad for p in model.parameters()] == before["requires_grad"]
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("rule", ["paper", "gausslegendre", "riemann_middle", "riemann_left"])
def test_linear_model_closed_forms(rule: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4)).double().eval()
    x, target = _images(2, (2, 3, 3)), torch.tensor([1, 3])
    w = model[1].weight.detach()[target].view_as(x)
    maps = explain_all(
        model,
        x,
        target,
        {
            "gradient": {},
            "input_x_gradient": {},
            "integrated_gradients": {"rule": rule, "steps": 7},
            "ig_constant": {
                "method": "integrated_gradients",
                "rule": rule,
                "steps": 7,
                "baseline": 0.5,
            },
        },
    )
    torch.testing.assert_close(maps["gradient"], w)
    torch.testing.assert_close(maps["input_x_gradient"], w * x)
    torch.testing.assert_close(maps["integrated_gradients"], w * x)
    torch.testing.assert_close(maps["ig_constant"], w * (x - 0.5))


def test_paper_integration_rule_averages_gradients_on_linspace() -> None:
    """paper rule: mean of the gradients at alphas = linspace(0, 1, steps), times x."""
    model, x = _model(), _images(2)
    target = torch.tensor([0, 2])
    steps = 4
    mean_gradient = (
        sum(_plain_gradient(model, a * x, target) for a in torch.linspace(0, 1, steps)) / steps
    )
    ig = explain(model, x, target, "integrated_gradients", steps=steps)
    torch.testing.assert_close(ig, mean_gradient * x)


def test_smoothgrad_and_vargrad_without_noise() -> None:
    model, x = _model(), _images()
    target = torch.tensor([0, 1, 4])
    maps = explain_all(
        model,
        x,
        target,
        {
            "gradient": {},
            "smoothgrad": {"noise": 0, "samples": 5},
            "vargrad": {"noise": 0.0, "samples": 5},
            "smoothgrad_sq": {"method": "smoothgrad", "noise": 0, "samples": 5, "square": True},
        },
    )
    assert torch.equal(maps["smoothgrad"], maps["gradient"])
    assert torch.equal(maps["vargrad"], torch.zeros_like(x))
    torch.testing.assert_close(maps["smoothgrad_sq"], maps["gradient"] ** 2)


def test_smoothgrad_and_vargrad_match_an_explicit_loop() -> None:
    """Same seeded draws, sample by sample: mean and population variance. Each image
    draws from its own generator, seeded from the seed and the image's position."""
    model, x = _model(), _images(2)
    x[1] *= 10  # a wider range: more noise for that image only
    target = torch.tensor([3, 1])
    samples, noise, seed = 6, 0.2, 7
    generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in range(len(x))]
    sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))

    def noisy() -> Tensor:
        draws = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generators])
        return x + sigma.view(-1, 1, 1, 1) * draws

    grads = torch.stack([_plain_gradient(model, noisy(), target) for _ in range(samples)])
    options = {"samples": samples, "noise": noise, "seed": seed}
    maps = explain_all(model, x, target, {"smoothgrad": options, "vargrad": options}, max_batch=5)
    torch.testing.assert_close(maps["smoothgrad"], grads.mean(0))
    torch.testing.assert_close(maps["vargrad"], grads.var(0, unbiased=False))


def test_noise_scale_is_per_image() -> None:
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 2.0, -20.0
    torch.testing.assert_close(noise_scale(x, 0.15).flatten(), torch.tensor([0.3, 3.0]))


def test_noise_is_seeded_and_leaves_the_global_generator_alone() -> None:
    model, x = _model(), _images(2)
    state = torch.get_rng_state()
    first = explain(model, x, "predicted", "smoothgrad", samples=3, seed=1)
    again = explain(model, x, "predicted", "smoothgrad", samples=3, seed=1)
    other = explain(model, x, "predicted", "smoothgrad", samples=3, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


# ---------------------------------------------------------------- guided backprop


def _guided_by_hand(model: FunctionalMLP, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(guided, plain) gradients of the 2-hidden-layer MLP with explicit masks."""
    w1, w2, w3 = (layer.weight.detach() for layer in (model.fc1, model.fc2, model.fc3))
    h1 = model.fc1(x.flatten(1)).detach()
    h2 = model.fc2(torch.relu(h1)).detach()
    mask1, mask2 = (h1 > 0).double(), (h2 > 0).double()
    top = w3[target]  # (B, 6): gradient of the target logit w.r.t. the second ReLU output
    guided = ((top.clamp(min=0) * mask2) @ w2).clamp(min=0) * mask1 @ w1
    plain = ((top * mask2) @ w2) * mask1 @ w1
    return guided.view_as(x), plain.view_as(x)


@pytest.mark.parametrize("relu_name", list(RELU_CALLS))
def test_guided_backprop_through_relu_functions(relu_name: str) -> None:
    model = _model(FunctionalMLP, RELU_CALLS[relu_name], seed=3)
    x, target = _images(4, (3, 2, 2), seed=4), torch.tensor([0, 1, 2, 3])
    guided, plain = _guided_by_hand(model, x, target)
    assert not torch.allclose(guided, plain)  # the test can tell them apart
    maps = explain_all(model, x, target, {"guided_backprop": {}, "gradient": {}})
    torch.testing.assert_close(maps["guided_backprop"], guided)
    torch.testing.assert_close(maps["gradient"], plain)


def test_guided_backprop_needs_a_relu() -> None:
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 3)).double().eval()
    )
    before = _snapshot(model)
    with pytest.raises(
        ValueError, match="guided_backprop needs a ReLU network; Sequential has no ReLU"
    ):
        explain(model, _images(2, (3, 2, 2)), "predicted", "guided_backprop")
    _assert_restored(model, before)


# ---------------------------------------------------------------- restoration


@pytest.mark.parametrize("key", list(ALL_METHODS))
def test_each_method_restores_the_model(key: str) -> None:
    model, x = _model(), _images(2)
    next(model.parameters()).requires_grad_(False)  # flags must survive as they are
    before = _snapshot(model)
    x.requires_grad_(True)
    maps = explain_all(model, x, "predicted", {key: ALL_METHODS[key]}, max_batch=3)
    _assert_restored(model, before)
    assert x.requires_grad and x.grad is None
    assert not maps[key].requires_grad
    channels = 1 if key in ("gradcam", "vargrad_gradcam") else 3
    assert maps[key].shape == (2, channels, 16, 16)
    assert torch.isfinite(maps[key]).all()


@pytest.mark.parametrize(
    "methods",
    [
        {"gradient": {}, "gradcam": {"layer": "conv2"}, "guided_backprop": {}},
        {"smoothgrad": {"base": "guided_gradcam", "base_options": {"layer": "conv2"}}},
        {"integrated_gradients": {}},
    ],
)
def test_model_is_restored_when_its_forward_raises(methods: dict) -> None:
    model = _model(Exploding)
    x, target = _images(2), torch.tensor([0, 1])
    model.explode = False
    expected = _plain_gradient(model, x, target)
    model.explode = True
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        explain_all(model, x, target, methods)
    _assert_restored(model, before)
    model.explode = False
    assert torch.equal(_plain_gradient(model, x, target), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer": "conv9"}, "has no layer 'conv9'"),
        ({"layer": "fc1"}, "must output a 4-D"),  # raised by the hook mid-forward
    ],
)
def test_model_is_restored_after_a_bad_gradcam_layer(options: dict, message: str) -> None:
    model, x = _model(), _images(2)
    expected = _plain_gradient(model, x, torch.tensor([0, 1]))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        explain_all(model, x, "predicted", {"guided_gradcam": options, "guided_backprop": {}})
    _assert_restored(model, before)
    assert torch.equal(_plain_gradient(model, x, torch.tensor([0, 1])), expected)


# ---------------------------------------------------------------- sharing and chunking


def _passes(model: nn.Module, x: Tensor, methods: dict, max_batch: int = 64) -> tuple[int, ...]:
    with count_passes() as passes:
        explain_all(model, x, "predicted", methods, max_batch=max_batch)
    return (
        passes.forward_calls,
        passes.forward_samples,
        passes.backward_calls,
        passes.backward_samples,
    )


def test_gradient_input_x_gradient_and_gradcam_share_one_pass() -> None:
    model, x = _model(), _images(3)
    shared = {
        "gradient": {},
        "input_x_gradient": {},
        "gradcam": {},
        "gc1": {"method": "gradcam", "layer": "conv1"},
    }
    assert _passes(model, x, shared) == (1, 3, 1, 3)
    # The guided ones add one backward on the same forward.
    every = {name: {} for name in PASS_METHODS}
    assert _passes(model, x, every) == (1, 3, 2, 6)
    assert _passes(model, x, every, max_batch=2) == (2, 3, 4, 6)


def test_smoothgrad_and_vargrad_share_noisy_passes() -> None:
    model, x = _model(), _images(2)
    alone = _passes(model, x, {"smoothgrad": {}})
    assert alone == (1 + 2, 2 + 100, 2, 100)  # "predicted" costs one gradient-free forward
    # vargrad's default 25 samples are the first 25 of smoothgrad's 50.
    assert _passes(model, x, {"smoothgrad": {}, "vargrad": {}}) == alone
    assert _passes(model, x, {"smoothgrad": {}, "vargrad": {"samples": 50}}) == alone
    # A base from the one-pass family shares the noisy forward too.
    gbp = {"smoothgrad": {}, "sg_gbp": {"method": "smoothgrad", "base": "guided_backprop"}}
    assert _passes(model, x, gbp) == (3, 102, 4, 200)


def test_controls_make_no_pass() -> None:
    model = _model(Exploding)  # any forward would raise
    assert _passes(model, _images(2), {"edge": {}, "random": {"seed": 3}}) == (0, 0, 0, 0)


def test_explain_all_equals_each_method_alone() -> None:
    model, x = _model(), _images(3)
    together = explain_all(model, x, "predicted", ALL_METHODS, max_batch=4)
    for key, options in ALL_METHODS.items():
        alone = explain_all(model, x, "predicted", {key: options}, max_batch=4)[key]
        torch.testing.assert_close(together[key], alone, rtol=1e-12, atol=1e-15)


def test_chunking_does_not_change_results() -> None:
    model, x = _model(), _images(3)
    large = explain_all(model, x, "predicted", ALL_METHODS, max_batch=64)
    for max_batch in (1, 2):
        small = explain_all(model, x, "predicted", ALL_METHODS, max_batch=max_batch)
        for key in ALL_METHODS:
            torch.testing.assert_close(small[key], large[key], rtol=1e-10, atol=1e-14)


def test_maps_of_one_image_do_not_depend_on_the_batch() -> None:
    model, x = _model(), _images(3)
    methods = {name: ALL_METHODS[name] for name in (*PASS_METHODS, "integrated_gradients")}
    batch = explain_all(model, x, "predicted", methods)
    single = explain_all(model, x[1:2], "predicted", methods)
    for key in methods:
        torch.testing.assert_close(batch[key][1:2], single[key], rtol=1e-10, atol=1e-14)


def test_predicted_target_is_the_argmax() -> None:
    model, x = _model(), _images(4)
    predicted = model(x).argmax(1)
    torch.testing.assert_close(
        explain(model, x, "predicted", "gradient"), explain(model, x, predicted, "gradient")
    )
    assert _passes(model, x, {"integrated_gradients": {"steps": 4}}, max_batch=8) == (
        1 + 2,
        20,
        2,
        16,
    )


def test_duplicate_requests_are_computed_once_but_returned_apart() -> None:
    model, x = _model(), _images(2)
    methods = {"gradient": {}, "grad_again": {"method": "gradient"}}
    assert _passes(model, x, methods) == (1, 2, 1, 2)
    maps = explain_all(model, x, "predicted", methods)
    assert torch.equal(maps["gradient"], maps["grad_again"])
    assert maps["gradient"] is not maps["grad_again"]


# ---------------------------------------------------------------- gradcam layers


def test_default_gradcam_layer_is_the_last_spatial_top_level_child() -> None:
    model, x = _model(), _images(2)
    maps = explain_all(
        model,
        x,
        "predicted",
        {"default": {"method": "gradcam"}, "pool2": {"method": "gradcam", "layer": "pool2"}},
    )
    torch.testing.assert_close(maps["default"], maps["pool2"])
    with pytest.raises(ValueError, match="set the option `layer`"):
        explain(nn.Sequential(model).eval(), x, "predicted", "gradcam")


def test_gradcam_layer_that_runs_twice_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="ran 2 times"):
        explain(Twice().double().eval(), _images(1), "predicted", "gradcam", layer="conv")


# ---------------------------------------------------------------- controls


def test_sobel_edge_matches_scikit_image() -> None:
    from skimage.filters import sobel

    x = _images(2, (3, 12, 10))
    edges = explain(_model(Exploding), x, "predicted", "edge")
    assert edges.shape == x.shape
    for image in range(2):
        expected = torch.as_tensor(sobel(x[image].mean(0).numpy()))
        for channel in range(3):
            torch.testing.assert_close(edges[image, channel], expected)


def test_canny_edge_finds_a_square() -> None:
    x = torch.zeros(1, 1, 20, 20, dtype=torch.float64)
    x[..., 5:15, 5:15] = 1.0
    edges = explain(_model(Exploding), x, "predicted", "edge", detector="canny")
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[0, 0, 5:15, 4:6].sum() > 0 and edges[0, 0, 9:11, 9:11].sum() == 0


def test_noise_of_an_image_follows_its_id_not_its_batch() -> None:
    """SmoothGrad and the random control give an image the same noise whichever images
    share its batch: what lets a shard of the images reproduce the whole run."""
    model, x = _model(), _images(4)
    ids = torch.tensor([10, 11, 12, 13])
    methods = {"smoothgrad": {"samples": 3, "seed": 2}, "random": {"seed": 4}}
    whole = explain_all(model, x, torch.tensor([0, 1, 2, 3]), methods, ids=ids)
    part = explain_all(model, x[2:], torch.tensor([2, 3]), methods, ids=ids[2:])
    for name in methods:
        torch.testing.assert_close(part[name], whole[name][2:], rtol=0, atol=0)
    by_position = explain_all(model, x[2:], torch.tensor([2, 3]), methods)
    assert not torch.equal(by_position["random"], whole["random"][2:])


def test_random_map_is_seeded() -> None:
    x = _images(2)
    first, again = (explain(_model(Exploding), x, "predicted", "random", seed=5) for _ in range(2))
    other = explain(_model(Exploding), x, "predicted", "random", seed=6)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == x.shape and first.dtype == x.dtype
    assert math.isclose(first.std().item(), 1.0, abs_tol=0.1)


# ---------------------------------------------------------------- names and options


def test_registry_lists_every_method() -> None:
    assert set(METHODS) == {
        "gradient", "input_x_gradient", "integrated_gradients", "guided_backprop", "gradcam",
        "guided_gradcam", "smoothgrad", "vargrad", "edge", "random", "attention_rollout", "chefer",
    }  # fmt: skip
    assert METHODS["smoothgrad"].defaults["noise"] == 0.15
    assert METHODS["integrated_gradients"].defaults["steps"] == 50


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("saliency", {}, "unknown method 'saliency'; valid methods: gradient, input_x_gradient"),
        ("gradient", {"abs": True}, "unknown option"),
        ("integrated_gradients", {"rule": "simpson"}, "rule='simpson' is not one of"),
        ("integrated_gradients", {"baseline": "black"}, "baseline"),
        ("smoothgrad", {"base": "vargrad"}, "model-based"),
        ("smoothgrad", {"base": "nope"}, "unknown method 'nope'"),
        ("vargrad", {"samples": 0}, "samples"),
        ("edge", {"detector": "laplace"}, "detector"),
    ],
)
def test_bad_names_and_options_are_refused(method: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        explain(_model(), _images(1), "predicted", method, **options)
    assert isinstance(error.value, SanityError)  # the CLI prints it as one line


def test_bad_targets_are_refused() -> None:
    model, x = _model(), _images(2)
    with pytest.raises(ValueError, match="target"):
        explain(model, x, "label", "gradient")
    with pytest.raises(ValueError, match="target"):
        explain(model, x, torch.tensor([1]), "gradient")


def test_options_from_a_hydra_config() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    model, x = _model(), _images(2)
    config = omegaconf.OmegaConf.create(
        {
            "gradcam": {"layer": None},
            "sg_gradcam": {
                "method": "smoothgrad",
                "base": "gradcam",
                "base_options": {"layer": "conv2"},
                "samples": 2,
            },
        }
    )
    maps = explain_all(model, x, "predicted", config)
    assert maps["gradcam"].shape == maps["sg_gradcam"].shape == (2, 1, 16, 16)
