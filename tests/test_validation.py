"""Bad settings are refused before any work, in one line that names the setting."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from sanity_cli.errors import SanityError
from sanity_cli.models import InputSpec, PaperCNN, build_model
from sanity_cli.pipeline import Prepared, check_model_fit
from sanity_cli.settings import Settings
from sanity_cli.validation import validate


@pytest.mark.parametrize("overrides, words", [
    (["n_images=abc"], "n_images must be a whole number"),
    (["max_batch=0"], "max_batch must be at least 1"),
    (["seed=1.5"], "seed must be a whole number"),
    (["train.lr=0"], "train.lr must be above 0"),
    (["metrics.hog.pixels_per_cell=0"], "metrics.hog.pixels_per_cell must be at least 1"),
    (["metrics.names=foo"], "metrics.names must be a non-empty list"),
    (["metrics.names=[]"], "metrics.names must be a non-empty list"),
    (["metrics.names=[spearman,pearson]"], "unknown metric 'pearson'"),
    (["test=smooth_cascade", "test.samples=0"], "test.samples must be at least 1"),
    (["test=entropy", "test.bins=0"], "test.bins must be at least 1"),
    (["test.seeds=[a]"], "test.seeds must be a number of draws or a list of whole numbers"),
    (["test.seeds=0"], "test.seeds as a number of draws must lie between 1 and 100"),
    (["dataset.test_fraction=1.5"], "dataset.test_fraction must be between 0 and 1"),
    (["n_examples=0"], "n_examples must be at least 1"),
    (["labels=shuffled", "test=data"], "drop labels=shuffled"),
    (["labels=random"], "unknown labels 'random'"),
    (["method.integrated_gradients.steps=1", "method=integrated_gradients"], "integrated_gradients"),
])
def test_bad_values_are_one_line_errors(make_cfg, overrides, words):
    with pytest.raises(SanityError, match=words) as caught:
        validate(make_cfg(overrides))
    assert "\n" not in str(caught.value)


def test_every_shipped_config_is_valid(make_cfg):
    for overrides in ([], ["test=data"], ["test=entropy"], ["test=smooth_cascade"], ["test=random_logit"],
                      ["model=inception_v3", "dataset=samples"], ["+experiment=fig6_data_fashion_cnn"]):
        validate(make_cfg(overrides))


def _prepared(num_outputs: int, classes: int, model=None) -> Prepared:
    from sanity_cli.training import TrainedModel

    model = model or PaperCNN()
    images = torch.zeros(2, 1, 28, 28)
    return Prepared({"trained": TrainedModel(model, None, None, "random")}, InputSpec(1, 28, (0.0,), (1.0,)),
                    images, images, torch.zeros(2, dtype=torch.long), torch.arange(2),
                    [str(i) for i in range(classes)], num_outputs, torch.zeros(2, dtype=torch.long))


def test_labels_must_be_the_models_classes(make_cfg):
    with pytest.raises(SanityError, match="10 classes and the model 1000 outputs"):
        check_model_fit(Settings.from_config(make_cfg(["target=label"])), _prepared(1000, 10))
    check_model_fit(Settings.from_config(make_cfg(["target=label"])), _prepared(10, 10))


def test_gradcam_without_a_convolution(make_cfg, caplog):
    from sanity_cli.models import PaperMLP

    only_cams = make_cfg(["model=mlp", "method=[gradcam,guided_gradcam]"])
    with pytest.raises(SanityError, match="^gradcam and guided_gradcam need a convolutional layer and model=mlp has "
                                          "none; choose other methods$"):
        check_model_fit(Settings.from_config(only_cams), _prepared(10, 10, PaperMLP()))
    paper = Settings.from_config(make_cfg(["model=mlp"]))
    with caplog.at_level(logging.WARNING):
        kept = check_model_fit(paper, _prepared(10, 10, PaperMLP()))
    assert [r.getMessage() for r in caplog.records] == [
        "model mlp has no convolutional layer: leaving out gradcam, guided_gradcam"]
    assert kept == [name for name in paper.method if name not in ("gradcam", "guided_gradcam")]
    assert "gradcam" in paper.method, "the methods left out are the plan's, not written into the settings"
    assert check_model_fit(paper, _prepared(10, 10)) == list(paper.method), "a CNN keeps them all"


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    torch.save(PaperCNN(1, 10, 32).state_dict(), tmp_path / "cnn32.pt")
    cfg = OmegaConf.create({"kind": "cnn", "name": "cnn", "checkpoint": str(tmp_path / "cnn32.pt")})
    with pytest.raises(SanityError, match=r"does not fit PaperCNN: 1 of another shape \(fc1.weight: \(1024, 4096\) "
                                          r"in the file, \(1024, 3136\) in the model\)"):
        build_model(cfg, 10, InputSpec(1, 28, (0.0,), (1.0,)))
