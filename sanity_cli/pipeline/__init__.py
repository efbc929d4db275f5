"""One experiment, top to bottom: data, model, conditions to explain, maps, scores, results.

`run(settings, run_dir)` is the whole run as a plain function; the CLI is a thin Hydra
wrapper around it and tests call it directly with composed configs. The flow:

    settings  (sanity_cli.settings: the config, checked and typed once)
    prepare   data and models (prepare.py)
    plan      the facts worked out once before any work: RunPlan (plan.py)
    loop      each seed's states: explain_chunk, score_chunk (score.py), stored as they finish (loop.py)
    finish    summary, figures, verdicts and report (finish.py)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from sanity_cli import checks
from sanity_cli.pipeline.finish import RunResult, examples_meta, finish, undefined_hint
from sanity_cli.pipeline.loop import Clock, Run, run_states
from sanity_cli.pipeline.plan import (
    RunPlan,
    check_model_fit,
    make_plan,
    method_options,
    metric_options,
    resolve_device,
    run_device,
    seeds_of,
    selected_methods,
)
from sanity_cli.pipeline.prepare import Prepared
from sanity_cli.pipeline.prepare import prepare as _prepare
from sanity_cli.pipeline.reference import image_chunks
from sanity_cli.randomization import TrainedWeights
from sanity_cli.report import write_report
from sanity_cli.runstore import RunStore, settings_for_fingerprint
from sanity_cli.settings import Settings, as_settings
from sanity_cli.verdict import write_verdicts

log = logging.getLogger(__name__)

__all__ = ["Prepared", "RunPlan", "RunResult", "check_model_fit", "execute", "finish", "image_chunks", "make_plan",
           "method_options", "metric_options", "prepare", "resolve_device", "run", "run_device", "seeds_of",
           "selected_methods", "undefined_hint"]


def run(settings: Settings | DictConfig, run_dir: str | Path) -> RunResult:
    """Run the check that `settings` describe and write its results into `run_dir`; a composed
    config is checked and read into Settings first."""
    started = time.perf_counter()
    settings = as_settings(settings)
    device = run_device(settings)
    with RunStore(Path(run_dir), settings_for_fingerprint(settings.config, device), resume=settings.resume) as store, \
            store.recording_warnings():
        torch.manual_seed(settings.seed)
        prepared = prepare(settings, device)
        return execute(settings, prepared, store, started, prepared_s=time.perf_counter() - started)


def prepare(settings: Settings | DictConfig, device: torch.device) -> Prepared:
    """Load the data, then build, train or load the model(s), and pick the test images."""
    return _prepare(as_settings(settings), device)


def execute(settings: Settings | DictConfig, prepared: Prepared, store: RunStore, started: float | None = None,
            prepared_s: float | None = None) -> RunResult:
    """The check that `settings.test` names, on prepared models and images, into `store`.
    prepared_s: the seconds that loading the data and training (or loading) the models took."""
    with store.recording_warnings():
        return _execute(as_settings(settings), prepared, store, started, prepared_s)


def _execute(settings: Settings, prepared: Prepared, store: RunStore, started: float | None,
             prepared_s: float | None) -> RunResult:
    started = time.perf_counter() if started is None else started
    check = checks.get(settings.test.name)
    plan = make_plan(settings, check, prepared)
    model = prepared.models["trained"].model
    trained = TrainedWeights(model)
    subject = checks.Subject(settings.test, {name: m.model for name, m in prepared.models.items()},
                             prepared.num_outputs, list(plan.blocks), trained)
    check.check_fit(subject)
    if plan.hog_left_out:
        log.info("hog left out: the %dx%d maps are smaller than one HOG block (%d pixels); lower "
                 "metrics.hog.pixels_per_cell to compute it", *prepared.images.shape[-2:], settings.metrics.hog.block)
    store.record_models({name: (m.train_accuracy, m.test_accuracy) for name, m in prepared.models.items()},
                        {name: {"source": m.source, "outputs": prepared.num_outputs}
                         for name, m in prepared.models.items()})
    store.record_states_expected(check.n_states(subject) * len(plan.seeds))
    clock = Clock(plan.device, {"data and models": prepared_s} if prepared_s is not None else {})
    clock.seconds.update({"explain": 0.0, "compare": 0.0})
    run_states(Run(settings, plan, check, prepared, store, clock), subject, trained)
    trained.check(model)
    timing = {**clock.seconds, "total": time.perf_counter() - started}
    store.record_timing(timing)
    store.write_examples(prepared.display[: settings.n_examples], examples_meta(settings, plan, prepared))
    log.info("time: %.1fs in all, %.1fs explaining, %.1fs comparing", timing["total"], timing["explain"],
             timing["compare"])
    result = finish(store.run_dir, timing)
    store.record_warnings()
    result.verdict = write_verdicts(store.run_dir)
    result.report = write_report(store.run_dir)
    return result
