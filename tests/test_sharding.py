"""Image shards, each job's share of the machine, and a sweep's failures.

The end-to-end test at the bottom runs the real CLI: the rows of three shards merged
by `sanity collect` must be the rows of the unsharded run.
"""

from __future__ import annotations

import importlib.util
import shutil

import pandas as pd
import pytest
import torch
from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from conftest import sanity
from sanity_cli import cli
from sanity_cli.errors import SanityError
from sanity_cli.sharding import (
    Shard,
    gpu_lease,
    job_errors,
    job_resources,
    job_share,
    leased_device,
    parse_shard,
    record_job_error,
    shard_images,
    sweep_size,
)
from sanity_cli.validation import validate


@pytest.mark.parametrize("text, shard", [("0/4", Shard(0, 4)), ("3/4", Shard(3, 4)), (" 1 / 2 ", Shard(1, 2)),
                                         ("0/1", Shard(0, 1)), (None, None)])
def test_parse_shard(text, shard):
    assert parse_shard(text) == shard


@pytest.mark.parametrize("text, message", [
    ("4/4", "shard=4/4: K counts from 0 and must be below N; the shards of 4 are 0/4 .. 3/4"),
    ("-1/2", "shard must be K/N with whole numbers 0 <= K < N, e.g. shard=0/4 (or shard=null for all images); "
             "got '-1/2'"),
    ("a/b", "got 'a/b'"), ("4", "got '4'"), ("1/2/3", "got '1/2/3'"), ("0/0", "N must be at least 1"),
])
def test_malformed_shards_are_refused_in_one_line(text, message):
    with pytest.raises(SanityError, match="^shard") as error:
        parse_shard(text)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("total, count", [(10, 3), (9, 3), (7, 7), (5, 1), (200, 8)])
def test_shards_are_disjoint_slices_that_make_up_the_chosen_images_in_order(total, count):
    chosen = torch.randperm(1000)[:total]
    parts = [shard_images(chosen, Shard(k, count)) for k in range(count)]
    assert torch.equal(torch.cat(parts), chosen)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    assert shard_images(chosen, None) is chosen


def test_more_shards_than_images_is_refused(make_cfg):
    with pytest.raises(SanityError, match="shard=0/3 splits 2 images 3 ways"):
        shard_images(torch.arange(2), Shard(0, 3))
    with pytest.raises(SanityError, match=r"shard=0/8 splits n_images=4 images 8 ways.*use at most 4 shards"):
        validate(make_cfg(["shard=0/8", "n_images=4"]))
    with pytest.raises(SanityError, match="got 'a/b'"):
        validate(make_cfg(["shard=a/b"]))
    validate(make_cfg(["shard=3/4", "n_images=4"]))


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


@pytest.mark.parametrize("n_jobs, sweep_jobs, cores, threads", [
    (-1, 4, 16, 4),     # all cores for 4 jobs: 4 threads each
    (-1, 40, 16, 1),    # more jobs than cores: one thread each, never more threads than cores
    (2, 4, 16, 8),      # two at a time
    (-2, None, 16, 1),  # all cores but one, sweep size unknown: 15 workers
    (None, 3, 16, 16),  # joblib's default runs one job at a time
    (4, 8, 2, 1),
])
def test_joblib_jobs_split_the_cores_between_the_jobs_running_at_once(n_jobs, sweep_jobs, cores, threads):
    assert job_share(JOBLIB, n_jobs, sweep_jobs, cores, {}).threads == threads
    assert job_share(JOBLIB, n_jobs, sweep_jobs, cores, {}).lease_gpu


def test_slurm_jobs_use_their_allocation_and_other_jobs_are_left_alone():
    slurm = job_share("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", None, 4, 64,
                      {"SLURM_CPUS_PER_TASK": "6", "SLURM_JOB_ID": "7"})
    assert slurm.threads == 6 and not slurm.lease_gpu  # SLURM sets CUDA_VISIBLE_DEVICES itself
    basic = job_share("hydra._internal.core_plugins.basic_launcher.BasicLauncher", None, 4, 64, {})
    assert basic.threads is None and not basic.lease_gpu


def test_sweep_size_counts_the_jobs_of_the_sweep(tmp_path):
    overrides = ["method=gradient", "shard=0/4,1/4,2/4,3/4", "seed=range(0,3)", "n_images=8"]
    OmegaConf.save({"hydra": {"overrides": {"task": overrides}}}, tmp_path / "multirun.yaml")
    assert sweep_size(tmp_path) == 12
    assert sweep_size(tmp_path / "nowhere") is None


