"""Paper reruns: every experiment composes with the authors' settings, and those whose
inputs are missing are skipped with a message that says how to supply them."""

from __future__ import annotations

import pytest

from sanity_cli import cli
from sanity_cli.paper import FIGURES, compose_experiment, experiments, missing_inputs, rerun


@pytest.mark.parametrize("name", experiments("all"))
def test_every_experiment_composes(name):
    cfg = compose_experiment(name, [])
    assert cfg.n_images >= 8 and cfg.method
    if "inception" in name:
        assert cfg.model.name == "inception_v3.tf_in1k" and cfg.dataset.name == "imagefolder"
    if name.startswith(("fig3", "fig4")):
        assert cfg.test.name == ("cascade" if name.startswith("fig3") else "independent")
    if name.startswith(("fig5", "fig6")):
        assert cfg.test.name == "data" and cfg.test.shuffled_epochs == 100


def test_authors_settings_in_the_paper_configs():
    cfg = compose_experiment("fig3_cascade_inception", [])
    methods = cfg.method
    assert cfg.n_images == 200 and cfg.dataset.classes == 10
    assert methods.smoothgrad.noise == 0.15 and methods.smoothgrad.samples == 50
    assert methods.integrated_gradients.steps == 50 and methods.integrated_gradients.baseline == "zero"
    assert cfg.metrics.ssim.data_range == 2.0 and cfg.metrics.hog.pixels_per_cell == 16


@pytest.fixture(autouse=True)
def no_cached_weights(monkeypatch):
    """As on a machine that never fetched the ImageNet weights."""
    monkeypatch.setattr("sanity_cli.paper._weights_cached", lambda name: False)


def test_missing_imagenet_inputs_are_named(tmp_path):
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"")
    no_images = compose_experiment("fig3_cascade_inception", [f"model.checkpoint={weights}"])
    assert "dataset.path=PATH" in missing_inputs(no_images)
    no_weights = compose_experiment("fig3_cascade_inception", [f"dataset.path={tmp_path}"])
    assert "model.checkpoint=PATH" in missing_inputs(no_weights)
    ready = compose_experiment("fig3_cascade_inception", [f"dataset.path={tmp_path}", f"model.checkpoint={weights}"])
    assert missing_inputs(ready) is None


def test_rerun_skips_without_running(tmp_path):
    outcomes = rerun("fig2", [], tmp_path)
    assert [(o.experiment, o.status) for o in outcomes] == [("fig3_cascade_inception", "skipped")]
    assert not (tmp_path / "fig3_cascade_inception").exists()


def test_paper_verb_errors(capsys):
    assert cli.main(["paper", "fig9"]) == 2
    assert "unknown figure 'fig9'" in capsys.readouterr().err
    assert cli.main(["paper"]) == 2
    assert set(FIGURES) == {f"fig{i}" for i in range(1, 7)}


def test_edge_similarity_from_the_kept_maps(tmp_path):
    import json

    import numpy as np

    from sanity_cli.paper import edge_similarity

    rng = np.random.default_rng(0)
    edge = rng.random((6, 1, 20, 20)).astype(np.float32)
    meta = {"methods": ["copy", "noise", "cam", "edge"], "states": [{"key": "seed0_step0"}]}
    np.savez_compressed(tmp_path / "maps.npz", meta=np.array(json.dumps(meta)), **{
        "seed0_step0/edge": edge, "seed0_step0/copy": 3 * edge, "seed0_step0/cam": edge[:, :1],
        "seed0_step0/noise": rng.random((6, 1, 20, 20)).astype(np.float32)})
    table = edge_similarity(tmp_path).set_index(["method", "metric"])
    assert table.loc[("copy", "spearman_abs"), "mean"] == pytest.approx(1.0)
    assert table.loc[("cam", "spearman_abs"), "mean"] == pytest.approx(1.0)
    assert abs(table.loc[("noise", "spearman_abs"), "mean"]) < 0.3
    assert "edge" not in table.index.get_level_values("method") and (table["n"] == 6).all()
