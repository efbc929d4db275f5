"""A small CNN of your own, for `sanity run model=custom model._target_=tiny_net.TinyNet`.

Any importable class or function that returns a torch nn.Module will do; its
keyword arguments come from the config (`+model.width=32`).
"""

from __future__ import annotations

from torch import Tensor, nn


class TinyNet(nn.Module):
    """conv 3x3 (width), ReLU, maxpool 2, conv 3x3 (2 width), ReLU, maxpool 2, linear.

    Each ReLU is a module of its own and runs once per forward, so hook-based
    methods (Captum's GuidedBackprop, DeepLift; zennit's LRP) see every one.
    Input (B, in_channels, H, W) with H and W divisible by 4; output (B, num_classes) logits.
    """

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width * (image_size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(self.flatten(x))
