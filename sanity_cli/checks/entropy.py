"""eMPRT (Hedström et al. 2023): the rise of each map's histogram entropy from the
trained model through the cascade, entropy(state) / entropy(step 0) - 1. A method whose
maps become noise under randomization gains entropy, so here a higher score is the change."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from sanity_cli.checks.base import Compare
from sanity_cli.checks.cascade import Cascade
from sanity_cli.metrics import histogram_entropy


class Entropy(Cascade):
    name = "entropy"
    verdict_metric = "entropy_rise"
    higher_means_change = True
    unbounded_metrics = ("entropy", "entropy_rise")  # nats, and a relative rise
    verdict_label = "entropy rise over the trained model's map"

    fails_mean = "the map's entropy does not rise when the model's weights are randomized"

    def score(self, reference: Tensor, maps: Tensor, compare: Compare, settings: Mapping) -> dict[str, Tensor]:
        start, now = histogram_entropy(reference, settings["bins"]), histogram_entropy(maps, settings["bins"])
        return {"entropy": now, "entropy_rise": now / start - 1.0}


CHECK = Entropy()
