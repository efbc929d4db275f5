"""Weight files: what loads (state_dicts, wrapped training checkpoints, safetensors,
TorchScript) and every way a file can be unfit, each refused in one line, for every
model kind."""

from __future__ import annotations

import functools
import pathlib

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from sanity_cli.cli import config_dir
from sanity_cli.errors import SanityError
from sanity_cli.models import InputSpec, PaperCNN, build_model, input_spec, is_torchscript

SPEC = InputSpec(1, 28, (0.0,), (1.0,))
KINDS = {
    "cnn": ["model=cnn"],
    "mlp": ["model=mlp"],
    "custom": ["model=custom", "model._target_=sanity_cli.models.PaperCNN"],
    "timm": ["model=timm", "model.name=test_resnet", "model.pretrained=false"],
}


class Marker:
    """Unpickling this would create a file: the proof that loading ran code."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


@functools.cache
def model_cfg(kind: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=KINDS[kind]).model


def build(make_cfg, kind: str, checkpoint) -> nn.Module:
    """The model of `kind` (composed once per kind: composing is the slow part) with `checkpoint`."""
    cfg = model_cfg(kind).copy()
    cfg.checkpoint = None if checkpoint == "null" else str(checkpoint)
    return build_model(cfg, 10, input_spec(cfg, 1, 28))


def refused(make_cfg, kind: str, checkpoint) -> str:
    with pytest.raises(SanityError) as caught:
        build(make_cfg, kind, checkpoint)
    message = str(caught.value)
    assert "\n" not in message and "weights_only=False" not in message
    return message


def write(path: pathlib.Path, payload) -> pathlib.Path:
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("kind", list(KINDS))
def test_unfit_files_are_refused_in_one_line_for_every_model_kind(make_cfg, tmp_path, kind):
    (tmp_path / "empty.pt").touch()
    (tmp_path / "folder").mkdir()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    cases = {
        tmp_path / "folder": "is a directory",
        tmp_path / "absent.pt": "does not exist",
        tmp_path / "empty.pt": "is empty",
        tmp_path / "garbage.pt": "is not a PyTorch weights file",
        write(tmp_path / "tensor.pt", torch.zeros(3, 4)): "holds a single tensor (3, 4), not a state_dict",
        write(tmp_path / "list.pt", [torch.zeros(2)]): "holds a list, not a state_dict",
        write(tmp_path / "meta.pt", {"epoch": 3, "lr": 0.1}): "holds a dict without weights (keys: epoch, lr)",
    }
    for path, expected in cases.items():
        assert expected in refused(make_cfg, kind, path), path.name


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_pickled_object_is_not_run_and_the_message_says_how_to_save_weights(make_cfg, tmp_path, kind):
    marker = tmp_path / "code_ran"
    path = write(tmp_path / "object.pt", {"conv1.weight": torch.zeros(1), "extra": Marker(marker)})
    message = refused(make_cfg, kind, path)
    assert not marker.exists()
    assert "holds pickled Python objects" in message and "torch.save(model.state_dict(), PATH)" in message
    whole = write(tmp_path / "whole.pt", PaperCNN())
    assert "holds pickled Python objects (sanity_cli.models.PaperCNN)" in refused(make_cfg, kind, whole)


@pytest.mark.parametrize("kind", list(KINDS))
def test_non_finite_weights_are_refused_naming_the_tensor(make_cfg, tmp_path, kind):
    model = build(make_cfg, kind, "null")
    state = model.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone().fill_(float("nan"))
    message = refused(make_cfg, kind, write(tmp_path / "nan.pt", state))
    assert f"NaN or infinite values in {name}" in message


def test_weights_of_another_architecture_name_what_does_not_fit(make_cfg, tmp_path):
    linear = write(tmp_path / "linear.pt", nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).state_dict())
    message = refused(make_cfg, "cnn", linear)
    assert "does not fit PaperCNN: 8 missing (conv1.weight, conv1.bias, conv2.weight, ...); " \
           "2 unexpected (1.weight, 1.bias)" in message
    assert "does not fit PaperMLP" in refused(make_cfg, "mlp", write(tmp_path / "cnn.pt", PaperCNN().state_dict()))
    five_classes = write(tmp_path / "five.pt", PaperCNN(num_classes=5).state_dict())
    message = refused(make_cfg, "cnn", five_classes)
    assert "2 of another shape (fc2.weight: (5, 1024) in the file, (10, 1024) in the model" in message
    assert "missing" not in message


def test_a_state_dict_loads_exactly_also_wrapped_prefixed_or_as_safetensors(make_cfg, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = PaperCNN()
    state = source.state_dict()
    files = [write(tmp_path / "plain.pth", state),
             write(tmp_path / "training.pt", {"epoch": 7, "optimizer": {"lr": 0.1},
                                              "state_dict": {f"module.{k}": v for k, v in state.items()}})]
    save_file(state, str(tmp_path / "weights.safetensors"))
    files.append(tmp_path / "weights.safetensors")
    for path in files:
        for kind in ("cnn", "custom"):
            loaded = build(make_cfg, kind, path).state_dict()
            assert all(torch.equal(loaded[k], v) for k, v in state.items()), (kind, path.name)


def test_a_fine_tuned_timm_checkpoint_gets_a_head_of_its_size(make_cfg, tmp_path):
    import timm

    torch.manual_seed(2)
    tuned = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    model = build(make_cfg, "timm", write(tmp_path / "tuned.pt", {"model": tuned.state_dict()}))
    assert model.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), tuned.eval()(x))


def test_a_torchscript_file_is_a_model_of_its_own(make_cfg, tmp_path):
    torch.manual_seed(3)
    source = PaperCNN().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(source), str(path))
    assert is_torchscript(path) and not is_torchscript(write(tmp_path / "sd.pt", source.state_dict()))
    cfg = model_cfg("custom").copy()
    cfg.checkpoint, cfg._target_ = str(path), None
    model = build_model(cfg, 10, SPEC)
    x = torch.rand(3, 1, 28, 28)
    assert isinstance(model, torch.jit.ScriptModule)
    assert torch.equal(model(x), source(x))
    with pytest.raises(SanityError, match="is a TorchScript model, which brings its own architecture; drop model"):
        build(make_cfg, "custom", path)  # custom with a _target_ as well
    assert "is a TorchScript model, not a state_dict; load it with model=custom" in refused(make_cfg, "cnn", path)
