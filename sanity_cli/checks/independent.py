"""Independent model parameter randomization: one block at a time re-initialized, the
others trained. Every block's state decides a verdict of its own."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from sanity_cli.checks.base import Check, Condition, Subject
from sanity_cli.checks.cascade import block_axis_label
from sanity_cli.randomization import independent_states


class Independent(Check):
    name = "independent"
    randomizes_model = True

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        model, test = subject.models["trained"], subject.settings
        for state in independent_states(model, subject.blocks, subject.trained, seed, test.init,
                                        test.reset_bn_stats, order=test.order):
            yield Condition(state, model)

    def n_states(self, subject: Subject) -> int:
        return len(subject.blocks) + 1

    def axis_label(self, order: str) -> str:
        return block_axis_label(order, cumulative=False)

    fails_mean = "the map stays the same when one of the model's blocks is randomized"

    def decisive(self, results: pd.DataFrame) -> pd.DataFrame:
        return results[results["step"] > 0]


CHECK = Independent()
