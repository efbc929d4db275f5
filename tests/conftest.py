"""Shared fixtures: configs composed with Hydra's compose API, isolated caches, offline hub."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sanity_cli.cli import config_dir

# Nothing is fetched in tests: the hub answers at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SANITY_PROGRESS", "0")
# With pytest-xdist every worker has a core of its own: one torch thread in it and in the
# runs it starts, instead of each asking for every core and waiting on the others'.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# One randomization draw: these runs check what a run does, and the default's three draws triple their time
TINY = ["n_images=4", "train.epochs=1", "device=cpu", "++test.seeds=1"]
# A TINY run that draws little: one method and one example image (one grid per colour scheme)
QUICK = [*TINY, "method=[gradient]", "n_examples=1"]


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """Each test leaves the logging set-up as it found it. A run in-process (Hydra's job
    logging, the verbs' stderr handler) adds handlers bound to the test's captured streams,
    which are closed by the next test: a later log line would then fail to write."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in ("sanity_cli", "huggingface_hub"))]
    kept = [(logger, {id(h) for h in logger.handlers}, logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, handlers, level, propagate in kept:
        for handler in logger.handlers[:]:  # pytest's own capturing handlers come and go by themselves
            if id(handler) not in handlers and not type(handler).__module__.startswith("_pytest"):
                logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """A model cache and data directory of the test's own."""
    monkeypatch.setenv("SANITY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SANITY_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


@pytest.fixture(scope="session")
def _tiny_models(tmp_path_factory) -> Path:
    """A model cache holding the CNN and the MLP that TINY runs train (seed 0), trained
    once per test process: training them is most of a small command-line run."""
    from sanity_cli.pipeline import prepare

    cache = tmp_path_factory.mktemp("tiny_models")
    for model in ("cnn", "mlp"):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*TINY, f"model={model}", f"cache_dir={cache}",
                                                           f"data_dir={cache.parent / 'tiny_data'}"])
        prepare(cfg, torch.device("cpu"))
    return cache


@pytest.fixture
def warm(isolated, _tiny_models) -> Path:
    """`isolated`, with TINY's trained CNN and MLP already in its model cache: for tests of
    what a run does with its model, not of training it."""
    shutil.copytree(_tiny_models, isolated / "cache")
    return isolated


@pytest.fixture
def make_cfg():
    """compose(overrides) -> the DictConfig that `sanity run OVERRIDES` would get."""

    def make(overrides: list[str] = ()):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return make


def sanity(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed `sanity` command as a user would."""
    command = [sys.executable, "-m", "sanity_cli.cli", *args]
    return subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
