"""Offline, the paper's headline command fails at once, in one line that says what to
fetch, and leaves no run directory behind; a missing Fashion-MNIST names Debian's package.
Nothing here reaches the network: the hub is offline or its session is replaced."""

from __future__ import annotations

import os
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as hub
import pytest

from conftest import sanity
from sanity_cli.data import DatasetUnavailable, load_torchvision
from sanity_cli.errors import SanityError
from sanity_cli.models import InputSpec, build_model

WHAT_TO_FETCH = ["timm/inception_v3.tf_in1k/model.safetensors", "hf download timm/inception_v3.tf_in1k",
                 "HF_HUB_CACHE=PATH", "dataset=imagefolder dataset.path=PATH"]


def test_the_headline_command_offline_fails_at_once_and_leaves_nothing(tmp_path):
    """The sweep's command, with an empty hub cache and HF_HUB_OFFLINE set: it took 71 s
    (five tries per file), printed each warning twice and left outputs/ behind."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "SANITY_CACHE_DIR": str(tmp_path / "c"),
           "SANITY_DATA_DIR": str(tmp_path / "d")}
    started = time.perf_counter()
    done = sanity("run", "model=inception_v3", "test=cascade", "n_images=4", "device=cpu", cwd=tmp_path, env=env)
    took = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("sanity: error:")]
    assert len(errors) == 1 and "HF_HUB_OFFLINE is set" in errors[0], done.stderr
    for words in [*WHAT_TO_FETCH, str(tmp_path / "hub")]:
        assert words in errors[0], (words, errors[0])
    warnings = [line for line in (done.stdout + done.stderr).splitlines() if "WARNING" in line or "Retry" in line]
    assert warnings == [], warnings
    assert not (tmp_path / "outputs").exists(), list(tmp_path.rglob("*"))
    assert took < 60, took


class _NoNetwork:
    """A hub session whose every request fails as it does without network."""

    def __init__(self):
        self.requests = 0

    def __getattr__(self, method):
        def request(*args, **kwargs):
            self.requests += 1
            raise ConnectionError("[Errno -2] Name or service not known")
        return request


def test_without_network_the_hub_is_asked_once(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    session = _NoNetwork()
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: session)
    import huggingface_hub.utils._http as http  # what the hub client's own downloads use

    monkeypatch.setattr(http, "get_session", lambda: session)
    cfg = OmegaConf.create({"kind": "timm", "name": "inception_v3.tf_in1k", "pretrained": True, "checkpoint": None})
    with pytest.raises(SanityError) as caught:
        build_model(cfg, 1000, InputSpec(3, 299, (0.5,) * 3, (0.5,) * 3))
    assert session.requests == 1  # the hub client alone asked 5 + 1 times per file, waiting between
    message = str(caught.value)
    assert "the hub cannot be reached: ConnectionError" in message and "\n" not in message
    for words in WHAT_TO_FETCH:
        assert words in message, (words, message)


def test_missing_fashion_mnist_names_debians_package(tmp_path):
    with pytest.raises(DatasetUnavailable) as caught:
        load_torchvision("FashionMNIST", tmp_path / "data", str(tmp_path / "no-system-copy"))
    message = str(caught.value)
    assert "dataset-fashion-mnist" in message and str(tmp_path / "no-system-copy") in message, message
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message


@pytest.mark.parametrize("kind", ["MNIST", "FashionMNIST"])
def test_damaged_dataset_files_are_named(tmp_path, kind):
    """Files cut short are not a failed download: the message says to move them away."""
    raw = tmp_path / "data" / kind / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(os.urandom(100))
    with pytest.raises(SanityError, match=f"the {kind} files in {raw} cannot be read .*damaged, cut short") as caught:
        load_torchvision(kind, tmp_path / "data", None)
    assert not isinstance(caught.value, DatasetUnavailable)
    assert f"mv {raw} {raw}.damaged" in str(caught.value)
    assert Path(raw).is_dir()


def test_a_hub_warning_is_printed_once(capsys):
    """The hub client's own handler printed each warning beside the root logger's (Hydra's)."""
    import logging

    from omegaconf import OmegaConf

    root, hub_logger = logging.getLogger(), logging.getLogger("huggingface_hub")
    printed = logging.StreamHandler()  # what Hydra's console handler does
    root.addHandler(printed)
    try:
        cfg = OmegaConf.create({"kind": "timm", "name": "resnet18", "pretrained": False, "checkpoint": None})
        build_model(cfg, 10, InputSpec(3, 32, (0.5,) * 3, (0.5,) * 3))
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    finally:
        root.removeHandler(printed)
    assert capsys.readouterr().err.count("Retrying in 1s") == 1
    assert hub_logger.propagate
