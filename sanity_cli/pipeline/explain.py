"""The methods' side of a run: every selected method's maps of a chunk of images.

The two functions that call into `sanity_cli.methods` (`explain_methods`,
`preflight_methods`), and `logits_of`, are the pipeline's only contact with it. `Explainer` is what the
state loop asks for maps; whether it reuses the trained blocks' activations between
states (`reuse_activations`, `sanity_cli.reuse`) is its own business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

from torch import Tensor, nn

from sanity_cli.checks.base import Explain
from sanity_cli.methods import explain_all, preflight_all
from sanity_cli.methods.gradients import logits_of
from sanity_cli.reuse import ActivationReuse

if TYPE_CHECKING:
    from sanity_cli.pipeline.plan import RunPlan
    from sanity_cli.randomization import TrainedWeights
    from sanity_cli.settings import Settings

MiB = 2**20
__all__ = ["Explainer", "explain_methods", "explainer", "logits_of", "preflight_methods"]


def explain_methods(model: nn.Module, images: Tensor, targets: Tensor, methods: Mapping[str, dict], max_batch: int,
                    ids: Tensor, outside: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, Tensor]:
    """{key: (B, C, H, W) maps} of the (B, C, H, W) `images` for each of `methods` ({key: options},
    `RunPlan.method_options`), in their order; `ids` (B,) name the images (noise follows them).
    Plugged methods (Captum, zennit, a function) run inside `outside()`. MethodError (a SanityError) on a bad option."""
    return explain_all(model, images, targets, dict(methods), max_batch=max_batch, ids=ids, apart=outside)


def preflight_methods(model: nn.Module, methods: Mapping[str, dict], images: Tensor, original: Tensor) -> None:
    """Every method tried before any work (SanityError in one line for one that cannot run)."""
    preflight_all(model, dict(methods), images, original)


class Explainer:
    """The maps of one randomization seed's states, chunk by chunk.

    `state(model)` brackets the passes of one model state, `chunk(step, index, ids)` those
    of one image chunk and gives the `Explain` function (model, images, targets) -> maps.
    With `reuse` (an ActivationReuse) the trained blocks' activations recorded in step 0
    answer the passes of later states that leave those blocks trained.
    """

    def __init__(self, plan: RunPlan, seed: int, reuse: ActivationReuse | None = None):
        self.plan, self.seed, self.reuse = plan, seed, reuse

    def state(self, model: nn.Module) -> AbstractContextManager:
        return self.reuse.state(model) if self.reuse is not None else nullcontext()

    @contextmanager
    def chunk(self, step: int, index: int, ids: Tensor) -> Iterator[Explain]:
        methods = self.plan.method_options(self.seed, step)
        outside = self.reuse.paused if self.reuse is not None else nullcontext

        def explain(model: nn.Module, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
            return explain_methods(model, images, targets, methods, self.plan.max_batch, ids, outside)

        with self.reuse.chunk(index) if self.reuse is not None else nullcontext():
            yield explain

    def close(self) -> None:
        if self.reuse is not None:
            self.reuse.clear()


@contextmanager
def explainer(settings: Settings, plan: RunPlan, seed: int, model: nn.Module,
              trained: TrainedWeights) -> Iterator[Explainer]:
    """The Explainer of the states of `model` (its `trained` weights) under one randomization
    seed; with `reuse_activations` on, it keeps up to that many MiB of activations for reuse."""
    mib = settings.reuse_activations
    reuse = ActivationReuse(model, list(plan.blocks), trained.state, mib * MiB) if mib else None
    made = Explainer(plan, seed, reuse)
    try:
        yield made
    finally:
        made.close()
