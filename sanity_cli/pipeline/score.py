"""The scores of one chunk of a state: its maps against those of the state it is compared
with, by the run's metrics (results.csv) and under every normalization (robustness.csv)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from sanity_cli import checks
from sanity_cli.checks.base import Compare
from sanity_cli.metrics import NORMALIZATIONS, Variant, compare, compare_variants
from sanity_cli.robustness import ROBUSTNESS_VARIANTS, robustness_table
from sanity_cli.runstore import state_rows
from sanity_cli.settings import Settings

if TYPE_CHECKING:
    from sanity_cli.pipeline.loop import Chunk, Run, SeedPass


def score_chunk(run: Run, sweep: SeedPass, condition: checks.Condition, chunk: Chunk) -> None:
    """Score one chunk's maps against those of the state it is compared with, and store its rows
    (results.csv; robustness.csv: the same pairs under every normalization)."""
    step, block, options = condition.state.step, condition.state.block, run.plan.compare
    with run.clock("compare"):
        base = chunk.maps if step == condition.compare_with else sweep.reference.get(chunk.index, run.plan.device,
                                                                                      condition.compare_with)
        # a known map (Condition.truth) has one channel and stands for each of a map's channels
        base = {name: base[name].expand_as(value) for name, value in chunk.maps.items()}
        computed = {name: state_scores(base[name], value, options)
                    for name, value in chunk.maps.items()} if run.check.compares_maps else {}
        variants = {name: robustness_table(value) for name, value in computed.items()}
        compare_fn = lambda a, b, **overrides: compare(a, b, **{**options, **overrides})  # noqa: E731
        scores = {name: {**run.check.score(base[name], value, _reusing(compare_fn, options, base[name], value,
                                                                        computed.get(name, {})), run.settings.test),
                         **chunk.measured}
                  for name, value in chunk.maps.items()}
    context = _row_context(run.settings, sweep.seed)
    image_ids, labels = run.prepared.image_ids[chunk.part], run.prepared.labels[chunk.part]
    rows = state_rows(context, step, block, scores, image_ids, labels, chunk.targets)
    robust = [row for scheme in NORMALIZATIONS
              for row in state_rows({**context, "normalization": scheme}, step, block,
                                    {name: value[scheme] for name, value in variants.items()},
                                    image_ids, labels, chunk.targets)]
    run.store.add_rows(rows, robust)


def _row_context(settings: Settings, seed: int) -> dict:
    """The columns that every row of a seed's states shares."""
    return {"test": settings.test.name, "model": settings.model.name, "dataset": settings.dataset.name, "seed": seed,
            "init": settings.test.get("init", ""), "reset_bn_stats": settings.test.get("reset_bn_stats", ""),
            "normalization": settings.metrics.normalization}


def state_scores(reference: Tensor, maps: Tensor, options: dict) -> dict[Variant, Tensor]:
    """The scores of (reference, maps) that a state's rows need, in one compare_variants call (so
    one sort of each map with and without absolute value, one SSIM, one HOG): robustness.csv's
    variants and the run's metrics under its normalization. `options`: compare()'s keywords."""
    own = {key: value for key, value in options.items() if key not in ("metrics", "normalization")}
    wanted = [*ROBUSTNESS_VARIANTS, *((metric, options["normalization"]) for metric in options["metrics"])]
    return compare_variants(reference, maps, wanted, **own)


def _reusing(compare_fn: Compare, options: dict, reference: Tensor, maps: Tensor,
             computed: dict[Variant, Tensor]) -> Compare:
    """compare_fn, but the scores of (reference, maps) under the run's normalization that
    state_scores has already computed (the same numbers) are taken from `computed` rather than
    computed again; every other call goes to compare_fn. `options`: compare_fn's own keyword
    arguments (metric_options)."""
    normalization = options["normalization"]
    known = {metric: scores for (metric, scheme), scores in computed.items() if scheme == normalization}

    def compare_again(a: Tensor, b: Tensor, **overrides) -> dict[str, Tensor]:
        names = list(overrides.pop("metrics", options["metrics"]))
        if a is not reference or b is not maps or overrides:
            return compare_fn(a, b, metrics=names, **overrides)
        rest = [name for name in names if name not in known]
        computed_now = compare_fn(a, b, metrics=rest) if rest else {}
        return {name: known[name] if name in known else computed_now[name] for name in names}
    return compare_again
