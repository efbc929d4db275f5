"""check(): the pipeline from Python, on a model and images the caller already has."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from sanity_cli import check
from sanity_cli.errors import SanityError


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 12 * 12, 3)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def test_check_runs_the_cascade_on_a_given_model_and_restores_it(images):
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = check(model, images, ["gradient", "random"], "cascade", device="cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert result.run_dir is None  # nothing kept on disk without run_dir
    rows = result.results
    assert set(rows["method"]) == {"gradient", "random"}
    # The top-level Sequential children with parameters are the blocks: 2 convs and the linear layer.
    assert sorted(rows["step"].unique()) == [0, 1, 2, 3]
    step0 = rows[(rows["step"] == 0) & (rows["metric"] == "spearman_abs")]
    assert (step0["value"] == 1.0).all()
    gradient = result.summary.query("method == 'gradient' and metric == 'spearman_abs'").set_index("step")["mean"]
    assert (gradient.loc[[3]] < 0.9).all()  # with every block random the gradient map changes (each seed)
    assert sorted(rows["seed"].unique()) == [0, 1, 2]  # the default's three draws


def test_check_from_python_matches_the_gradient_computed_by_hand(images):
    """Step 0's maps are the model's own input gradients for its predicted class."""
    model = small_cnn()
    result = check(model, images, ["gradient"], "random_logit", device="cpu", n_examples=4)
    targets = result.results.query("step == 0")["target"].to_numpy()[:4]
    x = images.clone().requires_grad_(True)
    logits = model(x)
    assert (logits.argmax(1).numpy() == targets).all()


def test_check_writes_a_run_directory_when_given_one(tmp_path, images):
    result = check(small_cnn(), images, ["gradient"], "independent", run_dir=tmp_path / "run", device="cpu",
                   labels=torch.tensor([0, 1, 2, 0]))
    assert (tmp_path / "run" / "results.csv").is_file()
    states = pd.read_csv(tmp_path / "run" / "states.csv")
    first = states[states["seed"] == 0]
    assert first["weights"].nunique() == len(first)  # each independent state is another model
    assert states["accuracy"].between(0, 1).all()
    assert result.run_dir == tmp_path / "run"


def test_check_refuses_bad_input_with_one_line(images):
    with pytest.raises(SanityError, match="nn.Module"):
        check("not a model", images)
    with pytest.raises(SanityError, match=r"\(B, C, H, W\)"):
        check(small_cnn(), images[0])
    with pytest.raises(SanityError, match="unknown setting 'no_such_setting'"):
        check(small_cnn(), images, no_such_setting=1)
    with pytest.raises(SanityError, match="shuffled_model"):
        check(small_cnn(), images, test="data", device="cpu")


def test_check_leaves_the_callers_matplotlib_backend_alone_and_writes_nothing(tmp_path):
    """In a fresh process (as a notebook is) with its own backend and its own temporary
    directory: importing and running check() keeps the backend and leaves no file behind."""
    import subprocess
    import sys

    script = (
        "import matplotlib; matplotlib.use('svg')\n"
        "import torch; from torch import nn\n"
        "from sanity_cli import check\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 3))\n"
        "result = check(model.eval(), torch.rand(6, 1, 12, 12), ['gradient'], device='cpu')\n"
        "assert result.run_dir is None and len(result.verdict)\n"
        "print('backend', matplotlib.get_backend())\n")
    scratch, work = tmp_path / "tmp", tmp_path / "work"
    scratch.mkdir()
    work.mkdir()
    env = {**__import__("os").environ, "TMPDIR": str(scratch), "MPLBACKEND": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "backend svg" in done.stdout
    assert not list(work.iterdir()) and not list(scratch.iterdir())
