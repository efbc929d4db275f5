"""The trained models' maps carry signal: under the default init the CNN's Gradient maps
follow the digit and are spatially coherent; the paper's init (model.init=paper) gives
pixel noise. Models are trained here, through the config a `sanity run` composes."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from sanity_cli.cli import config_dir
from sanity_cli.errors import SanityError
from sanity_cli.methods import explain_all
from sanity_cli.models import InputSpec, PaperCNN, PaperMLP, build_model
from sanity_cli.pipeline import prepare
from sanity_cli.signal import signal_table, uninformative
from sanity_cli.training import TrainedModel
from sanity_cli.validation import validate

# Two epochs instead of the default run's ten keep this fast; the default init's
# figures are already near their final values then (digits: 0.44 / 0.62 after two
# epochs, 0.45 / 0.74 after ten), the paper init's stay noise (0.02 / 0.11, 0.04 / 0.21).
FAST = ["train.epochs=2", "n_images=16", "device=cpu"]
INPUT_TARGET, NEIGHBOUR_TARGET = 0.3, 0.5  # the default run's targets for |Gradient|
MARGIN = 0.05


def _signal(overrides: list[str]) -> tuple[pd.DataFrame, TrainedModel, object]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*FAST, *overrides])
    validate(cfg)
    prepared = prepare(cfg, torch.device("cpu"))
    trained = prepared.models["trained"]
    maps = explain_all(trained.model, prepared.images, "predicted", {"gradient": {}, "guided_backprop": {}})
    return signal_table(maps, prepared.display, seed=cfg.seed).set_index("method"), trained, cfg


@pytest.fixture(scope="module")
def trained_twice(tmp_path_factory):
    """The digits CNN trained under the default config and under model.init=paper."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("fidelity")
        patch.setenv("SANITY_CACHE_DIR", str(root / "cache"))
        patch.setenv("SANITY_DATA_DIR", str(root / "data"))
        return {"default": _signal([]), "paper": _signal(["model.init=paper"])}


def test_default_init_gradient_maps_follow_the_digit(trained_twice):
    table, trained, cfg = trained_twice["default"]
    assert cfg.model.init == "torch"
    assert trained.test_accuracy > 0.9
    gradient = table.loc["gradient"]
    assert gradient["n_images"] == 16
    assert gradient["input_spearman"] >= INPUT_TARGET + MARGIN
    assert gradient["neighbour_corr"] >= NEIGHBOUR_TARGET + MARGIN
    # Guided Backprop follows the digit at least as well, and both are far above noise.
    assert table.loc["guided_backprop", "input_spearman"] >= INPUT_TARGET + MARGIN
    assert table.loc[["gradient", "guided_backprop"], "informative"].all()
    assert abs(table.loc["random_reference", "neighbour_corr"]) < 0.1


def test_paper_init_gradient_maps_are_noise(trained_twice):
    table, trained, cfg = trained_twice["paper"]
    assert cfg.model.init == "paper"
    assert trained.test_accuracy > 0.9  # the model is fine; its gradients are not
    gradient = table.loc["gradient"]
    assert gradient["input_spearman"] < INPUT_TARGET - 0.15
    assert gradient["neighbour_corr"] < NEIGHBOUR_TARGET - 0.2
    # The signal check says so: neither map is told apart from noise.
    assert uninformative(table.reset_index()) == ["gradient", "guided_backprop"]


def test_each_init_trains_its_own_model(trained_twice):
    default, paper = trained_twice["default"][1], trained_twice["paper"][1]
    assert default.source == paper.source == "trained"
    assert default.cache_file != paper.cache_file


def test_torch_init_is_bounded_by_fan_in_and_paper_init_is_the_authors():
    torch.manual_seed(0)
    default, paper = PaperCNN(), PaperCNN(init="paper")
    for name in ("conv1", "conv2", "fc1", "fc2"):
        layer, weight = getattr(default, name), getattr(default, name).weight
        bound = 1 / math.sqrt(weight[0].numel())  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert weight.abs().max() <= bound and layer.bias.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        paper_layer = getattr(paper, name)
        assert paper_layer.weight.abs().max() <= 0.2  # truncated at two standard deviations
        # A normal of std 0.1 cut at +-2 std has std 0.1 * 0.880.
        assert paper_layer.weight.std().item() == pytest.approx(0.088, rel=0.1)
        assert torch.all(paper_layer.bias == 0.1)
    paper_mlp = PaperMLP(init="paper")
    assert paper_mlp.fc1.weight.std().item() == pytest.approx(2 / math.sqrt(784), rel=0.02)
    assert torch.all(paper_mlp.fc1.bias == 0)
    assert PaperMLP().fc1.weight.abs().max() <= 1 / math.sqrt(784)


def test_unknown_init_is_a_one_line_error(make_cfg):
    with pytest.raises(SanityError, match=r"unknown model.init 'xavier'; choose one of: torch, paper"):
        validate(make_cfg(["model.init=xavier"]))
    with pytest.raises(SanityError, match="unknown model.init"):
        build_model(make_cfg(["model=mlp", "model.init=he"]).model, 10, InputSpec(1, 28, (0.0,), (1.0,)))
