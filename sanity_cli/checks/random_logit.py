"""Random logit (Sixt et al. 2020): the map of the predicted class against the map of a
random other class of the same model; adds SSIM of each sign of the maps on its own."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pandas as pd
import torch
from torch import Tensor

from sanity_cli.checks.base import Check, Compare, Condition, Subject
from sanity_cli.errors import SanityError
from sanity_cli.methods.noise import image_generators
from sanity_cli.randomization import State

PREDICTED_CLASS, RANDOM_CLASS = "predicted class", "random other class"


class RandomLogit(Check):
    name = "random_logit"
    own_metrics = ("ssim_positive", "ssim_negative")  # `signed_ssim`
    pair_label = "similarity: true class vs random class"

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        model, classes = subject.models["trained"], subject.num_outputs
        yield Condition(State(0, PREDICTED_CLASS, ()), model)
        yield Condition(State(1, RANDOM_CLASS, ()), model,
                        lambda targets, ids: other_class(targets, classes, seed, ids))

    def check_fit(self, subject: Subject) -> None:
        if subject.num_outputs < 2:
            raise SanityError("test=random_logit needs a model with at least two classes")

    def score(self, reference: Tensor, maps: Tensor, compare: Compare, settings: Mapping) -> dict[str, Tensor]:
        return {**compare(reference, maps), **signed_ssim(reference, maps, compare)}

    def decisive(self, results: pd.DataFrame) -> pd.DataFrame:
        return results[results["step"] == 1]

    def axis_label(self, order: str) -> str:
        return "class explained"

    fails_mean = "the map for a random other class looks like the map for the predicted class"


def other_class(targets: Tensor, num_classes: int, seed: int, ids: Tensor | None = None) -> Tensor:
    """A uniformly random class different from each target, (B,) -> (B,), drawn from a
    generator per image seeded with `seed` and the image's id (`ids` (B,), else its position)."""
    generators = image_generators(len(targets), seed, torch.device("cpu"), ids)
    shift = torch.cat([torch.randint(1, num_classes, (1,), generator=g) for g in generators])
    return (targets + shift.to(targets.device)) % num_classes


def signed_ssim(reference: Tensor, other: Tensor, compare: Compare) -> dict[str, Tensor]:
    """SSIM of the positive parts and of the negative parts of two maps on their own
    (Sixt et al. 2020). Where neither map has any value of a sign (GradCAM has no
    negative part) there is nothing to compare: NaN, not the 1.0 of two empty maps."""
    scores = {}
    for sign, part in (("positive", lambda m: m.clamp(min=0)), ("negative", lambda m: (-m).clamp(min=0))):
        a, b = part(reference), part(other)
        value = compare(a, b, metrics=["ssim"])["ssim"]
        empty = (a.flatten(1).amax(dim=1) <= 0) & (b.flatten(1).amax(dim=1) <= 0)
        scores[f"ssim_{sign}"] = value.masked_fill(empty.to(value.device), float("nan"))
    return scores


CHECK = RandomLogit()
