"""Model construction: the paper's MNIST architectures, any timm model, and a user's
own model (`model=custom model._target_=pkg.Net`, or a TorchScript file); safe
loading of weight files.

Inputs to every model are normalized images: `InputSpec` says how (channels, size,
mean, std). Saliency maps are taken with respect to these normalized inputs, as in
the paper (Inception v3 sees x / 127.5 - 1, i.e. mean = std = 0.5).

Weight files are read with `torch.load(weights_only=True)` (or safetensors), so a
file can hold tensors but no code; a TorchScript file (`model=custom`) runs the code
it carries, so load only TorchScript files you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from sanity_cli import plugins
from sanity_cli.errors import SanityError
from sanity_cli.methods.registry import HOOK_FREE, needs_hooks

TRAINABLE_KINDS = ("cnn", "mlp", "custom")
MODEL_KINDS = (*TRAINABLE_KINDS, "timm")
# Entries of a training checkpoint's dict that hold the model's state_dict, first found wins.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: (channels, size, size) images, normalized by mean and std."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalize(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> the model's input space."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


# model.init of the models trained here. "paper" is the authors' setting: weights of
# std 0.1 whatever the layer's fan-in (MLP: 2 / sqrt(fan_in)). Adam moves each weight
# by about lr per step, so those large weights change by only about a tenth of their
# size before the training set is fitted, and the trained model's input gradients stay
# pixel noise. "torch" (PyTorch's default, uniform in +-1 / sqrt(fan_in)) starts small
# enough for training to reshape the weights; its maps follow the object.
MODEL_INITS = ("torch", "paper")


def _check_init(init: str) -> None:
    if init not in MODEL_INITS:
        raise SanityError(f"unknown model.init '{init}'; choose one of: {', '.join(MODEL_INITS)}")


class PaperCNN(nn.Module):
    """The paper's MNIST CNN: conv 5x5x32, ReLU, maxpool 2, conv 5x5x64, ReLU, maxpool 2,
    FC 1024, ReLU, FC (logits). Blocks, in forward order: conv1, conv2, fc1, fc2.

    init: "torch" (PyTorch's default, scaled by each layer's fan-in) or "paper" (the
    authors' truncated normal of std 0.1 and biases 0.1, see `MODEL_INITS`)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, init: str = "torch"):
        _check_init(init)
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * (image_size // 4) ** 2, 1024)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(1024, num_classes)
        if init == "paper":
            for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
                # TF's truncated normal cuts at two standard deviations.
                nn.init.trunc_normal_(layer.weight, std=0.1, a=-0.2, b=0.2)
                nn.init.constant_(layer.bias, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class PaperMLP(nn.Module):
    """The paper's MNIST MLP: 784-2500-1500-500-10 with ReLU. Blocks: fc1 .. fc4.

    init: "torch" (PyTorch's default) or "paper" (normal of std 2 / sqrt(fan_in),
    zero biases, see `MODEL_INITS`)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, init: str = "torch"):
        _check_init(init)
        super().__init__()
        self.flatten = nn.Flatten()
        widths = [in_features, 2500, 1500, 500, num_classes]
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            layer = nn.Linear(n_in, n_out)
            if init == "paper":
                nn.init.normal_(layer.weight, std=2.0 / math.sqrt(n_in))
                nn.init.zeros_(layer.bias)
            setattr(self, f"fc{i}", layer)
            if i < len(widths) - 1:
                setattr(self, f"relu{i}", nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        for i in range(1, 4):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))
        return self.fc4(x)


def input_spec(model_cfg, channels: int, size: int) -> InputSpec:
    """The input a model expects.

    Defaults: models built here (cnn, mlp, custom) take the dataset's own images
    (`channels`, `size`) in [0, 1]; timm models take what their pretrained
    configuration says. The model settings `channels`, `input_size`, `mean` and `std`
    (a number, or one per channel) override those defaults.
    """
    if model_cfg.kind == "timm":
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(model_cfg.name)
        if pretrained is None:
            raise SanityError(f"unknown timm model '{model_cfg.name}'; see timm.list_models() for the names")
        channels, size, _ = pretrained.input_size
        mean, std = tuple(pretrained.mean), tuple(pretrained.std)
    else:
        mean, std = (0.0,), (1.0,)
    channels = _whole(model_cfg, "channels", channels)
    size = _whole(model_cfg, "input_size", size)
    mean = _per_channel(model_cfg, "mean", mean, channels)
    std = _per_channel(model_cfg, "std", std, channels)
    if min(std) <= 0:
        raise SanityError(f"model.std must be above 0, not {list(std)}")
    return InputSpec(channels, size, mean, std)


def _whole(model_cfg, key: str, default: int) -> int:
    value = model_cfg.get(key)
    if value is None:
        return int(default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SanityError(f"model.{key} must be a whole number of at least 1, not '{value}'")
    return value


def _per_channel(model_cfg, key: str, default: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """A number or a list of one number per channel, as a tuple of `channels` floats."""
    value = model_cfg.get(key)
    values = list(default) if value is None else list(value) if OmegaConf.is_list(value) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise SanityError(f"model.{key} must be a number or a list of numbers, one per channel; got '{value}'")
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise SanityError(f"model.{key} has {len(values)} values for {channels} input channels; "
                          "give one per channel, or one for all")
    return tuple(float(v) for v in values)


def build_model(model_cfg, num_classes: int, spec: InputSpec) -> nn.Module:
    """Build the model that `model_cfg` describes, with weights loaded when it names any.

    cnn, mlp and custom come back freshly initialized (training is the caller's
    business) unless `checkpoint` is set; timm models load pretrained weights or a
    checkpoint. A custom model is tried once on a (2, C, H, W) input, and one that
    will be trained must have `num_classes` outputs.
    """
    checkpoint = model_cfg.get("checkpoint")
    if model_cfg.kind == "custom":
        return _build_custom(model_cfg, num_classes, spec)
    if model_cfg.kind == "timm":
        return _build_timm(model_cfg, num_classes)
    if model_cfg.kind == "cnn":
        model = PaperCNN(spec.channels, num_classes, spec.size, init=model_cfg.get("init", "torch"))
    elif model_cfg.kind == "mlp":
        model = PaperMLP(spec.channels * spec.size**2, num_classes, init=model_cfg.get("init", "torch"))
    else:
        raise SanityError(f"unknown model kind '{model_cfg.kind}'; choose one of: {', '.join(MODEL_KINDS)}")
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def _build_custom(model_cfg, num_classes: int, spec: InputSpec) -> nn.Module:
    checkpoint, target = model_cfg.get("checkpoint"), model_cfg.get("_target_")
    if checkpoint and is_torchscript(checkpoint):
        if target:
            raise SanityError(f"checkpoint '{checkpoint}' is a TorchScript model, which brings its own "
                              f"architecture; drop model._target_ (now '{target}')")
        model = torch.jit.load(str(checkpoint), map_location="cpu")
    elif not target:
        raise SanityError("model=custom needs model._target_=module.ClassName (a class or function returning an "
                          "nn.Module), or model.checkpoint=PATH of a TorchScript model")
    else:
        model = plugins.build_module(model_cfg)
        if checkpoint:
            load_weights(model, checkpoint)
    _try_input(model, spec, None if checkpoint else num_classes, model_cfg.get("name", "custom"))
    return model


@torch.no_grad()
def _try_input(model: nn.Module, spec: InputSpec, num_classes: int | None, name: str) -> None:
    """Run the model once on zeros of the configured input, so that a wrong geometry is
    one line now rather than a traceback mid-run."""
    shape = (2, spec.channels, spec.size, spec.size)
    was_training = model.training
    try:
        model.eval()
        logits = model(torch.zeros(shape))
    except Exception as error:  # noqa: BLE001 - any failure of user code on this input means the same
        detail = " ".join(str(error).split())[:160]
        raise SanityError(f"model {name} fails on a {shape} input ({type(error).__name__}: {detail}); set "
                          "model.channels and model.input_size to the input it expects") from None
    finally:
        model.train(was_training)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or len(logits) != 2:
        raise SanityError(f"model {name} returns {type(logits).__name__} {tuple(getattr(logits, 'shape', ()))} "
                          "for 2 inputs; it must return (B, K) logits")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise SanityError(f"model {name} has {logits.shape[1]} outputs but the dataset has {num_classes} classes; "
                          f"build it with {num_classes} outputs (e.g. +model.num_classes={num_classes})")


def _build_timm(model_cfg, num_classes: int) -> nn.Module:
    import timm

    name, checkpoint = model_cfg.name, model_cfg.get("checkpoint")
    _hub_warnings_once()
    if not timm.is_model(name):
        raise SanityError(f"unknown timm model '{name}'; see timm.list_models() for the names")
    if checkpoint:
        weights = read_weights(checkpoint)  # an unfit file fails before the (slower) model is built
        model = timm.create_model(name, pretrained=False)
        _match_classifier(model, weights)
        _load_into(model, weights, checkpoint)
        return model
    if not model_cfg.pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    cached = pretrained_weights_cached(name)
    if not cached:
        _reach_hub(name)  # one try, not the hub client's five with back-off
    try:
        with _hub_offline(cached):  # weights in the cache: no request for them at all
            return timm.create_model(name, pretrained=True)
    except Exception as error:  # noqa: BLE001 - hub, network and cache errors all mean "not fetched"
        raise SanityError(f"cannot fetch pretrained weights for '{name}' ({type(error).__name__}); "
                          f"{_fetch_advice(name)}") from None


def _hub_warnings_once() -> None:
    """The hub client prints its warnings through a handler of its own, and again through
    the root logger's (Hydra's, the CLI's) where there are any: keep only the root's, which
    also reach the run's log."""
    import huggingface_hub  # noqa: F401 - its import adds the handler

    if logging.getLogger().handlers:
        hub_logger = logging.getLogger("huggingface_hub")
        for handler in [h for h in hub_logger.handlers if type(h) is logging.StreamHandler]:
            hub_logger.removeHandler(handler)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm loads from a hub repository


def _hub_id(name: str) -> str | None:
    from timm.models import get_pretrained_cfg

    return getattr(get_pretrained_cfg(name), "hf_hub_id", None)


def pretrained_weights_cached(name: str) -> bool:
    """Whether timm can load `name`'s pretrained weights from the hub cache, without the network."""
    from huggingface_hub import try_to_load_from_cache

    repo = _hub_id(name)
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, file), str) for file in WEIGHT_FILES)


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """The hub client in offline mode while timm loads cached weights (it would ask the hub
    for a newer version first, and retry that five times where there is no network)."""
    import huggingface_hub.constants as hub

    if not offline:
        yield
        return
    previous, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous


def _reach_hub(name: str) -> None:
    """SanityError with what to fetch when the hub cannot be asked for `name`'s weights:
    HF_HUB_OFFLINE is set, or one request finds no network."""
    import huggingface_hub.constants as hub
    from huggingface_hub import get_session, hf_hub_url

    repo = _hub_id(name)
    if not repo:
        return  # weights from elsewhere than the hub: timm says what went wrong
    if hub.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            get_session().head(hf_hub_url(repo, WEIGHT_FILES[0]), timeout=10)
            return
        except Exception as error:  # noqa: BLE001 - no network, no name resolution, a proxy: all the same here
            reason = f"the hub cannot be reached: {type(error).__name__}"
    raise SanityError(f"the pretrained weights of {name} are not in the hub cache ({reason}); "
                      f"{_fetch_advice(name)}")


def _fetch_advice(name: str) -> str:
    import huggingface_hub.constants as hub

    repo = _hub_id(name) or name
    return (f"fetch {repo}/{WEIGHT_FILES[0]} on a machine with network (hf download {repo} {WEIGHT_FILES[0]}), "
            f"copy its hub cache here ({hub.HF_HUB_CACHE}, or anywhere with HF_HUB_CACHE=PATH pointing to it), pass "
            "model.checkpoint=PATH to a weights file, or model.pretrained=false for random weights; "
            "the paper's setting also needs ImageNet images: dataset=imagefolder dataset.path=PATH")


