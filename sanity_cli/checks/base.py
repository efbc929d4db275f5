"""What every check declares: the conditions it explains, how it makes and scores
maps where that differs from the default, the state that decides its verdict, the
preconditions under which that verdict means something, and how the rest speaks of it:
which way its own metric moves with a change, which model each step explains, how its
figures are drawn and labelled, what a fail means on the card.

A check is a `Check` subclass in a module of its own, registered by name in
`sanity_cli.checks`. The pipeline runs any check through this interface and never
names one; the verdict, the summary, the figures and the card ask it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from scipy import stats
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
    inputs: (display, ids) -> the images explained here, from the run's images (B, C, H, W)
    in [0, 1] (e.g. with an artifact planted); None keeps them.
    truth: (display, ids) -> a known map (B, 1, H, W) that stands for every method's map in
    this state instead of explaining (a ground truth to compare with); None explains.
    compare_with: the step whose maps this state's are scored against (an earlier one).
    kept: later states compare with this one's maps, so a resumed run makes them again.
    transform: (maps, images, ids) -> (the maps scored here, {metric: (B,)} scores of the state
    added to every method's rows), for a check that measures each map rather than compares
    two models' (test=manifold); None keeps the maps as they are.
    explain: False takes step 0's maps (as its transform left them) instead of explaining
    the same model again.
    """

    state: State
    model: nn.Module
    retarget: Callable[[Tensor, Tensor], Tensor] | None = None
    inputs: Callable[[Tensor, Tensor], Tensor] | None = None
    truth: Callable[[Tensor, Tensor], Tensor] | None = None
    compare_with: int = 0
    kept: bool = False
    transform: Callable[[dict[str, Tensor], Tensor, Tensor], tuple[dict[str, Tensor], dict[str, Tensor]]] | None = None
    explain: bool = True


@dataclass(frozen=True)
class ModelNeed:
    """A model a check needs beside the trained one: the same architecture and training,
    on training images changed by `change` (images (N, C, H, W) in [0, 1] at the model's
    input size, labels (N,), seed) -> images. `key` says how they differ (for the cache
    key: every setting that `change` reads)."""

    name: str
    key: Mapping
    change: Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class Subject:
    """What a check works on: its settings, the models, and the blocks to randomize.

    models: "trained", "shuffled" for a check that needs a model trained on shuffled labels,
    and the name of each of `Check.models_needed`.
    blocks: the trained model's blocks in forward order (empty unless the check randomizes the model).
    """

    settings: Mapping  # the `test` config, read-only (attribute access and .get)
    models: Mapping[str, nn.Module]
    num_outputs: int
    blocks: list[str] = field(default_factory=list)
    trained: TrainedWeights | None = None


@dataclass(frozen=True)
class Evidence:
    """What a finished run tells about the conditions its verdicts rest on (read from its files).

    settings: run.json's settings (the check's own under "test"); models: run.json's
    models, name -> {train_accuracy, test_accuracy, source, outputs}; states: states.csv
    (None when absent); images: how many images were explained; level: the verdict's
    confidence level, also used for the tests of the preconditions.
    """

    settings: Mapping = field(default_factory=dict)
    models: Mapping[str, Mapping] = field(default_factory=dict)
    states: pd.DataFrame | None = None
    images: int | None = None
    level: float = 0.95


@dataclass(frozen=True)
class Precondition:
    """One condition a verdict rests on, and whether the run met it.

    holds: True, False, or None when the run holds nothing to check it by (no labels,
    a run from before it was recorded); only False invalidates. reason: one line saying
    what failed and how to fix it. methods: the methods it concerns (None: all).
    """

    name: str
    holds: bool | None
    reason: str = ""
    methods: frozenset[str] | None = None

    def concerns(self, method: str) -> bool:
        return self.methods is None or method in self.methods


