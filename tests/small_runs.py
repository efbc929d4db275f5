"""Small end-to-end runs, read back only from the files they write.

Every run goes through `pipeline.run(cfg, run_dir)` with a config composed as `sanity run`
composes it (the `make_cfg` fixture), on the digits resized to 12x12 with a CNN trained
for one epoch on the CPU. Runs are deterministic, so a run with the same overrides is
done once per test session and shared by the test files that check different things
of it; the models they train share one cache.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from sanity_cli import figures, pipeline, training
from sanity_cli.errors import SanityError
from sanity_cli.runfiles import read_maps

SIZE = 12  # the smallest digits on which the CNN keeps its four blocks and SSIM its window
BASE = ("device=cpu", f"dataset.image_size={SIZE}", "train.epochs=1", "n_images=8", "n_examples=8",
        "method=[gradient]", "metrics.names=[spearman_abs,spearman,ssim]")
CNN_BLOCKS = ["fc2", "fc1", "conv2", "conv1"]  # the cascade's order, from the logits down

_DONE: dict[tuple[str, tuple[str, ...]], Run] = {}
_NUMBER = itertools.count()


@dataclass
class Run:
    """What one run wrote: results.csv, summary.csv, states.csv, run.json, maps.npz
    (as float32 (E, C, H, W) arrays by (seed, step, method)); its warnings, and how
    many models it trained."""

    dir: Path
    results: pd.DataFrame
    summary: pd.DataFrame
    states: pd.DataFrame
    info: dict
    examples: dict[tuple[int, int, str], np.ndarray]
    images: np.ndarray  # (E, C, H, W) the example images in [0, 1]
    image_ids: list[int]  # (E,) the example images' indices into the test split
    warnings: list[str] = field(default_factory=list)
    trainings: int = 0  # models the run trained (calls of training.fit), not loaded from the cache

    def maps(self, method: str, step: int, seed: int | None = None) -> np.ndarray:
        """The kept maps (E, C, H, W) of `method` in one state (the only seed when None)."""
        return self.examples[(self._seed(seed), step, method)]

    def column(self, column: str, step: int, *, method: str | None = None, metric: str | None = None,
               seed: int | None = None) -> np.ndarray:
        """One column of one state's rows (of the first method and metric unless named),
        in the order of the example images: (E,)."""
        rows = self.rows(step=step, seed=self._seed(seed))
        rows = rows[rows["method"] == (method or rows["method"].iloc[0])]
        rows = rows[rows["metric"] == (metric or rows["metric"].iloc[0])].set_index("image")
        return rows.loc[self.image_ids, column].to_numpy()

    def _seed(self, seed: int | None) -> int:
        seeds = set(self.results["seed"])
        assert seed in seeds or (seed is None and len(seeds) == 1), f"say which seed: the run has {sorted(seeds)}"
        return int(seeds.pop()) if seed is None else seed

    def rows(self, **equal) -> pd.DataFrame:
        """results.csv rows whose columns equal the given values."""
        rows = self.results
        for column, value in equal.items():
            rows = rows[rows[column] == value]
        return rows


def read_run(run_dir: Path, warnings: list[str] | None = None, trainings: int = 0) -> Run:
    """A finished run's files as a `Run`."""
    examples = {}
    with np.load(run_dir / "maps.npz") as kept:
        meta = json.loads(str(kept["meta"][()]))
        for state in meta["states"]:
            for method in meta["methods"]:
                key = f"{state['key']}/{method}"
                if key in kept:
                    examples[(state["seed"], state["step"], method)] = read_maps(kept, key)
        images = kept["images"].astype(np.float32)
    return Run(run_dir, pd.read_csv(run_dir / "results.csv"), pd.read_csv(run_dir / "summary.csv"),
               pd.read_csv(run_dir / "states.csv"), json.loads((run_dir / "run.json").read_text()), examples,
               images, list(meta["image_ids"]), warnings or [], trainings)


@contextlib.contextmanager
def quickly():
    """What these runs skip: figures and report.html, drawn from the files checked here
    and tested on their own (test_figures.py, test_report.py), and the fsync of every
    write (durability is test_reliability.py's); and what they reuse: scikit-learn's
    digits, parsed once. Together they take most of a small run's time."""
    import sklearn.datasets

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(figures, "draw_all", lambda _: []))
        if hasattr(pipeline, "write_report"):
            stack.enter_context(mock.patch.object(pipeline, "write_report", lambda *_, **__: None))
        stack.enter_context(mock.patch("os.fsync", lambda _: None))
        stack.enter_context(mock.patch.object(sklearn.datasets, "load_digits",
                                              _digits_once(sklearn.datasets.load_digits)))
        yield


_DIGITS: dict = {}


