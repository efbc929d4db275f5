"""The sanity checks as sequences of conditions to explain.

Each check yields `Condition`s: a state (step and block, as in the CSV), the model to
explain, and how to choose the explained class. The pipeline explains every
condition, compares its maps with those of the first condition (step 0), and never
needs to know which check produced them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sanity_cli.randomization import State, TrainedWeights, cascading_states, independent_states

MODEL_CHECKS = ("cascade", "independent", "smooth_cascade", "entropy")
CHECKS = (*MODEL_CHECKS, "data", "random_logit")
TRUE_LABELS, SHUFFLED_LABELS = "true labels", "shuffled labels"
PREDICTED_CLASS, RANDOM_CLASS = "predicted class", "random other class"


@dataclass
class Condition:
    """One thing to explain: a model state, and the classes to explain in it.

    retarget: maps the default targets (B,) to the classes explained here; None keeps them.
    """

    state: State
    model: nn.Module
    retarget: Callable[[Tensor], Tensor] | None = None


def model_randomization(test_cfg, model: nn.Module, blocks: list[str], trained: TrainedWeights,
                        seed: int) -> Iterator[Condition]:
    """Cascading (also for sMPRT and eMPRT) or independent re-initialization of `blocks`."""
    states = independent_states if test_cfg.name == "independent" else cascading_states
    for state in states(model, blocks, trained, seed, test_cfg.init, test_cfg.reset_bn_stats):
        yield Condition(state, model)


def data_randomization(true_model: nn.Module, shuffled_model: nn.Module) -> Iterator[Condition]:
    """The model trained on true labels, then the one trained on shuffled labels."""
    yield Condition(State(0, TRUE_LABELS, ()), true_model)
    yield Condition(State(1, SHUFFLED_LABELS, ()), shuffled_model)


def random_logit(model: nn.Module, num_classes: int, seed: int) -> Iterator[Condition]:
    """The predicted class, then a random other class of the same model (Sixt et al. 2020)."""
    yield Condition(State(0, PREDICTED_CLASS, ()), model)
    yield Condition(State(1, RANDOM_CLASS, ()), model, lambda targets: other_class(targets, num_classes, seed))


def other_class(targets: Tensor, num_classes: int, seed: int) -> Tensor:
    """A seeded, uniformly random class different from each target. (B,) -> (B,)."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, targets.shape, generator=generator).to(targets.device)
    return (targets + shift) % num_classes
