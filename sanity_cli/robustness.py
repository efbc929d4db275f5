"""The scores of robustness.csv: each state's maps compared with the trained model's again
under every normalization, with and without absolute value, while the run has the maps.
The verdict judges each variant (`judging.variant_outcomes`) for its `holds_in` column."""

from __future__ import annotations

import torch
from torch import Tensor

from sanity_cli.metrics import NORMALIZATIONS, Variant, compare_variants

ROBUSTNESS_METRICS = ("spearman_abs", "spearman")  # with and without absolute value
RESCALINGS = ("none", "max_abs", "second_moment")  # normalizations that multiply a map by a positive number


# The normalization whose scores stand for each one's: a rescaling's are those of 'none'.
_COMPUTED = {scheme: RESCALINGS[0] if scheme in RESCALINGS else scheme for scheme in NORMALIZATIONS}
# What robustness.csv needs computed.
ROBUSTNESS_VARIANTS: tuple[Variant, ...] = tuple((metric, scheme) for scheme in dict.fromkeys(_COMPUTED.values())
                                                 for metric in ROBUSTNESS_METRICS)


@torch.no_grad()
def robustness_scores(reference: Tensor, maps: Tensor, *, single_channel: bool) -> dict[str, dict[str, Tensor]]:
    """The same comparison under every normalization, with and without absolute value.

    reference, maps: (B, C, H, W) maps of the trained model and of one state.
    Returns normalization -> metric (spearman_abs, spearman) -> (B,) float64 scores,
    for the run's maps as they are (no second explanation pass). The rescalings
    (none, max_abs, second_moment) multiply each map by a positive number, which
    changes no rank: their scores are computed once. Every variant's ranks come from one
    sort of each map with and without absolute value (compare_variants).
    """
    return robustness_table(compare_variants(reference, maps, ROBUSTNESS_VARIANTS, single_channel=single_channel))


def robustness_table(scores: dict[Variant, Tensor]) -> dict[str, dict[str, Tensor]]:
    """normalization -> metric -> scores, from compare_variants' scores of (at least) ROBUSTNESS_VARIANTS."""
    return {scheme: {metric: scores[(metric, computed)] for metric in ROBUSTNESS_METRICS}
            for scheme, computed in _COMPUTED.items()}
