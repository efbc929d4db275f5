"""Model construction: the paper's MNIST architectures and any timm model.

Inputs to every model are normalized images: `InputSpec` says how (channels, size,
mean, std). Saliency maps are taken with respect to these normalized inputs, as in
the paper (Inception v3 sees x / 127.5 - 1, i.e. mean = std = 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sanity_cli.errors import SanityError

TRAINABLE_KINDS = ("cnn", "mlp")
MODEL_KINDS = (*TRAINABLE_KINDS, "timm")


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


class PaperCNN(nn.Module):
    """The paper's MNIST CNN: conv 5x5x32, ReLU, maxpool 2, conv 5x5x64, ReLU, maxpool 2,
    FC 1024, ReLU, FC (logits). Blocks, in forward order: conv1, conv2, fc1, fc2."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
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
        for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
            # TF's truncated normal cuts at two standard deviations.
            nn.init.trunc_normal_(layer.weight, std=0.1, a=-0.2, b=0.2)
            nn.init.constant_(layer.bias, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class PaperMLP(nn.Module):
    """The paper's MNIST MLP: 784-2500-1500-500-10 with ReLU. Blocks: fc1 .. fc4."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.flatten = nn.Flatten()
        widths = [in_features, 2500, 1500, 500, num_classes]
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            layer = nn.Linear(n_in, n_out)
            # The paper's initialization: normal with std 2 / sqrt(fan_in).
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
    """The input a model expects. Models trained here take the dataset's own images
    in [0, 1]; timm models take what their pretrained configuration says."""
    if model_cfg.kind in TRAINABLE_KINDS:
        return InputSpec(channels, size, (0.0,) * channels, (1.0,) * channels)
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(model_cfg.name)
    if pretrained is None:
        raise SanityError(f"unknown timm model '{model_cfg.name}'; see timm.list_models() for the names")
    c, h, _ = pretrained.input_size
    return InputSpec(c, h, tuple(pretrained.mean), tuple(pretrained.std))


def build_model(model_cfg, num_classes: int, spec: InputSpec) -> nn.Module:
    """Build the model that `model_cfg` describes, with weights loaded when it names any.

    cnn and mlp come back freshly initialized (training is the caller's business)
    unless `checkpoint` is set; timm models load pretrained weights or a checkpoint.
    """
    if model_cfg.kind == "cnn":
        model = PaperCNN(spec.channels, num_classes, spec.size)
    elif model_cfg.kind == "mlp":
        model = PaperMLP(spec.channels * spec.size**2, num_classes)
    elif model_cfg.kind == "timm":
        return _build_timm(model_cfg, num_classes)
    else:
        raise SanityError(f"unknown model kind '{model_cfg.kind}'; choose one of: {', '.join(MODEL_KINDS)}")
    if model_cfg.get("checkpoint"):
        _load(model, model_cfg.checkpoint, lambda: model.load_state_dict(_read_checkpoint(model_cfg.checkpoint)))
    return model


def _build_timm(model_cfg, num_classes: int) -> nn.Module:
    import timm

    name, checkpoint = model_cfg.name, model_cfg.get("checkpoint")
    if not timm.is_model(name):
        raise SanityError(f"unknown timm model '{name}'; see timm.list_models() for the names")
    if checkpoint:
        model = timm.create_model(name, pretrained=False)
        path = str(_existing(checkpoint))
        _load(model, checkpoint, lambda: timm.models.load_checkpoint(model, path))
        return model
    if not model_cfg.pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as error:  # noqa: BLE001 - hub, network and cache errors all mean "not fetched"
        raise SanityError(
            f"cannot fetch pretrained weights for '{name}' ({type(error).__name__}); "
            "use model.checkpoint=PATH for a local weights file, or model.pretrained=false for random weights"
        ) from None


def _load(model: nn.Module, path: str, load) -> None:
    """Run `load`; a checkpoint of another architecture becomes a one-line error."""
    try:
        load()
    except (RuntimeError, KeyError, ValueError) as error:
        detail = " ".join(str(error).split())[:160] or type(error).__name__
        raise SanityError(f"checkpoint '{path}' does not fit {type(model).__name__} ({detail}); "
                          "give the weights of the configured model and input size") from None


def _existing(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise SanityError(f"checkpoint '{file}' does not exist; set model.checkpoint to a saved weights file")
    return file


def _read_checkpoint(path: str) -> dict[str, Tensor]:
    state = torch.load(_existing(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
