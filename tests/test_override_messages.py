"""A misspelt setting is named with the known key it resembles, and a setting that cannot
mean anything (test.granularity=[]) is refused before any work, in one line."""

from __future__ import annotations

import pytest

from conftest import TINY
from sanity_cli import cli


@pytest.mark.parametrize("override, meant", [
    ("n_imags=4", "n_images"), ("+n_imags=4", "n_images"), ("train.epoch=1", "train.epochs"),
    ("metrics.ssim.sigm=2", "metrics.ssim.sigma"), ("metrics.sim.sigma=2", "metrics.ssim"),
    ("modle.name=cnn", "model"), ("test.granularty=layer", "test.granularity"),
])
def test_a_misspelt_setting_names_the_known_one(tmp_path, capsys, override, meant):
    """Hydra's own advice for `n_imags=4` was to add it with +, which the next run refuses."""
    assert cli.main(["run", *TINY, override, f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"did you mean {meant}?" in err and "+" not in err.split(";")[1], err
    assert not (tmp_path / "run").exists()


def test_a_setting_like_none_lists_those_there_are(capsys, tmp_path):
    assert cli.main(["run", *TINY, "train.qqq=3", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    assert "the settings under train are batch_size, epochs, lr, optimizer" in capsys.readouterr().err


@pytest.mark.parametrize("test", ["cascade", "independent"])
def test_an_empty_granularity_is_refused_before_any_work(isolated, capsys, test):
    run_dir = isolated / "run"
    assert cli.main(["run", *TINY, f"test={test}", "test.granularity=[]", f"hydra.run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("sanity: error: test.granularity=[] names no module to randomize; give block, layer, or a list "
                   "of the model's module names, e.g. test.granularity=[fc2,conv1]"), err
    assert not run_dir.exists() and not (isolated / "cache").exists()  # nothing trained
