"""Training and its cache: a hit, a miss, and a new key when a determining setting changes."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sanity_cli.data import load_digits
from sanity_cli.errors import SanityError
from sanity_cli.models import InputSpec, PaperCNN
from sanity_cli.training import cache_key, majority_rate, near_chance, shuffled_labels, train_or_load

SPEC = InputSpec(1, 28, (0.0,), (1.0,))


def _train(tmp_path, lr=1e-3, seed=0, labels="true", epochs=1):
    data = load_digits(28, 0.2, seed=0)
    train_y = shuffled_labels(data.train_y, seed) if labels == "shuffled" else data.train_y
    cfg = OmegaConf.create({"epochs": epochs, "batch_size": 50, "lr": lr, "optimizer": "adam"})
    key = {"model": "cnn", "dataset": "digits", "labels": labels}
    return train_or_load(lambda: PaperCNN(1, 10, 28), key, data.train_x[:200], train_y[:200], data.test_x[:100],
                         data.test_y[:100], cfg, seed, tmp_path / "cache", torch.device("cpu"))


def test_cache_miss_then_hit_then_new_key(tmp_path):
    first = _train(tmp_path)
    assert first.source == "trained" and first.cache_file.is_file()
    second = _train(tmp_path)
    assert second.source == "cache" and second.cache_file == first.cache_file
    assert second.train_accuracy == first.train_accuracy
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    changed = [_train(tmp_path, lr=3e-3), _train(tmp_path, seed=1), _train(tmp_path, epochs=2)]
    assert all(model.source == "trained" for model in changed)
    assert len({m.cache_file for m in [first, *changed]}) == 4


def test_training_learns_and_is_seeded(tmp_path):
    a, b = _train(tmp_path / "a", epochs=4), _train(tmp_path / "b", epochs=4)
    assert a.train_accuracy > 0.6 and a.test_accuracy > 0.4  # chance is 0.1
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_cache_key_is_stable_and_sensitive():
    fields = {"model": "cnn", "train": {"lr": 1e-3, "epochs": 10}, "seed": 0}
    assert cache_key(fields) == cache_key(dict(reversed(list(fields.items()))))
    assert cache_key(fields) != cache_key({**fields, "train": {"lr": 1e-3, "epochs": 11}})


def test_shuffled_labels_are_one_fixed_permutation():
    labels = torch.arange(100) % 10
    shuffled = shuffled_labels(labels, seed=3)
    assert torch.equal(shuffled, shuffled_labels(labels, seed=3))
    assert not torch.equal(shuffled, labels) and not torch.equal(shuffled, shuffled_labels(labels, seed=4))
    assert torch.equal(shuffled.sort().values, labels.sort().values)


def test_diverged_training_is_refused_and_not_cached(tmp_path):
    with pytest.raises(SanityError, match=r"diverged: .* not finite after epoch 1 \(train.lr=1e\+30\); lower train.lr"):
        _train(tmp_path, lr=1e30)
    assert not list((tmp_path / "cache").glob("*.pt"))


def test_model_near_chance_is_used_with_a_warning_but_not_cached(tmp_path, caplog):
    first = _train(tmp_path, labels="shuffled")  # one epoch cannot memorize shuffled labels
    assert first.source == "trained" and first.cache_file is None
    assert near_chance(first.train_accuracy, shuffled_labels(load_digits(28, 0.2, seed=0).train_y, 0)[:200])
    assert "not caching the model: its train accuracy" in caplog.text
    assert not list((tmp_path / "cache").glob("*.pt"))
    assert _train(tmp_path, labels="shuffled").source == "trained"


def test_chance_is_the_most_frequent_label():
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 2)
    assert majority_rate(labels) == 0.6
    assert near_chance(0.63, labels) and not near_chance(0.65, labels)  # 0.6 + 0.1 * 0.4 = 0.64
