"""The `sanity` command end to end, through a subprocess, on tiny configurations."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import QUICK, TINY, sanity
from sanity_cli import cli

COLUMNS = {"test", "model", "dataset", "method", "step", "block", "image", "metric", "value"}


def test_run_writes_results_summary_and_figure(isolated):
    """The default run (TINY), then one more that finds its model in the cache."""
    run_dir = isolated / "run"
    done = sanity("run", *TINY, "n_examples=1", f"hydra.run.dir={run_dir}", cwd=isolated)
    assert done.returncode == 0, done.stderr
    results = pd.read_csv(run_dir / "results.csv")
    assert COLUMNS <= set(results.columns)
    # 4 images x 10 methods of the paper's set x 3 metrics (HOG is left out of 28x28 maps, smaller than
    # one HOG block) x (trained + 4 blocks of the CNN)
    assert len(results) == 4 * 10 * 3 * 5 and "hog" not in set(results["metric"])
    assert results["method"].nunique() == 10
    assert list(results.drop_duplicates("step")["block"]) == ["original", "fc2", "fc1", "conv2", "conv1"]
    reference = results[results["step"] == 0]
    assert (reference.loc[reference["metric"] != "hog", "value"] == 1.0).all()
    assert reference.loc[reference["metric"] == "hog", "value"].isna().all()  # 28x28 maps hold no HOG block
    summary = pd.read_csv(run_dir / "summary.csv")
    assert {"method", "step", "block", "metric", "mean", "std", "n"} <= set(summary.columns)
    assert ((summary["n"] + summary["n_nan"]) == 4).all()
    assert (run_dir / "figures" / "cascade_curves.png").stat().st_size > 10_000
    # figures redraw from the run directory alone
    for figure in (run_dir / "figures").iterdir():
        figure.unlink()
    assert cli.main(["figures", str(run_dir)]) == 0
    redrawn = {p.name for p in (run_dir / "figures").glob("*.png")}
    assert {"cascade_curves.png", "cascade_grid_abs_0.png", "cascade_grid_diverging_0.png", "methods.png"} <= redrawn
    # the second run loads the model from the cache instead of training it
    again = sanity("run", *QUICK, f"hydra.run.dir={isolated / 'again'}", cwd=isolated)
    assert again.returncode == 0, again.stderr
    assert "loaded cached model" in again.stdout + again.stderr
    assert "training cnn" not in again.stdout + again.stderr


def test_multirun_sweeps_and_hydra_flags(warm):
    sweep = warm / "sweep"
    done = sanity("run", "-m", *QUICK, "model=mlp", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=warm)
    assert done.returncode == 0, done.stderr
    seeds = {int(pd.read_csv(sweep / job / "results.csv")["seed"].iloc[0]) for job in ("0", "1")}
    assert seeds == {0, 1}
    shown = sanity("run", "--cfg", "job", "model=mlp", cwd=warm)
    assert shown.returncode == 0 and "kind: mlp" in shown.stdout
    helped = sanity("run", "--help", cwd=warm)
    assert helped.returncode == 0 and "sanity checks for saliency maps" in helped.stdout
    assert ("test: cascade, data, entropy, independent, manifold, random_logit, smooth_cascade, spurious"
            in helped.stdout)


@pytest.mark.parametrize("override, words", [
    ("model=resnet", "unknown model 'resnet'"),
    ("dataset=imagenet", "unknown dataset 'imagenet'"),
    ("method=[gradient,saliency]", "unknown method 'saliency'"),
    ("test=cascading", "unknown test 'cascading'"),
])
def test_unknown_names_fail_in_one_line(override, words, capsys):
    assert cli.main(["run", override]) == 2
    err = capsys.readouterr().err
    assert words in err and "choose one of" in err and len(err.strip().splitlines()) == 1


def test_bad_input_exits_2_without_traceback(isolated, capsys):
    """One real process (its stderr is all a user sees), the other cases in this one."""
    offline = sanity("run", *TINY, "model=timm", "dataset=samples", f"hydra.run.dir={isolated / 'r2'}", cwd=isolated)
    assert offline.returncode == 2
    assert "model.pretrained=false" in offline.stderr and "Traceback" not in offline.stderr
    assert len(offline.stderr.strip().splitlines()) == 1, offline.stderr
    for args, words in [(["model=timm", "dataset=imagefolder", f"dataset.path={isolated / 'nowhere'}",
                          f"hydra.run.dir={isolated / 'r1'}"], "does not exist"),
                        (["model=nope"], "unknown model")]:
        try:
            code = cli.main(["run", *TINY, *args])
        except SystemExit as stop:  # a job's error ends its process, here this one
            code = stop.code
        assert code == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, words", [
    (["n_image=3"], "unknown setting 'n_image'; did you mean n_images?"),
    (["seed=0,1"], "add -m"),
    (["experiment=fig6_data_fashion_cnn"], "+experiment=fig6_data_fashion_cnn"),
])
def test_composition_errors_fail_in_one_line(args, words, capsys):
    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_a_failing_job_does_not_stop_the_sweep(warm):
    sweep = warm / "sweep"
    done = sanity("run", "-m", *QUICK, "model=mlp", "method=[gradcam],[gradient]", f"hydra.sweep.dir={sweep}",
                  cwd=warm)
    assert done.returncode == 2
    assert "1 of the sweep's jobs failed" in done.stderr and "needs a convolutional layer" in done.stderr
    assert (sweep / "1" / "results.csv").is_file() and not (sweep / "0" / "results.csv").exists()


def test_figures_of_an_unfinished_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("test,model,dataset,method,seed,step,block,image,metric,value\n")
    assert cli.main(["figures", str(tmp_path)]) == 2
    assert "no finished state" in capsys.readouterr().err


def test_list_shows_every_group(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("cnn", "mlp", "timm", "inception_v3", "digits", "fashion_mnist", "imagefolder", "samples",
                 "gradient", "cascade"):
        assert name in out


def test_killed_run_resumes_to_the_same_results(warm):
    """SIGKILL after two states, as a crash or a cluster would, then resume=true."""
    import signal
    import subprocess
    import sys
    import time

    slow = [*QUICK, "n_images=4", "method=[integrated_gradients]", "method.integrated_gradients.steps=60",
            "metrics.names=[spearman_abs,spearman]"]
    whole = sanity("run", *slow, f"hydra.run.dir={warm / 'whole'}", cwd=warm)
    assert whole.returncode == 0, whole.stderr
    cut = warm / "cut"
    process = subprocess.Popen([sys.executable, "-m", "sanity_cli.cli", "run", *slow, f"hydra.run.dir={cut}"],
                               cwd=warm, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states, deadline = cut / "states.csv", time.monotonic() + 120
    while time.monotonic() < deadline and not (states.exists() and len(states.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(states.read_text().splitlines()) - 1
    assert 2 <= finished < 5, "the run was to be killed between its first states and its last"
    resumed = sanity("run", *slow, f"hydra.run.dir={cut}", "resume=true", cwd=warm)
    assert resumed.returncode == 0, resumed.stderr
    key = ["step", "method", "image", "metric"]
    read = lambda path: pd.read_csv(path).sort_values(key).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(read(cut / "results.csv"), read(warm / "whole" / "results.csv"))