class Check:
    """The default behaviour: explain each condition with the run's methods, compare
    every state's maps with step 0's by the run's metrics, decide on the last state."""

    name: str = ""
    randomizes_model = False       # its states re-initialize blocks of the trained model
    needs_shuffled_model = False   # it compares with a model trained on shuffled labels
    targets: tuple[str, ...] | None = None  # the `target` settings it supports (None: all)
    verdict_metric: str | None = None  # a metric of its own decides (None: the run's choice)
    # its verdict metric rises with the change (judged against verdict.rise_threshold); for
    # similarities a change lowers the score (verdict.threshold)
    higher_means_change = False
    own_metrics: tuple[str, ...] = ()  # scores of its own beside the run's metrics that verdict.metric may name
    compares_maps = True           # scores compare two maps (robustness.csv re-scores them per normalization)
    # the model each of these steps explains, by name (summary.csv's accuracy columns)
    step_models: Mapping[int, str] = {0: "trained"}
    # how its figures show it: a check that compares two maps once (two models, two classes) is
    # drawn as bars with this y-axis label, None draws curves over its states
    pair_label: str | None = None
    unbounded_metrics: tuple[str, ...] = ()  # its scores that are not similarities at most 1 (free y-axis)
    verdict_label = "similarity to the trained model's map"  # the y-axis of its verdict figure
    # a rule of its own (`judge`) says its outcomes in words of its own: what each means for
    # whether the method can be trusted, as pass (what a trustworthy method does) or fail
    meanings: Mapping[str, str] = {}

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        raise NotImplementedError

    def models_needed(self, settings: Mapping) -> list[ModelNeed]:
        """The models to train beside the trained one (`settings`: the `test` config);
        the pipeline trains and caches each and names it in `Subject.models`."""
        return []

    def shuffled_training(self, settings: Mapping, train):
        """How the model trained on shuffled labels is trained (`settings`: the `test` config;
        `train`: the run's `settings.TrainSettings`): (its training settings, how many of the
        first training images it sees, None: all). By default as the trained model."""
        return train, None

    def extra_models(self, settings, dataset, spec, device) -> dict[str, TrainedModel]:
        """Other models the check builds itself (not classifiers: e.g. a generative model of
        the data), trained (and cached) or loaded before any work, by name; they join
        `Subject.models`. `settings`: the run's `sanity_cli.settings.Settings`. None by default."""
        return {}

    def judge(self, decisive: pd.DataFrame, settings, seed: int, run: Mapping) -> list[dict] | None:
        """Verdict rows of this check's decisive rows (judging.COLUMNS; is_control and
        holds_in are filled in after, and the general note is added to `note`); None applies
        the similarity rule. `settings`: the VerdictSettings; `run`: the run's settings
        (run.json), with `controls`, the run's control methods."""
        return None

    def figures(self, run_dir: Path, verdicts: pd.DataFrame) -> list[Path]:
        """Figures of this check's own for the report, drawn into run_dir/figures from the
        run's files and its verdicts (this check's rows); their PNG paths. None by default."""
        return []

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

    def axis_label(self, order: str) -> str:
        """The x-axis of this check's curves, for `test.order` (top_down or bottom_up)."""
        return "state"

    # What a method's fail says (the card: "under CHECK, ..."); '' when the check says nothing
    # of its own (the card's generic words). A check whose words depend on `test.order`
    # overrides fail_meaning instead.
    fails_mean: str = ""
    # What a method's pass says, for a positive test (one that asks the map to find something
    # known); '' for a check that randomizes, whose pass shows only that the map changed.
    passes_mean: str = ""

    def fail_meaning(self, order: str) -> str:
        """What a method's fail says, for `test.order` (by default `fails_mean`)."""
        return self.fails_mean

    def pass_meaning(self, order: str) -> str:
        """What a method's pass says, for `test.order` (by default `passes_mean`)."""
        return self.passes_mean

    def card_aside(self, order: str) -> str:
        """What the card's list of checks adds about this check run in `test.order`; ''."""
        return ""

    def preconditions(self, evidence: Evidence) -> list[Precondition]:
        """The conditions under which this check's verdicts mean something, evaluated on a
        finished run. By default: the explained model is trained, not random weights, and
        classifies the explained images better than chance. A check adds its own by
        extending the list (`super().preconditions(evidence) + [...]`)."""
        return [trained_model(evidence), above_chance(evidence)]


def trained_model(evidence: Evidence, name: str = "trained") -> Precondition:
    """The model is not random weights (`model.pretrained=false` on a model not trained here)."""
    source = (evidence.models.get(name) or {}).get("source")
    if source is None:
        return Precondition("trained model", None)
    return Precondition("trained model", source != "random",
                        "the model has random weights (model.pretrained=false): its maps say nothing about a trained "
                        "model; load trained weights (model.pretrained=true or model.checkpoint=PATH)")


def above_chance(evidence: Evidence, name: str = "trained") -> Precondition:
    """The model's accuracy on the explained images is above chance (1 / classes) by a margin:
    a one-sided binomial test at the verdict's level. Unchecked without labels.
    states.csv's step 0 holds that accuracy."""
    outputs = (evidence.models.get(name) or {}).get("outputs")
    states, n = evidence.states, evidence.images
    if not outputs or states is None or states.empty or not n or outputs < 2:
        return Precondition("accuracy above chance", None)
    first = states[states["step"] == 0]
    accuracy = float(first["accuracy"].iloc[0]) if len(first) else math.nan
    if not math.isfinite(accuracy):
        return Precondition("accuracy above chance", None)
    hits = round(accuracy * n)
    chance = 1.0 / outputs
    p_value = stats.binomtest(hits, n, chance, alternative="greater").pvalue
    return Precondition("accuracy above chance", bool(p_value < 1 - evidence.level),
                        f"the model classifies {hits} of the {n} explained images right ({accuracy:.2f}), not above "
                        f"chance ({chance:.2f}) at the {evidence.level:.0%} level: its maps explain a model that has "
                        "not learnt the task; train it longer (train.epochs) or load trained weights")


def unknown_check(name: str, names) -> SanityError:
    return SanityError(f"unknown test '{name}'; choose one of: {', '.join(names)}")
