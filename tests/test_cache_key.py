"""The model cache trains anew exactly when a setting that decides the weights changes.

Every setting whose entry in setting_effects.TABLE says it changes the trained weights
is flipped on a cache of its own: the flipped run must add a model to it. Settings that
cannot change the weights, flipped on one shared cache, must add nothing. Models here
are tiny (8x8 digits, half of them for training) so that training is cheap; a
training is a call of `training.fit`.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from setting_effects import TABLE
from small_runs import Runs

TINY = ("device=cpu", "dataset.image_size=8", "dataset.test_fraction=0.5", "train.epochs=1", "n_images=2",
        "n_examples=1", "method=[gradient]", "metrics.names=[spearman_abs]")
# Flips that cannot change the weights of the trained model, on the cache its base filled
KEEPS_THE_MODEL = [("n_images=3",), ("method=[guided_backprop]",), ("test=independent",), ("test=random_logit",),
                   ("target=label",), ("metrics.normalization=none",), ("model.gradcam_layer=relu1",),
                   ("max_batch=1",), ("image_chunk=1",), ("reuse_activations=64",), ("test.seeds=[5]",),
                   ("n_examples=2",), ("data_dir=elsewhere",)]
# A model near chance is never cached: the shuffled-label model learns its 100 labels first
MEMORIZED = ("test=data", "test.shuffled_subset=100", "test.shuffled_epochs=40")
CASES = {"test.shuffled_epochs": (MEMORIZED, ("test.shuffled_epochs=41",)),
         "test.shuffled_subset": (MEMORIZED, ("test.shuffled_subset=120",)),
         "test.shuffled_lr": (MEMORIZED, ("test.shuffled_lr=0.002",))}


def retraining_cases() -> list:
    cases = []
    for key, entry in sorted(TABLE.items()):
        if getattr(entry, "weights", None) is not True:
            continue
        base, flip = CASES.get(key, (getattr(entry, "base", ()), getattr(entry, "flip", ())))
        marks = []
        if key == "device":
            marks, flip = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")], ("device=cuda",)
        cases.append(pytest.param(key, base, flip, marks=marks, id=key))
    return cases


@pytest.fixture
def cache_of(make_cfg, tmp_path_factory):
    """base -> the runs on one cache shared by the flips of that base; no two flips of
    a base give the same settings, so each must find its model missing."""

    def runs(base: tuple[str, ...]) -> Runs:
        name = hashlib.sha256(repr(base).encode()).hexdigest()[:8]
        return Runs(tmp_path_factory.getbasetemp() / "cache_key" / name, make_cfg, TINY)

    return runs


@pytest.mark.parametrize(("key", "base", "flip"), retraining_cases())
def test_a_setting_of_the_weights_trains_anew(cache_of, key, base, flip):
    runs = cache_of(base)
    first = runs(*base)
    assert first.trainings, "the first run on an empty cache trains"
    assert runs(*base, *flip).trainings, f"{key} changed but the cached model was used"


def test_settings_of_the_explanation_reuse_the_model(make_cfg, tmp_path):
    runs = Runs(tmp_path, make_cfg, TINY)
    assert runs().trainings == 1 and not runs.fresh().trainings  # the same settings load the cached model
    for flip in KEEPS_THE_MODEL:
        assert not runs(*flip).trainings, f"{flip} trained another model"


def test_shuffled_labels_and_true_labels_are_two_models(make_cfg, tmp_path):
    runs = Runs(tmp_path, make_cfg, TINY)
    data = runs(*MEMORIZED)
    assert data.trainings == 2 and data.states["weights"].nunique() == 2
    assert not runs.fresh(*MEMORIZED).trainings  # both from the cache
    true_labels = runs()
    assert not true_labels.trainings and true_labels.states["weights"][0] == data.states["weights"][0]
    other_shuffle = runs(*MEMORIZED, "test.shuffled_subset=90")
    assert other_shuffle.trainings == 1 and other_shuffle.states["weights"][0] == data.states["weights"][0]
