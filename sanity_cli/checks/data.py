"""Data randomization: the model trained on true labels against the same architecture
trained on one seeded permutation of them; the shuffled-label model decides."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace

import pandas as pd

from sanity_cli.checks.base import Check, Condition, Evidence, Precondition, Subject
from sanity_cli.randomization import State

TRUE_LABELS, SHUFFLED_LABELS = "true labels", "shuffled labels"


class DataRandomization(Check):
    name = "data"
    needs_shuffled_model = True
    step_models = {0: "trained", 1: "shuffled"}
    pair_label = "similarity: true-label vs shuffled-label model"

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        yield Condition(State(0, TRUE_LABELS, ()), subject.models["trained"])
        yield Condition(State(1, SHUFFLED_LABELS, ()), subject.models["shuffled"])

    def shuffled_training(self, settings: Mapping, train):
        """Memorizing random labels takes longer than learning true ones: test.shuffled_epochs,
        at a learning rate of its own (test.shuffled_lr; a rate that fits true labels can stall
        at chance on random ones), on the first test.shuffled_subset training images."""
        lr = settings.get("shuffled_lr") or train.lr
        return replace(train, epochs=settings.shuffled_epochs, lr=lr), settings.get("shuffled_subset")

    def decisive(self, results: pd.DataFrame) -> pd.DataFrame:
        return results[results["step"] == 1]

    def axis_label(self, order: str) -> str:
        return "model"

    fails_mean = "the map stays the same for a model trained on shuffled labels, which learnt nothing about the data"

    def preconditions(self, evidence: Evidence) -> list[Precondition]:
        """The trained model's, and: the shuffled-label model memorized its labels (train
        accuracy at least `test.memorization_threshold`); a model that did not has learnt
        nothing, so that its maps differing from the trained model's shows nothing."""
        return super().preconditions(evidence) + [memorized(evidence)]


def memorized(evidence: Evidence) -> Precondition:
    accuracy = (evidence.models.get("shuffled") or {}).get("train_accuracy")
    threshold = (evidence.settings.get("test") or {}).get("memorization_threshold")
    if accuracy is None or threshold is None:
        return Precondition("shuffled labels memorized", None)
    return Precondition("shuffled labels memorized", accuracy >= threshold,
                        f"the shuffled-label model reached train accuracy {accuracy:.3f} < {threshold:.2f}: it has not "
                        "memorized its labels, so the data randomization test means little; raise "
                        "test.shuffled_epochs, or lower test.shuffled_lr if the loss stays at chance")


CHECK = DataRandomization()
