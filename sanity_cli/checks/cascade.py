"""Cascading model parameter randomization (Adebayo et al. 2018): blocks re-initialized
cumulatively, from the logits down (or, with `order=bottom_up`, from the input up);
the verdict is decided with every block random."""

from __future__ import annotations

from collections.abc import Iterator

from sanity_cli.checks.base import Check, Condition, Subject
from sanity_cli.randomization import cascading_states


class Cascade(Check):
    name = "cascade"
    randomizes_model = True

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        model, test = subject.models["trained"], subject.settings
        for state in cascading_states(model, subject.blocks, subject.trained, seed, test.init, test.reset_bn_stats,
                                      **_order(test)):
            yield Condition(state, model)

    def n_states(self, subject: Subject) -> int:
        return len(subject.blocks) + 1


def _order(test) -> dict:
    order = test.get("order")
    return {"order": order} if order else {}


CHECK = Cascade()
