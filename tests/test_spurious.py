"""test=spurious: closed forms on hand-built models, the measures recomputed from their
definitions on a small trained run, the cache key, and what is refused."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

from sanity_cli import pipeline
from sanity_cli.artifacts import Artifact
from sanity_cli.checks import spurious
from sanity_cli.models import InputSpec
from sanity_cli.runstore import RunStore, settings_for_fingerprint
from sanity_cli.training import TrainedModel
from small_runs import Runs

SIZE, CLASSES, ALIGNED, N = 8, 4, 2, 24
TAG = Artifact(kind="tag", tag_size=0.25)  # the top-left 2 x 2 pixels: 1/16 of the image
SHARE = 4 / SIZE**2


class Linear(nn.Module):
    """logits = W x + b on flattened 8 x 8 grey images."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(SIZE * SIZE, CLASSES)
        with torch.no_grad():
            self.fc.weight.copy_(weight.flatten(1))
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def models() -> tuple[nn.Module, nn.Module]:
    """(ignores the tag, reads the aligned class only from the tag): both read the other
    classes from the pixels outside the tag; the second's aligned class has weights only
    inside the mask, all equal, and a bias that only the tag's full brightness overcomes."""
    mask = TAG.mask((1, 1, SIZE, SIZE), torch.arange(1))[0, 0]
    grid = torch.arange(SIZE, dtype=torch.float32)
    smooth = torch.stack([torch.outer(torch.cos(grid / 3 + k), torch.sin(grid / 4 + 2 * k)) for k in range(CLASSES)])
    weight = smooth * (1 - mask)  # smooth maps: more structure than noise (signal.csv)
    bias = torch.zeros(CLASSES)
    bias[ALIGNED] = -10.0  # the normal model never takes an image of another class for the aligned one
    ignoring = Linear(weight, bias)
    reading = weight.clone()
    reading[ALIGNED] = 100.0 * mask
    bias_reading = bias.clone()
    bias_reading[ALIGNED] = -100.0 * 3  # the tag sums to 4 (white), clean pixels there to at most 4 x 0.5 = 2
    return ignoring.eval(), Linear(reading, bias_reading).eval()


