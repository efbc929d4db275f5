"""Configs composed with Hydra's compose API, as `sanity run` composes them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from sanity_cli.cli import available, config_dir


def test_defaults(make_cfg):
    cfg = make_cfg()
    assert cfg.model.kind == "cnn" and cfg.dataset.name == "digits" and cfg.test.name == "cascade"
    assert cfg.seed == 0 and cfg.device == "auto" and cfg.n_images > 0
    assert "gradient" in cfg.method


def test_overrides(make_cfg):
    cfg = make_cfg(["model=inception_v3", "dataset=samples", "n_images=3", "device=cpu", "seed=7"])
    assert cfg.model.name == "inception_v3.tf_in1k" and cfg.model.gradcam_layer == "Mixed_7c"
    assert (cfg.dataset.name, cfg.n_images, cfg.device, cfg.seed) == ("samples", 3, "cpu", 7)
    timm_cfg = make_cfg(["model=timm", "model.name=resnet18", "model.pretrained=false"])
    assert (timm_cfg.model.kind, timm_cfg.model.name, timm_cfg.model.pretrained) == ("timm", "resnet18", False)


def test_every_config_of_every_group_composes(make_cfg):
    for group in ("model", "dataset", "method", "test"):
        for name in available(group):
            cfg = make_cfg([f"{group}={name}"])
            assert cfg[group] is not None


def test_wheel_carries_the_configs(tmp_path):
    """Installed from a wheel (not editable), the command still finds its configs."""
    root = config_dir().parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(root)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("sanity_cli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sanity_cli/conf/config.yaml" in names and "sanity_cli/conf/model/inception_v3.yaml" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = subprocess.run([sys.executable, "-c",
                             "from sanity_cli import cli; print(cli.config_dir()); cli.main(['list'])"],
                            cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                            capture_output=True, text=True, check=True).stdout
    assert str(tmp_path / "site") in listed and "inception_v3" in listed


def test_the_default_checks_repeat_the_randomization_three_times(make_cfg):
    from sanity_cli.pipeline import seeds_of
    from sanity_cli.settings import Settings

    def _seeds(cfg):
        return seeds_of(Settings.from_config(cfg))

    for test in ("cascade", "independent", "smooth_cascade", "entropy"):
        assert make_cfg([f"test={test}"]).test.seeds == 3
    assert _seeds(make_cfg([])) == [0, 1, 2]
    assert _seeds(make_cfg(["seed=7"])) == [7, 8, 9]
    assert _seeds(make_cfg(["test.seeds=[4,2]"])) == [4, 2] and _seeds(make_cfg(["test.seeds=null"])) == [0]
    assert _seeds(make_cfg([f"seed={2**32 - 1}", "test.seeds=2"])) == [2**32 - 1, 0]