def _match_classifier(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """A fine-tuned timm checkpoint may have another number of classes than the
    ImageNet default: give the model a head of the checkpoint's size."""
    head = getattr(model, "pretrained_cfg", {}).get("classifier")
    names = [head] if isinstance(head, str) else list(head or [])
    for name in names:
        weight = weights.get(f"{name}.weight")
        if weight is not None and weight.dim() >= 1 and weight.shape[0] != model.num_classes:
            model.reset_classifier(weight.shape[0])
            return


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load the state_dict in the file at `path` into `model`; every way the file can
    be unfit (see `read_weights`), or not fit the model, is a one-line SanityError."""
    _load_into(model, read_weights(path), path)


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The weights in a .pt / .pth (read with weights_only=True) or .safetensors file.

    A training checkpoint's dict is unwrapped (`state_dict`, `model_state_dict` or
    `model` entry), DataParallel / torch.compile prefixes are dropped, and every
    floating-point tensor must be finite.
    """
    file = _existing(path)
    if file.suffix == ".safetensors":
        state: Any = _read_safetensors(file)
    elif is_torchscript(file):
        raise SanityError(f"checkpoint '{file}' is a TorchScript model, not a state_dict; load it with "
                          f"model=custom model.checkpoint={file}")
    else:
        state = _torch_load(file)
    weights = _weights_of(state, file)
    _check_finite(weights, file)
    return weights


def is_torchscript(path: str | Path) -> bool:
    """Whether the file is a TorchScript archive (torch.jit.save): a zip with a code/ folder."""
    file = Path(path).expanduser()
    if not file.is_file() or not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(part == "code" for name in archive.namelist() for part in name.split("/")[1:2])


def _existing(path: str | Path) -> Path:
    file = Path(path).expanduser()
    if file.is_dir():
        raise SanityError(f"checkpoint '{file}' is a directory; set model.checkpoint to a weights file in it "
                          "(.pt, .pth or .safetensors)")
    if not file.is_file():
        raise SanityError(f"checkpoint '{file}' does not exist; set model.checkpoint to a saved weights file")
    if file.stat().st_size == 0:
        raise SanityError(f"checkpoint '{file}' is empty; save the weights again with "
                          "torch.save(model.state_dict(), PATH)")
    return file


def _torch_load(file: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers, no code.
    argparse.Namespace is allowed too: timm's training checkpoints keep their args in one."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # torch refused a class or function in the pickle
        if not found:
            raise _not_weights(file, error) from None
        raise SanityError(f"checkpoint '{file}' holds pickled Python objects ({found.group(1)}), not just weights, "
                          "and is not loaded (pickles can run code); save a state_dict instead: "
                          "torch.save(model.state_dict(), PATH)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _not_weights(file, error) from None


def _not_weights(file: Path, error: Exception) -> SanityError:
    detail = " ".join(str(error).split())[:120]
    return SanityError(f"checkpoint '{file}' is not a PyTorch weights file ({type(error).__name__}: {detail}); "
                       "give a file saved with torch.save(model.state_dict(), PATH), or a .safetensors file")


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file  # installed with timm

    try:
        return load_file(str(file), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        detail = " ".join(str(error).split())[:120]
        raise SanityError(f"checkpoint '{file}' is not a readable safetensors file ({detail})") from None


def _weights_of(state: Any, file: Path) -> dict[str, Tensor]:
    """The parameter tensors of a loaded checkpoint; anything else is a one-line error."""
    fix = "save the weights with torch.save(model.state_dict(), PATH)"
    if isinstance(state, Tensor):
        raise SanityError(f"checkpoint '{file}' holds a single tensor {tuple(state.shape)}, not a state_dict "
                          f"(a dict of parameter names to tensors); {fix}")
    if not isinstance(state, Mapping):
        raise SanityError(f"checkpoint '{file}' holds a {type(state).__name__}, not a state_dict "
                          f"(a dict of parameter names to tensors); {fix}")
    for key in WRAPPER_KEYS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    weights = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    if not weights:
        keys = ", ".join(map(str, list(state)[:6])) or "none"
        raise SanityError(f"checkpoint '{file}' holds a dict without weights (keys: {keys}); {fix}")
    for prefix in ("module.", "_orig_mod."):  # DataParallel and torch.compile wrappers
        if all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
    return weights


def _check_finite(weights: dict[str, Tensor], file: Path) -> None:
    bad = [name for name, value in weights.items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise SanityError(f"checkpoint '{file}' has NaN or infinite values in {bad[0]}{more}; the training "
                          "diverged or the file is damaged: give a checkpoint with finite weights")


def _load_into(model: nn.Module, weights: dict[str, Tensor], path: str | Path) -> None:
    """load_state_dict, after naming what does not fit: missing and unexpected keys, other shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k}: {tuple(weights[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    problems = [f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
                if items]
    if problems:
        raise SanityError(f"checkpoint '{path}' does not fit {type(model).__name__}: {'; '.join(problems)}; "
                          "give the weights of the configured model, input size and number of classes")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, ValueError) as error:
        detail = " ".join(str(error).split())[:160]
        raise SanityError(f"checkpoint '{path}' does not load into {type(model).__name__} ({detail})") from None


def check_torchscript(model: nn.Module, test: str, randomizes: bool, methods: Mapping[str, Any]) -> None:
    """A TorchScript model takes no hooks on its modules: refuse, in one line before any
    work, a check that randomizes blocks (finding them needs hooks) and a built-in
    method that hooks (GradCAM, guided backprop, ...). `methods` is {key: options}
    of the run; plugged methods check their own needs. Nothing to do for other models."""
    if not isinstance(model, torch.jit.ScriptModule):
        return
    hooking = [key for key, options in methods.items() if needs_hooks(key, options)]
    needs = f"test={test}" if randomizes else f"method {hooking[0]}" if hooking else None
    if needs:
        raise SanityError(f"{needs} needs hooks on the model's modules, which a TorchScript model does not take; "
                          f"use test=random_logit with methods among {', '.join(HOOK_FREE)}, or load a "
                          "state_dict into model._target_ instead")