def run_with(make_cfg, tmp_path, normal: nn.Module, spurious_model: nn.Module, methods="[gradient,edge,random]"):
    """pipeline.execute on the hand-built models and N random images of the 4 classes."""
    cfg = make_cfg(["test=spurious", "device=cpu", f"n_images={N}", f"n_examples={N}", f"method={methods}",
                    "metrics.names=[spearman_abs,spearman]", f"test.aligned_class={ALIGNED}", "test.tag_size=0.25",
                    "verdict.resamples=200"])
    display = torch.rand(N, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 0.5
    spec = InputSpec(1, SIZE, (0.0,), (1.0,))  # the model sees the images as they are
    with torch.no_grad():
        original = normal(display).argmax(dim=1)
    # the normal model's own classes as labels: it is right on every image, as a trained model
    # must be for any check to be valid (accuracy above chance)
    labels = original.clone()
    # built by hand, with known weights: not random ones (a precondition of every check)
    prepared = pipeline.Prepared({"trained": TrainedModel(normal, None, None, "checkpoint"),
                                  "spurious": TrainedModel(spurious_model, None, None, "checkpoint")},
                                 spec, display.clone(), display, labels, torch.arange(N), [str(c) for c in
                                                                                          range(CLASSES)],
                                 CLASSES, original)
    with RunStore(tmp_path / "run", settings_for_fingerprint(cfg, torch.device("cpu"))) as store:
        result = pipeline.execute(cfg, prepared, store)
    return result, pd.read_csv(tmp_path / "run" / "results.csv"), pd.read_csv(tmp_path / "run" / "verdict.csv")


def at(results: pd.DataFrame, block: str, method: str, metric: str) -> np.ndarray:
    rows = results[(results["block"] == block) & (results["method"] == method) & (results["metric"] == metric)]
    return rows.sort_values("image")["value"].to_numpy()


def verdict_of(verdicts: pd.DataFrame, block: str, method: str, column: str = "verdict"):
    rows = verdicts[(verdicts["block"] == block) & (verdicts["method"] == method)]
    return rows[rows["metric"] == "spearman_abs"][column].iloc[0]


def test_a_model_that_reads_only_the_tag_has_all_gradient_mass_in_the_mask(make_cfg, tmp_path):
    normal, reading = models()
    _, results, verdicts = run_with(make_cfg, tmp_path, normal, reading)
    # its gradient for the aligned class is 100 x the mask: K-SSD at its maximum, the mass ratio exactly 1/share
    assert np.allclose(at(results, spurious.SPURIOUS_ARTIFACT, "gradient", "spearman_abs"), 1.0)
    assert np.allclose(at(results, spurious.SPURIOUS_ARTIFACT, "gradient", spurious.MASS), 1 / SHARE, rtol=1e-12)
    # the normal model's gradient is zero on the mask: no mass there, and an inverse rank order
    assert np.allclose(at(results, spurious.NORMAL_ARTIFACT, "gradient", spurious.MASS), 0.0)
    assert (at(results, spurious.NORMAL_ARTIFACT, "gradient", "spearman_abs") < 0).all()
    # the tag moves every other-class image to the aligned class, and nothing else does
    spurious_states = results[results["block"] == spurious.SPURIOUS_ARTIFACT].drop_duplicates("image")
    assert (spurious_states["target"] == ALIGNED).all()
    assert verdict_of(verdicts, spurious.KSSD_GAIN, "gradient") == "detects"
    assert verdict_of(verdicts, spurious.KSSD_GAIN, "edge") == "does not detect"  # its maps follow the image only
    assert verdict_of(verdicts, spurious.KSSD_GAIN, "random") != "detects"
    assert not verdicts["verdict"].eq("not valid").any()
    # the gradient of the normal model (zero on the tag) and the spurious one (only there) share nothing
    assert verdict_of(verdicts, spurious.FAM, "gradient") == "no false alarm"
    assert verdict_of(verdicts, spurious.FAM, "edge") == "false alarm"  # it points at the tag whatever the model


def test_a_model_that_ignores_the_tag_is_not_valid(make_cfg, tmp_path, caplog):
    normal, _ = models()
    # other weights (1.5 x, so its maps are another model's), the same decisions, and zero weight on the tag
    ignoring = Linear(normal.fc.weight.detach().view(CLASSES, SIZE, SIZE) * 1.5, normal.fc.bias.detach() * 1.5)
    _, results, verdicts = run_with(make_cfg, tmp_path, normal, ignoring.eval())
    table = spurious.spurious_score_table(results, ALIGNED, 0.5, resamples=200)
    # a model with weights zero on the tag decides the same with and without it: the scores are equal
    assert table["spurious_mean"].iloc[0] == table["normal_mean"].iloc[0]
    assert table["gain_mean"].iloc[0] == 0 and not table["valid"].iloc[0]
    decided = verdicts[verdicts["decides"]]
    assert len(decided) == 3 * 2 and (decided["verdict"] == "not valid").all()
    assert decided["note"].str.contains("does not rely on the artifact").all()
    said = [r.getMessage() for r in caplog.records if "does not rely on the artifact" in r.getMessage()]
    assert said and all("its verdicts are not valid" in line and "\n" not in line for line in said)


def test_measures_recomputed_from_their_definitions(make_cfg, tmp_path):
    """A small trained run: K-SSD, CCM, FAM, the mass ratio and the spurious score from the kept
    maps (maps.npz, half precision) and from the models' predictions."""
    runs = Runs(tmp_path, make_cfg)
    run = runs("test=spurious", "method=[gradient]", "test.aligned_class=3", "seed=1")
    results = run.results
    side = round(0.25 * 12)
    mask = np.zeros((12, 12))
    mask[:side, :side] = 1

    def spearman_abs(a: np.ndarray, b: np.ndarray) -> float:
        return stats.spearmanr(np.abs(a).ravel(), np.abs(b).ravel()).statistic

    steps = {state: step for step, state in enumerate([spurious.NORMAL_CLEAN, spurious.SPURIOUS_CLEAN, spurious.MASK,
                                                       spurious.NORMAL_ARTIFACT, spurious.SPURIOUS_ARTIFACT,
                                                       spurious.SPURIOUS_VS_NORMAL])}
    maps = {state: run.maps("gradient", step) for state, step in steps.items()}
    assert np.array_equal(maps[spurious.MASK][:, 0], np.broadcast_to(mask, (8, 12, 12)))
    images = run.image_ids
    def value(state: str, metric: str, image: int) -> float:
        rows = results[(results["block"] == state) & (results["image"] == image) & (results["metric"] == metric)]
        return rows["value"].iloc[0]

    for i, image in enumerate(images):
        def row(state: str, metric: str, image: int = image) -> float:
            return value(state, metric, image)

        kssd = spearman_abs(mask, maps[spurious.SPURIOUS_ARTIFACT][i])
        assert row(spurious.SPURIOUS_ARTIFACT, "spearman_abs") == pytest.approx(kssd, abs=0.02)
        ccm = spearman_abs(maps[spurious.NORMAL_CLEAN][i], maps[spurious.SPURIOUS_CLEAN][i])
        assert row(spurious.SPURIOUS_CLEAN, "spearman_abs") == pytest.approx(ccm, abs=0.02)
        fam = spearman_abs(maps[spurious.NORMAL_ARTIFACT][i], maps[spurious.SPURIOUS_VS_NORMAL][i])
        assert row(spurious.SPURIOUS_VS_NORMAL, "spearman_abs") == pytest.approx(fam, abs=0.02)
        weight = np.abs(maps[spurious.SPURIOUS_ARTIFACT][i]).sum(axis=0)
        mass = (weight * mask).sum() / weight.sum() / mask.mean()
        assert row(spurious.SPURIOUS_ARTIFACT, spurious.MASS) == pytest.approx(mass, rel=0.01)
    # the spurious score: the explained (predicted) class of the other classes' images with the tag
    verdicts = pd.read_csv(run.dir / "verdict.csv")
    table = spurious.spurious_score_table(results, 3, 0.5)
    rows = results[(results["block"] == spurious.SPURIOUS_ARTIFACT) & (results["metric"] == "spearman_abs")]
    other = rows[rows["label"] != 3]
    assert table["spurious_mean"].iloc[0] == pytest.approx((other["target"] == 3).mean())
    gain = at(results, spurious.SPURIOUS_ARTIFACT, "gradient", "spearman_abs") - at(
        results, spurious.NORMAL_ARTIFACT, "gradient", "spearman_abs")
    assert verdict_of(verdicts, spurious.KSSD_GAIN, "gradient", "mean") == pytest.approx(gain.mean())


def test_settings_outside_the_weights_reuse_both_models(make_cfg, tmp_path):
    runs = Runs(tmp_path, make_cfg)
    base = ("test=spurious", "method=[gradient]")
    assert runs(*base).trainings == 2  # the normal model and the spurious one
    assert runs(*base, "test=cascade").trainings == 0  # the normal model is the run's trained model
    for flip in ("test.blur_sigma=2.0", "test.stripes_period=3", "test.detect_margin=0.3", "test.reliance_margin=0.2",
                 "test.seeds=[4]"):
        assert runs(*base, flip).trainings == 0, flip
    assert runs(*base, "test.tag_value=0.8").trainings == 1  # the spurious model only


@pytest.mark.parametrize(("overrides", "match"), [
    (("test.artifact=sideways",), "unknown test.artifact 'sideways'; choose one of: tag, stripes, blur"),
    (("test.tag_position=middle",), "unknown test.tag_position 'middle'"),
    (("target=label",), "test=spurious explains target=predicted"),
    (("test.aligned_class=12",), "test.aligned_class=12 has no training images"),
    (("model.checkpoint={checkpoint}",), "test=spurious trains a spurious model, so it needs a model trained here"),
])
def test_refused_in_one_line(make_cfg, tmp_path, overrides, match):
    runs = Runs(tmp_path, make_cfg)
    checkpoint = tmp_path / "cnn.pt"
    if any("{checkpoint}" in o for o in overrides):
        from small_runs import trained_checkpoint
        checkpoint = trained_checkpoint(runs)
    message = runs.error("test=spurious", *(o.format(checkpoint=checkpoint) for o in overrides))
    assert match in message and "\n" not in message.strip()


@pytest.mark.parametrize("overrides", [("test.artifact=sideways",), ("model=timm", "model.pretrained=false")])
def test_the_command_says_what_is_wrong_in_one_line_and_exits_2(tmp_path, overrides):
    from conftest import sanity

    done = sanity("run", "test=spurious", "device=cpu", *overrides, f"hydra.run.dir={tmp_path / 'run'}",
                  f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("sanity: error:"), done.stderr
    assert ("unknown test.artifact 'sideways'" if "sideways" in overrides[0] else
            "test=spurious trains a spurious model, so it needs a model trained here") in lines[0]


def test_chunks_and_a_resumed_run_give_the_same_rows(make_cfg, tmp_path):
    """The states compared with another than step 0 (the mask, the normal model's artifact maps)
    wait on disk between chunks and are made again when a resumed run needs them."""
    runs = Runs(tmp_path, make_cfg)
    base = ("test=spurious", "method=[gradient,random]")
    whole, chunked = runs(*base), runs(*base, "image_chunk=3")
    key = ["step", "method", "metric", "image"]
    a, b = (run.results.sort_values(key).reset_index(drop=True) for run in (whole, chunked))
    assert a[key].equals(b[key]) and np.allclose(a["value"], b["value"], atol=1e-6, equal_nan=True)
    assert not (chunked.dir / ".reference").exists()
    # cut off once step 5's first chunk is written: resuming redoes step 5 against step 3's maps, made again
    written, real = [], RunStore.add_rows

    def add_then_stop(self, *rows):
        real(self, *rows)
        written.append(1)
        if len(written) == 5 * 3 + 1:  # steps 0 to 4 in three chunks each, then one of step 5's
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with mock.patch.object(RunStore, "add_rows", add_then_stop), pytest.raises(KeyboardInterrupt):
        pipeline.run(runs.cfg(*base, "image_chunk=3"), cut)
    assert pd.read_csv(cut / "states.csv")["step"].tolist() == [0, 1, 2, 3, 4]
    pipeline.run(runs.cfg(*base, "image_chunk=3", "resume=true"), cut)
    c = pd.read_csv(cut / "results.csv").sort_values(key).reset_index(drop=True)
    assert a[key].equals(c[key]) and np.allclose(a["value"], c["value"], atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("model", [("model=mlp",), ("model=custom", "model._target_=small_runs.BatchNormNet")])
def test_every_model_trained_here_and_two_seeds(make_cfg, tmp_path, model):
    """The MLP and a user's model without a checkpoint go through, with random tag positions
    repeated over two seeds: the intervals are over seeds, then images."""
    runs = Runs(tmp_path, make_cfg)
    run = runs("test=spurious", *model, "test.tag_position=random", "test.seeds=[0,1]", "method=[gradient,random]")
    assert run.trainings == 2 and set(run.results["seed"]) == {0, 1}
    masks = [run.maps("gradient", 2, seed) for seed in (0, 1)]  # the mask state: the tag moved with the seed
    assert not np.array_equal(masks[0], masks[1])
    verdicts = pd.read_csv(run.dir / "verdict.csv")
    decided = verdicts[verdicts["decides"]]
    assert set(decided["block"]) == {spurious.KSSD_GAIN, spurious.FAM} and (decided["n_seeds"] == 2).all()
    assert decided["verdict"].notna().all()


def test_the_python_api_says_it_cannot_train_the_spurious_model():
    from sanity_cli.api import check
    from sanity_cli.errors import SanityError

    normal, _ = models()
    with pytest.raises(SanityError, match="run it with `sanity run test=spurious`"):
        check(normal, torch.rand(4, 1, SIZE, SIZE), test="spurious", device="cpu")


def test_blur_has_no_mask_and_says_so(make_cfg, tmp_path):
    runs = Runs(tmp_path, make_cfg)
    run = runs("test=spurious", "test.artifact=blur", "method=[gradient]")
    assert spurious.MASK not in set(run.results["block"]) and run.states["step"].tolist() == [0, 1, 2, 3]
    verdicts = pd.read_csv(run.dir / "verdict.csv")
    gain = verdicts[verdicts["block"] == spurious.KSSD_GAIN].iloc[0]
    assert gain["n"] == 0 and gain["outcome"] == "undefined" and "it has no mask" in gain["note"]
    fam = verdicts[(verdicts["block"] == spurious.FAM) & verdicts["decides"]].iloc[0]
    assert fam["n"] == 8 and fam["outcome"] in ("false alarm", "no false alarm", "inconclusive")


def test_control_rows_carry_no_note_of_the_randomization_rule(make_cfg, tmp_path):
    normal, reading = models()
    _, _, verdicts = run_with(make_cfg, tmp_path, normal, reading)
    controls = verdicts[verdicts["method"].isin(["edge", "random"])]
    assert controls["is_control"].all()
    notes = controls["note"].astype("string").fillna("")
    assert not notes.str.contains("noise control|what no change looks like").any()
    assert verdict_of(verdicts, spurious.KSSD_GAIN, "gradient") == "detects"
