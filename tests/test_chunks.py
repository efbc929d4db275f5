"""A run takes its images `image_chunk` at a time: memory holds one chunk's maps, and
every number it writes is the one an unchunked run writes."""

from __future__ import annotations

import io
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from sanity_cli import pipeline
from sanity_cli.pipeline import explain as explaining
from sanity_cli.pipeline import image_chunks
from sanity_cli.pipeline import reference as reference_maps
from sanity_cli.runstore import RunStore
from small_runs import Runs, quickly

METHODS = "method=[gradient,integrated_gradients,smoothgrad,gradcam,random]"
QUICK_METHODS = ["method.integrated_gradients.steps=4", "method.smoothgrad.samples=3"]
KEY = ["seed", "step", "method", "image", "metric", "normalization"]


@pytest.fixture
def runs(make_cfg, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.getbasetemp() / "runs", make_cfg)


def test_chunks_cover_the_images_in_order():
    assert image_chunks(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert image_chunks(8, 8) == image_chunks(8, 100) == image_chunks(8, None) == [slice(0, 8)]


def sorted_rows(path) -> pd.DataFrame:
    return pd.read_csv(path).sort_values(KEY).reset_index(drop=True)


@pytest.mark.parametrize("test", [["test=cascade"], ["test=random_logit"], ["test=smooth_cascade", "test.samples=2"]],
                         ids=["cascade", "random_logit", "smooth_cascade"])
def test_a_run_in_chunks_writes_what_a_run_at_once_writes(runs, test):
    overrides = [*test, METHODS, *QUICK_METHODS]
    whole = runs(*overrides)
    sizes = []
    real = explaining.explain_all

    def counted(model, images, *args, **kwargs):
        sizes.append(len(images))
        return real(model, images, *args, **kwargs)

    with mock.patch.object(explaining, "explain_all", counted):
        chunked = runs.fresh(*overrides, "image_chunk=3")
    states = len(chunked.states)
    samples = 2 if "test=smooth_cascade" in test else 1  # noisy copies, each explained
    assert max(sizes) == 3 and sum(sizes) == 8 * samples * states, "every image once a state, 3 at most at once"
    for name in ("results.csv", "robustness.csv"):
        a, b = sorted_rows(whole.dir / name), sorted_rows(chunked.dir / name)
        pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
        # a batch of another size rounds the last float bit otherwise, and a rank correlation
        # may then swap a near tie (as max_batch does); nearly every value is unchanged
        np.testing.assert_allclose(b["value"], a["value"], rtol=0, atol=1e-3)
        same = np.isclose(b["value"], a["value"], rtol=0, atol=1e-6, equal_nan=True)
        assert same.mean() > 0.98, f"{(~same).sum()} of {len(same)} values moved"
    pd.testing.assert_frame_equal(chunked.states, whole.states)  # accuracy over all images, same weights
    pd.testing.assert_frame_equal(pd.read_csv(chunked.dir / "signal.csv"), pd.read_csv(whole.dir / "signal.csv"),
                                  rtol=0, atol=1e-3)  # means of rank correlations, as above
    assert chunked.examples.keys() == whole.examples.keys()
    for key, maps in whole.examples.items():
        assert maps.shape[0] == 8
        # kept in half precision: a last-bit difference of the float32 maps may round either way
        np.testing.assert_allclose(chunked.examples[key], maps, rtol=0, atol=1e-3 * np.abs(maps).max())
    assert not (chunked.dir / ".reference").exists(), "step 0's maps on disk are removed at the end"


def test_step_0_maps_wait_on_disk_between_chunks(runs):
    """With more than one chunk, the reference maps are written out and read back (named step_chunk)."""
    saved = []
    real = reference_maps.replace_atomically

    def recorded(path, data):
        if path.parent.name == ".reference":  # written whole, as every file of the run
            maps = torch.load(io.BytesIO(data), weights_only=True)
            saved.append((path.name, sorted(maps), {name: tuple(value.shape) for name, value in maps.items()}))
        return real(path, data)

    with mock.patch.object(reference_maps, "replace_atomically", recorded):
        runs.fresh("image_chunk=5", "method=[gradient,random]")
    assert saved == [("0_0.pt", ["gradient", "random"], {"gradient": (5, 1, 12, 12), "random": (5, 1, 12, 12)}),
                     ("0_1.pt", ["gradient", "random"], {"gradient": (3, 1, 12, 12), "random": (3, 1, 12, 12)})]


def test_a_run_cut_off_between_chunks_resumes_to_the_same_rows(runs, tmp_path):
    """Rows of a state whose chunks were not all scored are dropped, and the state redone."""
    overrides = ("image_chunk=3", "method=[gradient,random]")
    whole = runs(*overrides)
    written = []
    real = RunStore.add_rows

    def add_then_stop(self, *rows):
        real(self, *rows)
        written.append(1)
        if len(written) == 5:  # step 0's three chunks, then two of step 1's
            raise KeyboardInterrupt

    with quickly(), mock.patch.object(RunStore, "add_rows", add_then_stop), pytest.raises(KeyboardInterrupt):
        pipeline.run(runs.cfg(*overrides), tmp_path / "cut")
    assert pd.read_csv(tmp_path / "cut" / "states.csv")["step"].tolist() == [0]
    assert len(pd.read_csv(tmp_path / "cut" / "results.csv")) > len(whole.rows(step=0))  # step 1's first rows
    with quickly():
        pipeline.run(runs.cfg(*overrides, "resume=true"), tmp_path / "cut")
    resumed, expected = sorted_rows(tmp_path / "cut" / "results.csv"), sorted_rows(whole.dir / "results.csv")
    pd.testing.assert_frame_equal(resumed.drop(columns="value"), expected.drop(columns="value"))
    np.testing.assert_allclose(resumed["value"], expected["value"], rtol=0, atol=1e-6)
