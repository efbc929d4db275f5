"""sMPRT (Hedström et al. 2023): the cascade, with every map averaged over `samples`
noisy copies of the input (noise std = `noise` x each input's range) before comparing."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sanity_cli.checks.base import Explain
from sanity_cli.checks.cascade import Cascade
from sanity_cli.methods.noise import noise_scale


class SmoothCascade(Cascade):
    name = "smooth_cascade"

    def maps(self, explain: Explain, model: nn.Module, images: Tensor, targets: Tensor, seed: int,
             settings: Mapping) -> dict[str, Tensor]:
        """The same noisy copies in every state (seeded), so only the model differs."""
        sigma = noise_scale(images, settings["noise"])
        generator = torch.Generator(device=images.device).manual_seed(seed)
        total: dict[str, Tensor] = {}
        for _ in range(settings["samples"]):
            noisy = images + sigma * torch.randn(images.shape, generator=generator, device=images.device,
                                                 dtype=images.dtype)
            for name, maps in explain(model, noisy, targets).items():
                total[name] = total[name] + maps if name in total else maps
        return {name: value / settings["samples"] for name, value in total.items()}


CHECK = SmoothCascade()
