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

    fails_mean = "the noise-averaged map stays the same when the model's weights are randomized"

    def maps(self, explain: Explain, model: nn.Module, images: Tensor, targets: Tensor, seed: int,
             settings: Mapping, ids: Tensor) -> dict[str, Tensor]:
        """The same noisy copies in every state (seeded per image), so only the model differs.

        Memory: one noisy copy of the images and one sum of maps per method at a time,
        whatever `samples` (the copies are drawn, explained and added one after another,
        in place; explain chunks each copy by max_batch)."""
        sigma = noise_scale(images, settings["noise"])
        generators = image_generators(len(images), seed, images.device, ids)
        total: dict[str, Tensor] = {}
        for _ in range(settings["samples"]):
            # sigma * noise + images, computed in the noise's own memory (the same numbers)
            noisy = draw_noise(generators, images.shape[1:], images.dtype, images.device).mul_(sigma).add_(images)
            for name, maps in explain(model, noisy, targets).items():
                if name in total:
                    total[name].add_(maps)
                else:
                    total[name] = maps.clone()  # a sum of our own: explain's tensor is never written to
            del noisy
        return {name: value.div_(settings["samples"]) for name, value in total.items()}


CHECK = SmoothCascade()
