"""Non-finite values are stopped where they appear: a model's NaN logits, a plugged method
that turns NaN after its preflight, a dataset with NaN images, maps on another device.
Each ends the run in one line that names the source and the state; nothing reads
"undefined" with a wrong hint."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import TINY
from sanity_cli import pipeline
from sanity_cli.data import load_dataset
from sanity_cli.errors import SanityError
from sanity_cli.finite import bad_rows, check_images, check_logits, check_maps

USER_CODE = '''
import torch
from torch import nn


class EvalNaN(nn.Module):
    """Trains like any small net; in eval mode (where it is explained) it returns NaN."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        out = self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
        return out if self.training else out * float("nan")


CALLS = [0]


def late_nan(model, x, target):
    """The input times its gradient; NaN from the third call on (after the preflight and step 0)."""
    CALLS[0] += 1
    x = x.detach().requires_grad_(True)
    score = model(x).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, x)
    return grad * x * (1.0 if CALLS[0] <= 2 else float("nan"))


def on_meta(model, x, target):
    return torch.empty_like(x, device="meta")


def constant(model, x, target):
    return torch.ones_like(x)


def nan_images(n=8, bad=3):
    images = torch.rand(n, 1, 28, 28)
    images[bad, 0, 5, 5] = float("nan")
    return torch.utils.data.TensorDataset(images, torch.arange(n) % 10)
'''


@pytest.fixture
def user_code(warm, monkeypatch):
    (warm / "user_nonfinite.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(warm))
    import importlib
    import sys

    sys.modules.pop("user_nonfinite", None)
    importlib.invalidate_caches()
    return warm


def _error(make_cfg, tmp_path, overrides: list[str]) -> str:
    cfg = make_cfg([*TINY, *overrides])
    with pytest.raises(SanityError) as caught:
        pipeline.run(cfg, tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_bad_rows_counts_images_and_names_the_kind():
    values = torch.zeros(4, 1, 3, 3)
    assert bad_rows(values) == (0, "")
    values[1, 0, 0, 0], values[3, 0, 2, 2] = float("nan"), float("-inf")
    assert bad_rows(values) == (2, "NaN and infinite")
    values[3] = 0
    assert bad_rows(values) == (1, "NaN")


def test_each_check_names_its_source_and_state():
    logits = torch.zeros(5, 10)
    logits[2, 3] = float("inf")
    with pytest.raises(SanityError, match=r"model=cnn gives infinite logits for 1 of 5 images \(seed 2, step 3"):
        check_logits(logits, "cnn", "seed 2, step 3: conv1")
    with pytest.raises(SanityError, match=r"method b gave NaN maps for 1 of 2 images \(seed 0, step 1: fc\)"):
        check_maps({"a": torch.zeros(2, 1, 4, 4), "b": torch.tensor([0.0, float("nan")]).view(2, 1, 1, 1)},
                   "seed 0, step 1: fc")
    with pytest.raises(SanityError, match="1 of the 3 training images of dataset=mine hold NaN"):
        check_images(torch.tensor([[0.0], [float("nan")], [1.0]]), "mine", "training")


def test_a_model_that_returns_nan_is_named(user_code, make_cfg, tmp_path):
    message = _error(make_cfg, tmp_path, ["model=custom", "model._target_=user_nonfinite.EvalNaN",
                                          "model.name=evalnan", "method=gradient"])
    assert message.startswith("model=evalnan gives NaN logits for 4 of 4 images (the trained model)"), message
    assert not (tmp_path / "run" / "results.csv").exists()


def test_a_method_that_turns_nan_after_its_preflight_is_named_with_its_state(user_code, make_cfg, tmp_path):
    message = _error(make_cfg, tmp_path, ["method=callable", "method.callable._target_=user_nonfinite.late_nan",
                                          "seed=3"])
    assert message.startswith("method callable gave NaN maps for 4 of 4 images (seed 3, step 1: fc2)"), message
    assert "fix the method" in message


def test_a_method_that_returns_maps_on_another_device_is_one_line(user_code, make_cfg, tmp_path):
    """The sweep's case: `Tensor.item() cannot be called on meta tensors`."""
    message = _error(make_cfg, tmp_path, ["method=callable", "method.callable._target_=user_nonfinite.on_meta"])
    assert "returned maps on device meta, not on its inputs' device (cpu)" in message, message


@pytest.mark.parametrize("bad", [0, 5])
def test_a_custom_dataset_with_nan_images_names_the_item(user_code, make_cfg, bad):
    cfg = make_cfg(["dataset=custom", "dataset._target_=user_nonfinite.nan_images", f"+dataset.bad={bad}"])
    with pytest.raises(SanityError, match=f"the image of item {bad} holds NaN or infinite values"):
        load_dataset(cfg.dataset, data_dir="unused", seed=0, n_images=8, image_size=28)


def test_undefined_everywhere_from_constant_maps_says_so(user_code, make_cfg, tmp_path, caplog):
    """Constant maps leave the rank correlations undefined: the hint says it, not the size."""
    cfg = make_cfg([*TINY, "method=callable", "method.callable._target_=user_nonfinite.constant",
                    "metrics.names=[spearman_abs,ssim]"])
    with caplog.at_level(logging.WARNING):
        pipeline.run(cfg, tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if "undefined for every image" in r.getMessage()]
    assert any(m.startswith("spearman_abs is undefined") and "constant" in m for m in said), said
    assert not any("sigma" in m for m in said), said


def test_undefined_ssim_on_small_maps_still_blames_their_size(warm, make_cfg, tmp_path, caplog):
    cfg = make_cfg([*TINY, "method=gradient", "metrics.names=[spearman_abs,ssim]", "metrics.ssim.sigma=6"])
    with caplog.at_level(logging.WARNING):
        pipeline.run(cfg, tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ssim is undefined")]
    assert said and "smaller than the SSIM window" in said[0], said


def test_a_model_that_returns_nan_while_training_is_not_blamed_on_the_learning_rate(user_code, make_cfg, tmp_path):
    """It read "diverged ... lower train.lr", which no learning rate fixes."""
    (user_code / "user_always_nan.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass AlwaysNaN(nn.Module):\n"
        "    def __init__(self, num_classes=10, in_channels=1):\n        super().__init__()\n"
        "        self.fc = nn.Linear(in_channels, num_classes)\n\n"
        "    def forward(self, x):\n        return self.fc(x.mean(dim=(2, 3))) * float('nan')\n")
    message = _error(make_cfg, tmp_path, ["model=custom", "model._target_=user_always_nan.AlwaysNaN",
                                          "method=gradient"])
    assert "the model gives NaN logits for" in message and "before any training step" in message, message
    assert "lower train.lr" not in message
