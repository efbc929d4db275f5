"""Data randomization: the model trained on true labels against the same architecture
trained on one seeded permutation of them; the shuffled-label model decides."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from sanity_cli.checks.base import Check, Condition, Subject
from sanity_cli.randomization import State

TRUE_LABELS, SHUFFLED_LABELS = "true labels", "shuffled labels"


class DataRandomization(Check):
    name = "data"
    needs_shuffled_model = True

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        yield Condition(State(0, TRUE_LABELS, ()), subject.models["trained"])
        yield Condition(State(1, SHUFFLED_LABELS, ()), subject.models["shuffled"])

    def decisive(self, results: pd.DataFrame) -> pd.DataFrame:
        return results[results["step"] == 1]


CHECK = DataRandomization()
