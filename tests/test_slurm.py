"""A sweep through a real one-node SLURM cluster (scripts/slurm_cluster.sh), merged by `sanity collect`.

Skipped, saying why, where SLURM's daemons are not installed (Debian: apt-get install -y
slurm-wlm munge) or the cluster does not start; also without the submitit launcher.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import sanity

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_cluster.sh"
SWEEP = ["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
         "method=gradient", "train.epochs=1", "device=cpu", "seed=0,1", "n_images=4,0", "n_examples=1",
         "++test.seeds=1", "hydra.sweep.dir=sweep"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm() -> dict:
    """The environment of a client of the script's cluster (one per machine: it listens on SLURM's
    port); stops the cluster afterwards if this fixture started it."""
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("the submitit launcher is not installed: pip install 'sanity-cli[slurm]'")
    if os.geteuid() != 0:
        pytest.skip("starting SLURM's daemons needs root")
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        pytest.skip(f"no SLURM cluster: {started.stderr.strip() or started.stdout.strip()}")
    conf = started.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    yield {"SLURM_CONF": conf}
    if "already running" not in started.stderr:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=60)


def test_a_sweep_on_slurm_runs_each_job_there_and_collects_into_one_table(slurm, tmp_path, _tiny_models):
    shutil.copytree(_tiny_models, tmp_path / "cache")  # seed 0's model, trained already; the jobs train seed 1's
    env = {**slurm, "SANITY_CACHE_DIR": str(tmp_path / "cache"), "SANITY_DATA_DIR": str(tmp_path / "data")}
    done = sanity("run", *SWEEP, cwd=tmp_path, env=env, timeout=600)
    # jobs 1 and 3 (n_images=0) fail on their node; the sweep says which, with their messages
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "sanity: error: 2 of the sweep's jobs failed: sweep/1: n_images must be at least 1, not 0; "
        "sweep/3: n_images must be at least 1, not 0")
    sweep = tmp_path / "sweep"
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 4  # one SLURM array task per job
    for job in ("0", "2"):
        assert f"job {job}: 1 torch threads" in (sweep / job / "sanity.log").read_text()  # SLURM's one CPU

    refused = sanity("collect", str(sweep), cwd=tmp_path)
    assert refused.returncode == 2 and f"{sweep / '1'} failed: n_images must be at least 1" in refused.stderr

    collected = sanity("collect", str(sweep / "0"), str(sweep / "2"), "--out", "table", cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr
    assert "collected 2 runs (swept: seed)" in collected.stdout
    results = pd.read_csv(tmp_path / "table" / "results.csv")
    jobs = [pd.read_csv(sweep / job / "results.csv") for job in ("0", "2")]
    assert results["cfg.seed"].tolist() == [0] * len(jobs[0]) + [1] * len(jobs[1])
    pd.testing.assert_frame_equal(results.drop(columns="cfg.seed"), pd.concat(jobs, ignore_index=True))
    # jobs x images x states (4 blocks + trained) x metrics (HOG is left out of 28x28 maps)
    assert len(results) == 2 * 4 * 5 * 3
    trained = results[(results["step"] == 0) & (results["metric"] == "spearman_abs")]
    assert trained["value"].tolist() == pytest.approx([1.0] * 8)  # each job's reference against itself
    random = results[(results["step"] == 4) & (results["metric"] == "spearman_abs")]
    assert random["value"].abs().mean() < 0.6  # the fully randomized CNN's gradient is another map
    summary = pd.read_csv(tmp_path / "table" / "summary.csv")
    assert sorted(set(summary["cfg.seed"])) == [0, 1]
    for seed, job in zip((0, 1), jobs):
        info = json.loads((sweep / ("0" if seed == 0 else "2") / "run.json").read_text())
        assert info["settings"]["seed"] == seed
        rows = summary[(summary["cfg.seed"] == seed) & (summary["step"] == 4) & (summary["metric"] == "ssim")]
        expected = job[(job["step"] == 4) & (job["metric"] == "ssim")]["value"].mean()
        assert rows["mean"].item() == pytest.approx(expected)
