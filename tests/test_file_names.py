"""Names that become part of file names never lead a file out of its directory.

Every setting that reaches a file name (the model cache's entry, the job's log file,
the keys of maps.npz, the figures' names) is tried with `..`, an absolute path,
separators and NUL: each is refused in one line, and nothing is written anywhere.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY
from sanity_cli import cli
from sanity_cli.errors import SanityError
from sanity_cli.rundir import plain_name
from sanity_cli.training import train_or_load
from sanity_cli.validation import validate

HOSTILE = ["..", "../../TRAV", "/tmp/TRAV", "a/b", "a\\b", "a\0b", ".", "", "a\nb"]


def _quoted(value: str) -> str:
    """An override value as Hydra reads it (quoted, with its backslashes escaped)."""
    return '"' + value.replace("\\", "\\\\") + '"'


def test_plain_names_pass_unchanged():
    for name in ("cnn", "my-model_2.1", "resnet50.a1_in1k", "..x", "x.."):
        assert plain_name(name, "model.name") == name


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_names_are_refused(value):
    with pytest.raises(SanityError, match="cannot be part of a file name") as caught:
        plain_name(value, "model.name")
    assert "\n" not in str(caught.value) and "model.name=" in str(caught.value)


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("key", ["model.name", "dataset.name", "test.name"])
def test_validate_refuses_a_name_that_escapes(make_cfg, key, value):
    cfg = make_cfg(TINY)
    OmegaConf.update(cfg, key, value)
    with pytest.raises(SanityError, match=f"{key}=.*cannot be part of a file name"):
        validate(cfg)


@pytest.mark.parametrize("value", HOSTILE)
def test_validate_refuses_a_method_key_that_escapes(make_cfg, value):
    """A method's key names its maps in maps.npz ("{state}/{method}") and its files."""
    cfg = make_cfg([*TINY, "method=gradient"])
    methods = OmegaConf.to_container(cfg.method)
    cfg.method = OmegaConf.create({value: {"method": "gradient"}, **methods})
    with pytest.raises(SanityError, match="cannot be part of a file name"):
        validate(cfg)


@pytest.mark.parametrize("value", ["../../TRAV_cnn", "{tmp}/TRAV_cnn", "a\\b", "a\0b"])
@pytest.mark.parametrize("model", [[], ["model=custom", "model._target_=sanity_cli.models.PaperCNN"]])
def test_run_with_a_hostile_model_name_writes_nothing(isolated, capsys, model, value):
    """The sweep's command: the cache entry and its lock would land two levels above cache_dir."""
    run_dir = isolated / "deep" / "er" / "run"
    value = value.format(tmp=isolated)  # an absolute path, inside the test's own directory
    code = cli.main(["run", *TINY, "method=gradient", *model, f"model.name={_quoted(value)}",
                     f"hydra.run.dir={run_dir}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.name=" in err and "cannot be part of a file name" in err
    assert not run_dir.exists()
    assert [p.name for p in isolated.rglob("*")] == []


@pytest.mark.parametrize("value", ["../../JOBTRAV", "{tmp}/JOBTRAV", "a\\b", "..", "a\0b"])
def test_a_hostile_job_name_is_refused_before_hydra_writes_its_log(isolated, capsys, value):
    """hydra.job.name names the job's log file (run_dir/NAME.log)."""
    run_dir = isolated / "deep" / "run"
    value = value.format(tmp=isolated)
    code = cli.main(["run", *TINY, "method=gradient", f"hydra.job.name={_quoted(value)}",
                     f"hydra.run.dir={run_dir}"])
    assert code == 2
    assert "hydra.job.name=" in capsys.readouterr().err
    assert list(isolated.rglob("*")) == []


def test_the_model_cache_refuses_an_entry_outside_its_directory(tmp_path):
    """Called directly (not through a validated config), the cache still keeps inside cache_dir."""
    cache = tmp_path / "a" / "models"
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    train_cfg = OmegaConf.create({"epochs": 1, "batch_size": 2, "lr": 1e-3, "optimizer": "adam"})
    with pytest.raises(SanityError, match="model.name='../../x'"):
        train_or_load(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)),
                      {"model": "../../x"}, x, y, x, y, train_cfg, 0, cache, torch.device("cpu"))
    assert list(tmp_path.rglob("*")) == []