def _digits_once(load):
    """scikit-learn's load_digits, parsed on the first call and copied after."""

    def digits(*args, **kwargs):
        assert not args and not kwargs, "the digits are read with their defaults"
        if "bunch" not in _DIGITS:
            _DIGITS["bunch"] = load()
        return copy.deepcopy(_DIGITS["bunch"])

    return digits


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Runs:
    """`runs(*overrides)` -> the `Run` of `sanity run BASE OVERRIDES`, done once per session.

    root: a directory shared by the session (its cache and run directories);
    base: the overrides every run starts from.
    """

    def __init__(self, root: Path, make_cfg, base: tuple[str, ...] = BASE):
        self.root, self.make_cfg, self.base = root, make_cfg, base

    def cfg(self, *overrides: str):
        """The composed config; one randomization draw (test.seeds=1) unless `overrides` name
        the seeds: these runs check what one draw does, and the default's three triple their time."""
        cfg = self.make_cfg(self.overrides(*overrides))
        if "seeds" in cfg.test and not any(item.split("=", 1)[0].endswith("test.seeds") for item in overrides):
            cfg.test.seeds = 1
        return cfg

    def overrides(self, *overrides: str) -> list[str]:
        """The base's, the cache's and `overrides`, the last value of each key kept;
        an option of a group in `overrides` drops the base's settings of that group."""
        keys = [item.split("=", 1)[0] for item in overrides]
        base = [item for item in self.base if item.split(".", 1)[0] not in keys]
        every = [*base, f"cache_dir={self.root / 'cache'}", f"data_dir={self.root / 'data'}", *overrides]
        return list({item.split("=", 1)[0]: item for item in every}.values())

    def __call__(self, *overrides: str) -> Run:
        key = (str(self.root), tuple(self.overrides(*overrides)))
        if key not in _DONE:
            _DONE[key] = self.fresh(*overrides)
        return _DONE[key]

    def fresh(self, *overrides: str) -> Run:
        """A new run, never shared."""
        run_dir = self.root / f"run{next(_NUMBER)}"
        cfg = self.cfg(*overrides)
        handler, fits = _Warnings(), []
        fit = training.fit

        def counted_fit(*args, **kwargs):
            fits.append(1)
            return fit(*args, **kwargs)

        logging.getLogger().addHandler(handler)
        try:
            with quickly(), mock.patch.object(training, "fit", counted_fit):
                pipeline.run(cfg, run_dir)
        finally:
            logging.getLogger().removeHandler(handler)
        return read_run(run_dir, handler.lines, len(fits))

    def error(self, *overrides: str) -> str:
        """The one-line message of the SanityError that the run stops with."""
        try:
            self.fresh(*overrides)
        except SanityError as error:
            message = str(error)
            assert "\n" not in message, message
            return message
        raise AssertionError(f"no error for {overrides}")


def trained_checkpoint(runs: Runs) -> Path:
    """A CNN trained once per session on the runs' digits, saved as a state_dict, so that
    runs given `model.checkpoint=` it explain a model the tests hold as well."""
    path = runs.root / "trained.pt"
    if not path.exists():
        from sanity_cli.data import load_dataset
        from sanity_cli.models import build_model, input_spec
        from sanity_cli.training import fit

        cfg = runs.cfg()
        spec = input_spec(cfg.model, 1, SIZE)
        data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, n_images=cfg.n_images,
                            image_size=SIZE)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data.num_classes, spec)
        fit(model, spec.normalize(data.train_x), data.train_y, cfg.train, cfg.seed, torch.device("cpu"))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path


def load_checkpoint(runs: Runs, path: Path) -> torch.nn.Module:
    """The model of `path` as a run with `model.checkpoint=path` builds it, in eval mode."""
    from sanity_cli.models import build_model, input_spec

    cfg = runs.cfg(f"model.checkpoint={path}")
    return build_model(cfg.model, 10, input_spec(cfg.model, 1, SIZE)).eval()


# --- a user's own model and method, importable as small_runs.NAME by `_target_` -----------


class BatchNormNet(torch.nn.Module):
    """A small CNN with batch norm: conv 3x3, batch norm, ReLU, 2x2 average pool, linear.
    Its input channels are found on the first call, so any `model.channels` fits."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.LazyConv2d(width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2))
        self.head = torch.nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def WideBatchNormNet(num_classes: int = 10) -> BatchNormNet:  # noqa: N802 - a class-like factory
    """BatchNormNet with twice the channels."""
    return BatchNormNet(num_classes, width=16)


def GreyBatchNormNet(num_classes: int = 10) -> BatchNormNet:  # noqa: N802 - a class-like factory
    """BatchNormNet for one input channel, built (not lazy), so that a checkpoint loads into it."""
    model = BatchNormNet(num_classes)
    model(torch.zeros(1, 1, 12, 12))
    return model


def input_map(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A method that ignores the model: the input itself. (B, C, H, W) -> (B, C, H, W)."""
    return x.detach().clone()


def squared_input_map(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The input squared. (B, C, H, W) -> (B, C, H, W)."""
    return x.detach() ** 2


def image_folder(path: Path, seed: int) -> Path:
    """Two classes of three seeded 12x12 grey PNG images each, as class sub-folders."""
    from PIL import Image

    generator = np.random.default_rng(seed)
    for label in ("circle", "square"):
        (path / label).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            pixels = generator.integers(0, 256, size=(12, 12), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(path / label / f"{i}.png")
    return path


CHROMIUM = "/usr/bin/chromium"


def chromium_or_skip() -> str:
    """The system Chromium; the test skips, saying why, without one (a test never installs
    anything: .ci/run does)."""
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (.ci/run installs it; or: apt-get install chromium)")
    return found


@contextlib.contextmanager
def page_in_browser(page: Path, width: int):
    """`page` (an HTML file) opened in headless Chromium at `width` pixels, as (view, requests):
    the Playwright page, and every URL it asked for. Skips, saying why, without Chromium or
    Playwright."""
    found = chromium_or_skip()
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra: pip install playwright")
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=found, args=["--no-sandbox"])
        try:
            view = browser.new_page(viewport={"width": width, "height": 900})
            view.on("request", lambda request: requests.append(request.url))
            view.goto(page.as_uri(), wait_until="load")
            yield view, requests
        finally:
            browser.close()
