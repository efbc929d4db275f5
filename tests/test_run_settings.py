"""A run's settings are read once into read-only objects; what the run works out goes into
its plan, never back into the config."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from conftest import TINY
from sanity_cli import checks, pipeline
from sanity_cli.errors import SanityError
from sanity_cli.pipeline.loop import Clock
from sanity_cli.settings import Settings, TrainSettings


def test_settings_are_a_read_only_copy_of_the_config(make_cfg):
    cfg = make_cfg(["seed=7", "test=independent", "train.lr=0.02", "metrics.hog.pixels_per_cell=4"])
    settings = Settings.from_config(cfg)
    assert (settings.seed, settings.test.name, settings.train.lr, settings.metrics.hog.block) == (7, "independent",
                                                                                                   0.02, 12)
    assert settings.metrics.names == ("spearman_abs", "spearman", "ssim", "hog")
    assert settings.verdict.threshold == 0.5 and settings.model.gradcam_layer == "relu2"
    cfg.seed, cfg.test.init = 8, "default"  # the config changed afterwards: the settings are not
    assert settings.seed == 7 and settings.test.init == "paper"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 9
    with pytest.raises(ReadonlyConfigError):
        settings.test.init = "default"


def test_settings_are_checked_when_they_are_built(make_cfg):
    with pytest.raises(SanityError, match=r"^train.lr must be above 0.0, not 0$"):
        Settings.from_config(make_cfg(["train.lr=0"]))


def test_a_run_leaves_its_config_as_it_was_given(make_cfg, warm):
    """The MLP has no convolution: the run leaves GradCAM out of its plan and its files,
    the config still names it."""
    cfg = make_cfg([*TINY, "model=mlp", "method=[gradient,gradcam]", "n_examples=1"])
    before = OmegaConf.to_yaml(cfg)
    result = pipeline.run(cfg, warm / "run")
    assert OmegaConf.to_yaml(cfg) == before
    assert set(result.results["method"]) == {"gradient"}
    with np.load(warm / "run" / "maps.npz") as kept:
        assert json.loads(str(kept["meta"][()]))["methods"] == ["gradient"]


def test_the_plan_holds_what_the_run_works_out(make_cfg, warm):
    cfg = make_cfg([*TINY, "model=mlp", "method=[gradient,gradcam,random]", "test.seeds=[5,2]", "seed=3",
                    "metrics.hog.pixels_per_cell=20"])
    settings = Settings.from_config(cfg)
    prepared = pipeline.prepare(settings, torch.device("cpu"))
    plan = pipeline.make_plan(settings, checks.get("cascade"), prepared)
    assert list(plan.methods) == ["gradient", "random"] and plan.dropped == ("gradcam",)
    assert plan.seeds == (5, 2) and plan.blocks == ("fc1", "fc2", "fc3", "fc4") and plan.controls == ["random"]
    assert plan.hog_left_out and "hog" not in plan.compare["metrics"]  # 28 pixels, a block of 60
    assert plan.method_options(seed=5, step=2)["random"]["seed"] == 5002
    assert list(settings.method) == ["gradient", "gradcam", "random"]


def test_the_data_check_says_how_its_shuffled_label_model_is_trained(make_cfg):
    train = TrainSettings(epochs=3, batch_size=20, lr=0.01, optimizer="adam")
    data = Settings.from_config(make_cfg(["test=data", "test.shuffled_epochs=7", "test.shuffled_subset=50"])).test
    assert checks.get("data").shuffled_training(data, train) == (dataclasses.replace(train, epochs=7), 50)
    data = Settings.from_config(make_cfg(["test=data", "test.shuffled_lr=0.5"])).test
    assert checks.get("data").shuffled_training(data, train) == (dataclasses.replace(train, epochs=100, lr=0.5), None)
    cascade = Settings.from_config(make_cfg(["labels=shuffled"])).test  # another check: as the trained model
    assert checks.get("cascade").shuffled_training(cascade, train) == (train, None)


def test_the_clock_adds_each_phase_of_its_own():
    clock = Clock(torch.device("cpu"), {"data and models": 1.5})
    for _ in range(2):
        with clock("explain"):
            time.sleep(0.02)
    with clock("compare"):
        pass
    assert clock.seconds["data and models"] == 1.5
    assert 0.04 <= clock.seconds["explain"] < 1 and 0 <= clock.seconds["compare"] < 0.02


def test_the_run_takes_the_gpu_that_its_sweep_job_leased(make_cfg, monkeypatch):
    from sanity_cli import sharding

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    settings = Settings.from_config(make_cfg(["device=auto"]))
    assert pipeline.run_device(settings) == torch.device("cuda")
    token = sharding._LEASED.set("cuda:1")  # what job_resources sets for the job's duration
    try:
        assert pipeline.run_device(settings) == torch.device("cuda:1")
    finally:
        sharding._LEASED.reset(token)
    assert settings.device == "auto"
