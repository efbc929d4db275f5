"""What every check declares: the conditions it explains, how it makes and scores
maps where that differs from the default, and the state that decides its verdict.

A check is a `Check` subclass in a module of its own, registered by name in
`sanity_cli.checks`. The pipeline runs any check through this interface and never
names one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch import Tensor, nn

from sanity_cli.errors import SanityError
from sanity_cli.randomization import State, TrainedWeights
from sanity_cli.training import TrainedModel

# explain(model, images, targets) -> {method: (B, C, H, W) maps}
Explain = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]
# compare(reference, other, **overrides) -> {metric: (B,) scores}, with the run's metric settings
Compare = Callable[..., dict[str, Tensor]]


@dataclass
class Condition:
    """One thing to explain: a model state, and the classes to explain in it.

    retarget: (targets, ids) -> the classes explained here, from the default targets (B,) of
    the images named by ids (B,) (a run takes its images a chunk at a time); None keeps them.
    transform: (maps, images, ids) -> (the maps scored here, {metric: (B,)} scores of the state
    added to every method's rows), for a check that measures each map rather than compares
    two models' (test=manifold); None keeps the maps as they are.
    explain: False takes step 0's maps (as its transform left them) instead of explaining
    the same model again.
    """

    state: State
    model: nn.Module
    retarget: Callable[[Tensor, Tensor], Tensor] | None = None
    transform: Callable[[dict[str, Tensor], Tensor, Tensor], tuple[dict[str, Tensor], dict[str, Tensor]]] | None = None
    explain: bool = True


@dataclass
class Subject:
    """What a check works on: its settings, the models, and the blocks to randomize.

    models: "trained", and "shuffled" for a check that needs a model trained on shuffled labels.
    blocks: the trained model's blocks in forward order (empty unless the check randomizes the model).
    """

    settings: Mapping
    models: Mapping[str, nn.Module]
    num_outputs: int
    blocks: list[str] = field(default_factory=list)
    trained: TrainedWeights | None = None


class Check:
    """The default behaviour: explain each condition with the run's methods, compare
    every state's maps with step 0's by the run's metrics, decide on the last state."""

    name: str = ""
    randomizes_model = False       # its states re-initialize blocks of the trained model
    needs_shuffled_model = False   # it compares with a model trained on shuffled labels
    verdict_metric: str | None = None  # a metric of its own decides (None: the run's choice)
    higher_means_change = False    # for similarities a change lowers the score
    compares_maps = True           # scores compare two maps (robustness.csv re-scores them per normalization)

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        raise NotImplementedError

    def n_states(self, subject: Subject) -> int:
        """How many conditions `conditions` yields (for progress)."""
        return 2

    def check_fit(self, subject: Subject) -> None:
        """Raise SanityError when the check cannot run on this model."""

    def maps(self, explain: Explain, model: nn.Module, images: Tensor, targets: Tensor, seed: int,
             settings: Mapping, ids: Tensor) -> dict[str, Tensor]:
        """The maps compared in one state: by default the methods' maps as they are.
        `settings` are the check's own (the `test` config); `ids` (B,) name the images."""
        return explain(model, images, targets)

    def score(self, reference: Tensor, maps: Tensor, compare: Compare, settings: Mapping) -> dict[str, Tensor]:
        """One method's scores of one state against step 0: {metric: (B,)}."""
        return compare(reference, maps)

    def decisive(self, results: pd.DataFrame) -> pd.DataFrame:
        """The rows of `results` (this check's) at the state that decides the verdict:
        by default the last step of each seed."""
        last = results.groupby("seed")["step"].transform("max")
        return results[results["step"] == last]

    def extra_models(self, cfg, dataset, spec, device) -> dict[str, TrainedModel]:
        """Models the check needs besides the classifiers, trained (and cached) or loaded
        before any work, by name (they join `Subject.models`); none by default."""
        return {}

    def verdict_rows(self, decisive: pd.DataFrame, settings, seed: int,
                     run_settings: Mapping | None = None) -> list[dict] | None:
        """The check's own verdict rows (verdict.csv's columns) from its decisive rows, for a
        check with a rule of its own; None: the similarity rule of sanity_cli.verdict."""
        return None

    def draw(self, run_dir: Path, verdicts: pd.DataFrame) -> list[Path]:
        """Figures of the check's own for the report (run_dir/figures); none by default."""
        return []


def unknown_check(name: str, names) -> SanityError:
    return SanityError(f"unknown test '{name}'; choose one of: {', '.join(names)}")
