"""Cascading model parameter randomization (Adebayo et al. 2018): blocks re-initialized
cumulatively, from the logits down (or, with `test.order=bottom_up`, from the input up,
as Binder et al. 2023 recommend);
the verdict is decided with every block random."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from sanity_cli.checks.base import Check, Condition, Evidence, Precondition, Subject
from sanity_cli.randomization import cascading_states


class Cascade(Check):
    name = "cascade"
    randomizes_model = True

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        model, test = subject.models["trained"], subject.settings
        for state in cascading_states(model, subject.blocks, subject.trained, seed, test.init, test.reset_bn_stats,
                                      order=test.order):
            yield Condition(state, model)

    def n_states(self, subject: Subject) -> int:
        return len(subject.blocks) + 1

    def axis_label(self, order: str) -> str:
        return block_axis_label(order, cumulative=True)

    def fail_meaning(self, order: str) -> str:
        if self.fails_mean:  # a check built on the cascade that says it in its own words
            return self.fails_mean
        where = "from the input up" if order == "bottom_up" else "from the logits down"
        return f"the map stays the same when the model's weights are randomized {where}"

    def card_aside(self, order: str) -> str:
        if order != "bottom_up":
            return ""
        return ("Its verdict is at the fully randomized model, as the top-down cascade's (the same draws give the same "
                "value); the two differ in the path there, which its figure shows.")

    def preconditions(self, evidence: Evidence) -> list[Precondition]:
        """The trained model's, and the receipt: no parameter tensor is left trained at the
        fully randomized state (states.csv), else the decisive state is not full randomization."""
        return super().preconditions(evidence) + [fully_randomized(evidence)]


def block_axis_label(order: str, cumulative: bool) -> str:
    """The x-axis of block-wise randomization, in the order the states were made."""
    what = "blocks randomized cumulatively" if cumulative else "block randomized"
    return f"{what}, from the input (bottom) up" if order == "bottom_up" else f"{what}, from the top (logits) down"


def fully_randomized(evidence: Evidence) -> Precondition:
    states = evidence.states
    if states is None or states.empty or "tensors_left_trained" not in states:
        return Precondition("fully randomized", None)
    last = states[states["step"] == states.groupby("seed")["step"].transform("max")]
    left = pd.to_numeric(last["tensors_left_trained"], errors="coerce").max()
    if pd.isna(left):
        return Precondition("fully randomized", None)
    return Precondition("fully randomized", int(left) == 0,
                        f"{int(left)} parameter tensor(s) are still trained at the last state (states.csv, "
                        "tensors_left_trained): the decisive state is not the fully randomized model; use "
                        "test.granularity=block or list their modules")


CHECK = Cascade()
