"""Why a trained model's maps are noise: initialization, training length, input scale.

Trains the paper's CNN (or MLP) once with one setting and prints, as one JSON line, its
test accuracy, how far training moved each block's weights (||W - W0|| / ||W0||), and
the signal figures (sanity_cli.signal) of its Gradient and Guided Backprop maps on 32
test images, before and after training:

    python scripts/init_study.py --init paper               # the authors' init: noise
    python scripts/init_study.py --init torch               # PyTorch's default: the digit
    python scripts/init_study.py --init paper --lr 1e-2     # larger steps move the weights
    python scripts/init_study.py --init fixed:0.01 --epochs 10
    python scripts/init_study.py --init torch --tint        # 3-channel tinted digits

Inits: torch, paper (the model's own), he (normal std sqrt(2 / fan_in), biases 0),
xavier (Glorot uniform, biases 0), paper_bias0 (std 0.1, biases 0), fixed:S (truncated
normal std S, biases 0.1).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from sanity_cli.data import ImageData, load_digits, load_torchvision, select_images
from sanity_cli.methods import explain_all
from sanity_cli.models import PaperCNN, PaperMLP
from sanity_cli.signal import FIGURES, signal_figures
from sanity_cli.training import evaluate, fit

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


def reinitialize(model: nn.Module, init: str) -> None:
    """Apply one of the study's inits (beyond the model's own torch / paper) to every layer."""
    for layer in (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        fan_in = layer.weight[0].numel()
        if init == "he":
            nn.init.normal_(layer.weight, std=math.sqrt(2 / fan_in))
            nn.init.zeros_(layer.bias)
        elif init == "xavier":
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif init == "paper_bias0":
            nn.init.trunc_normal_(layer.weight, std=0.1, a=-0.2, b=0.2)
            nn.init.zeros_(layer.bias)
        elif init.startswith("fixed:"):
            std = float(init.split(":")[1])
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.constant_(layer.bias, 0.1)
        else:
            raise SystemExit(f"unknown init '{init}'")


def tinted(x: Tensor, generator: torch.Generator) -> Tensor:
    """(N, 1, H, W) -> (N, 3, H, W): a bright random colour on a dark random background."""
    foreground = 0.5 + 0.5 * torch.rand(len(x), 3, 1, 1, generator=generator)
    background = 0.4 * torch.rand(len(x), 3, 1, 1, generator=generator)
    return x * foreground + (1 - x) * background


def load(name: str, tint: bool) -> ImageData:
    data = (load_digits(28, 0.2, 0) if name == "digits"
            else load_torchvision("FashionMNIST", "~/.cache/sanity/data", FASHION_SYSTEM_DIR))
    if tint:
        generator = torch.Generator().manual_seed(1)
        data.train_x, data.test_x = tinted(data.train_x, generator), tinted(data.test_x, generator)
    return data


def figures(model: nn.Module, x: Tensor, display: Tensor) -> dict[str, dict[str, float]]:
    """Mean signal figures of the Gradient and Guided Backprop maps of x (B, C, H, W)."""
    maps = explain_all(model, x, "predicted", {"gradient": {}, "guided_backprop": {}})
    return {name: {f: round(v.nanmean().item(), 2) for f, v in signal_figures(m, display).items() if f in FIGURES}
            for name, m in maps.items()}


def study(args: argparse.Namespace) -> dict:
    data = load(args.dataset, args.tint)
    torch.manual_seed(args.seed)
    channels = data.train_x.shape[1]
    own = args.init if args.init in ("torch", "paper") else "torch"
    model = PaperCNN(channels, 10, 28, init=own) if args.model == "cnn" else PaperMLP(channels * 784, 10, init=own)
    if args.init != own:
        reinitialize(model, args.init)
    chosen = select_images(data.test_y, 32, 0)
    display = data.test_x[chosen]
    start = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}
    before = figures(model.eval(), display * args.input_scale, display)
    train = OmegaConf.create({"epochs": args.epochs, "batch_size": 50, "lr": args.lr, "optimizer": "adam"})
    fit(model, data.train_x * args.input_scale, data.train_y, train, args.seed, torch.device("cpu"))
    moved = {name.split(".")[0]: round(((p - start[name]).norm() / start[name].norm()).item(), 2)
             for name, p in model.named_parameters() if name in start}
    return {"model": args.model, "init": args.init, "dataset": args.dataset + (" tinted" if args.tint else ""),
            "epochs": args.epochs, "lr": args.lr, "input_scale": args.input_scale, "seed": args.seed,
            "test_accuracy": round(evaluate(model, data.test_x * args.input_scale, data.test_y,
                                            torch.device("cpu")), 3),
            "weights_moved": moved, "untrained": before, "trained": figures(model, display * args.input_scale,
                                                                                display)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--init", default="paper")
    parser.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--input-scale", type=float, default=1.0, help="multiply the [0, 1] inputs by this")
    parser.add_argument("--tint", action="store_true", help="3-channel tinted images")
    parser.add_argument("--seed", type=int, default=0)
    print(json.dumps(study(parser.parse_args())))


if __name__ == "__main__":
    main()
