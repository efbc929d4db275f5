"""Train TinyNet on scikit-learn's digits (as `sanity run` loads them) and save its weights.

    python examples/make_checkpoint.py outputs/tiny_net.pt            # a state_dict
    python examples/make_checkpoint.py outputs/tiny_net.safetensors   # the same, as safetensors
    python examples/make_checkpoint.py outputs/tiny_net_script.pt --torchscript

The images are the ones `dataset=digits` gives (28x28 in [0, 1], seeded 80/20
split), so the run explains the model on inputs like those it was trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from sanity_cli.data import load_digits
from tiny_net import TinyNet


def train(epochs: int, seed: int) -> TinyNet:
    """TinyNet after `epochs` of Adam (lr 1e-3, batch 50) on the digits' training split."""
    torch.manual_seed(seed)
    data = load_digits(image_size=28, test_fraction=0.2, seed=seed)
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(data.train_y)).split(50):
            loss = nn.functional.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")
    return model


def save(model: TinyNet, path: Path, torchscript: bool) -> None:
    """A state_dict (.pt / .pth, or .safetensors), or a TorchScript model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torchscript:
        torch.jit.save(torch.jit.script(model), str(path))
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="where to save: .pt, .pth or .safetensors")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torchscript", action="store_true", help="save a TorchScript model instead")
    args = parser.parse_args()
    save(train(args.epochs, args.seed), args.path, args.torchscript)


if __name__ == "__main__":
    main()
