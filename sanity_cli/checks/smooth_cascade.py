"""sMPRT (Hedström et al. 2023): the cascade, with every map averaged over `samples`
noisy copies of the input (noise std = `noise` x each input's range) before comparing."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from sanity_cli.checks.base import Explain
from sanity_cli.checks.cascade import Cascade
from sanity_cli.methods.noise import draw_noise, image_generators, noise_scale


class SmoothCascade(Cascade):
    name = "smooth_cascade"

    def maps(self, explain: Explain, model: nn.Module, images: Tensor, targets: Tensor, seed: int,
             settings: Mapping, ids: Tensor) -> dict[str, Tensor]:
        """The same noisy copies in every state (seeded per image), so only the model differs."""
        sigma = noise_scale(images, settings["noise"])
        generators = image_generators(len(images), seed, images.device, ids)
        total: dict[str, Tensor] = {}
        for _ in range(settings["samples"]):
            noisy = images + sigma * draw_noise(generators, images.shape[1:], images.dtype, images.device)
            for name, maps in explain(model, noisy, targets).items():
                total[name] = total[name] + maps if name in total else maps
        return {name: value / settings["samples"] for name, value in total.items()}


CHECK = SmoothCascade()