@pytest.fixture
def joblib_job(tmp_path):
    """A job of a joblib sweep of 3 jobs at most `n_jobs` at a time, as Hydra sets it up (hydra config set)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from sanity_cli.cli import config_dir

    def make(n_jobs: int, device: str = "cpu"):
        overrides = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", f"hydra.sweep.dir={tmp_path}",
                     f"device={device}"]
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = "MULTIRUN"
            cfg.hydra.job.num = 0
        OmegaConf.save({"hydra": {"overrides": {"task": ["seed=0,1,2"]}}}, tmp_path / "multirun.yaml")
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    HydraConfig.instance().cfg = None  # no job after this test


@pytest.mark.parametrize("n_jobs, threads", [(1, 2), (2, 1), (-1, 1)])
def test_job_resources_set_the_threads_of_a_joblib_job_and_restore_them(joblib_job, monkeypatch, n_jobs, threads):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # a two-core machine
    before = torch.get_num_threads()
    cfg = joblib_job(n_jobs)
    with job_resources(cfg):
        assert torch.get_num_threads() == threads
        assert leased_device() is None and cfg.device == "cpu"  # a CPU job leases no GPU
    assert torch.get_num_threads() == before


def test_job_resources_give_a_gpu_job_its_leased_device(joblib_job, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setattr("torch.cuda.set_device", lambda index: None)
    cfg, other = joblib_job(2, device="auto"), joblib_job(2, device="auto")
    with job_resources(cfg):
        assert leased_device() == "cuda:0"
        with job_resources(other):  # a second job at the same time gets the other GPU
            assert leased_device() == "cuda:1"
        assert leased_device() == "cuda:0"
    assert leased_device() is None
    assert cfg.device == other.device == "auto", "the lease is the run's fact, not written into its config"


def test_each_concurrent_job_leases_a_gpu_of_its_own(tmp_path):
    with gpu_lease(tmp_path, 2) as first, gpu_lease(tmp_path, 2) as second:
        assert {first, second} == {0, 1}
        held = FileLock(tmp_path / f"gpu{first}.lock")
        with pytest.raises(Timeout):
            held.acquire(timeout=0)
    with gpu_lease(tmp_path, 2) as again:  # released on exit
        assert again == 0


def test_failed_jobs_are_found_in_their_directories(tmp_path):
    record_job_error(tmp_path / "0", "unknown method 'x'")
    record_job_error(tmp_path / "2", "shard=0/8 splits n_images=4 images 8 ways")
    (tmp_path / "1").mkdir()
    assert job_errors(tmp_path) == [f"{tmp_path / '0'}: unknown method 'x'",
                                    f"{tmp_path / '2'}: shard=0/8 splits n_images=4 images 8 ways"]
    assert job_errors(tmp_path, since=(tmp_path / "2" / "error.txt").stat().st_mtime + 10) == []


@pytest.mark.parametrize("value", ["4/4", "-1/2", "a/b"])
def test_cli_refuses_a_bad_shard_before_any_work(tmp_path, capsys, value):
    assert cli.main(["run", f"shard={value}", f"hydra.run.dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sanity: error: shard") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_sweep_with_one_bad_shard_before_any_job(tmp_path, capsys):
    assert cli.main(["run", "-m", "shard=0/2,2/2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]) == 2
    assert "shard=2/2: K counts from 0" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_launcher_without_its_plugin_is_refused_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if "submitit" in name else real(name, *rest))
    assert cli.main(["run", "-m", "hydra/launcher=submitit_slurm", "seed=0,1"]) == 2
    assert capsys.readouterr().err == ("sanity: error: hydra/launcher=submitit_slurm needs its plugin: "
                                       "pip install 'sanity-cli[slurm]'\n")


# -- end to end: three shards merged == the unsharded run -------------------------------------

SHARDED = ["device=cpu", "train.epochs=1", "n_images=6", "method=[gradient,smoothgrad,random]",
           "method.smoothgrad.samples=3", "n_examples=1"]
KEY = ["method", "seed", "step", "image", "metric"]


@pytest.fixture(scope="module")
def sharded_and_whole(tmp_path_factory, _tiny_models):
    """One sweep: job 0 the whole run, jobs 1-3 its three shards, merged by collect."""
    root = tmp_path_factory.mktemp("shards")
    shutil.copytree(_tiny_models, root / "cache")  # the jobs' model, trained already
    env = {"SANITY_CACHE_DIR": str(root / "cache"), "SANITY_DATA_DIR": str(root / "data")}
    sweep = sanity("run", "-m", *SHARDED, "shard=null,0/3,1/3,2/3", "hydra.sweep.dir=sweep", cwd=root, env=env)
    assert sweep.returncode == 0, sweep.stderr
    collected = sanity("collect", "sweep/1", "sweep/2", "sweep/3", "--out", "merged", cwd=root, env=env)
    assert collected.returncode == 0, collected.stderr
    return pd.read_csv(root / "sweep/0/results.csv"), pd.read_csv(root / "merged/results.csv")


@pytest.mark.slow
def test_three_shards_explain_the_images_of_the_whole_run_once_each(sharded_and_whole):
    """Same rows in the same order: images, their labels and the classes explained."""
    whole, merged = sharded_and_whole
    # images x methods x states x metrics (no HOG on 28x28 maps) x the default's three randomization draws
    assert len(merged) == len(whole) == 6 * 3 * 5 * 3 * 3
    assert sorted(set(merged["image"])) == sorted(set(whole["image"]))
    pd.testing.assert_frame_equal(merged[KEY + ["label", "target"]], whole[KEY + ["label", "target"]])


# A convolution over a batch of 2 and over a batch of 6 rounds differently in float32
# (maps agree to about 1e-7), and where two pixels of a map are that close their ranks
# can swap: a rank correlation then moves by about 1e-5. Anything beyond is a real change.
ROUNDING = 1e-4


@pytest.mark.slow
def test_sharded_gradient_scores_equal_the_whole_runs(sharded_and_whole):
    whole, merged = sharded_and_whole
    pick = lambda table: table[table["method"] == "gradient"]["value"].to_numpy()  # noqa: E731
    assert pick(merged) == pytest.approx(pick(whole), abs=ROUNDING, nan_ok=True)


@pytest.mark.slow
def test_sharded_noise_scores_equal_the_whole_runs(sharded_and_whole):
    """SmoothGrad's noise and the random control's maps must follow the image, not its place in the batch."""
    whole, merged = sharded_and_whole
    for method in ("smoothgrad", "random"):
        pick = lambda table: table[table["method"] == method]["value"].to_numpy()  # noqa: E731, B023
        assert pick(merged) == pytest.approx(pick(whole), abs=ROUNDING, nan_ok=True), method
