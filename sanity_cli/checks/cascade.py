"""Cascading model parameter randomization (Adebayo et al. 2018): blocks re-initialized
cumulatively, from the logits down (or, with `test.order=bottom_up`, from the input up,
as Binder et al. 2023 recommend);
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
                                      order=test.get("order") or "top_down"):
            yield Condition(state, model)

    def n_states(self, subject: Subject) -> int:
        return len(subject.blocks) + 1


CHECK = Cascade()
