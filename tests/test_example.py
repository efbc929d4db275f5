"""examples/ end to end, as its README runs it: make the checkpoint, then check the
example model with built-in, Captum, zennit and the example's own methods."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import sanity

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def example_env() -> dict:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, example_env) -> Path:
    path = tmp_path_factory.mktemp("example") / "tiny_net.pt"
    made = subprocess.run([sys.executable, str(EXAMPLES / "make_checkpoint.py"), str(path), "--epochs", "1"],
                          env={**os.environ, **example_env}, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    accuracy = float(made.stdout.split("test accuracy ")[1].split()[0])
    assert 0.5 < accuracy <= 1.0  # one epoch on the digits learns most of them
    return path


def test_the_example_model_checked_with_plugged_methods(isolated, checkpoint, example_env):
    run_dir = isolated / "run"
    done = sanity("run", "model=custom", "model._target_=tiny_net.TinyNet", f"model.checkpoint={checkpoint}",
                  "model.name=tiny_net", "method=[gradient,callable,captum,lrp]",
                  "method.callable._target_=my_methods.saliency", "method.captum.attribution=DeepLift",
                  "+method.input_only={method: callable, _target_: my_methods.input_only}",
                  "+method.gbp={method: captum, attribution: GuidedBackprop}",
                  "n_images=4", "device=cpu", "metrics.names=[spearman_abs,ssim]", f"hydra.run.dir={run_dir}",
                  cwd=isolated, env=example_env)
    assert done.returncode == 0, done.stderr
    results = pd.read_csv(run_dir / "results.csv")
    assert set(results["method"]) == {"gradient", "callable", "captum", "lrp", "input_only", "gbp"}
    assert list(results.drop_duplicates("step")["block"]) == ["original", "fc", "conv2", "conv1"]
    by_method = results.set_index(["method", "step", "image", "metric"])["value"]
    # The example's saliency is the gradient: the same score for every image, state and metric.
    assert (by_method["callable"] - by_method["gradient"]).abs().max() < 1e-6
    # A "method" that ignores the model cannot change: the check shows it (1.0 in every state).
    assert (by_method["input_only"] == 1.0).all()
    abs_rank = results[results["metric"] == "spearman_abs"].groupby(["method", "step"])["value"].mean()
    assert abs_rank["gradient", 3] < 0.8  # the gradient of the fully random model is another map


def test_a_torchscript_model_and_bad_plug_ins_from_the_command_line(isolated, checkpoint, example_env):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from tiny_net import TinyNet
    finally:
        sys.path.remove(str(EXAMPLES))
    model = TinyNet().eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    scripted = isolated / "tiny_net_script.pt"
    torch.jit.save(torch.jit.script(model), str(scripted))
    common = ("model=custom", "n_images=4", "n_examples=1", "device=cpu", "metrics.names=[spearman_abs]")
    done = sanity("run", *common, f"model.checkpoint={scripted}", "test=random_logit", "method=[gradient,callable]",
                  "method.callable._target_=my_methods.saliency", f"hydra.run.dir={isolated / 'script'}",
                  cwd=isolated, env=example_env)
    assert done.returncode == 0, done.stderr
    results = pd.read_csv(isolated / "script" / "results.csv").set_index(["method", "step", "image"])["value"]
    assert (results["callable"] - results["gradient"]).abs().max() < 1e-6
    refusals = {
        (f"model.checkpoint={scripted}", "test=cascade"): "test=cascade needs hooks on the model's modules, which a "
                                               "TorchScript model does not take",
        ("model._target_=tiny_nett.TinyNet", "method=[gradient]"): "model._target_ 'tiny_nett.TinyNet': no "
                                                                        "module named 'tiny_nett'",
    }
    for overrides, expected in refusals.items():
        failed = sanity("run", *common, *overrides, f"hydra.run.dir={isolated / 'refused'}", cwd=isolated,
                        env=example_env)
        assert failed.returncode == 2, failed.stderr
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("sanity: error: ") and expected in last, failed.stderr
