"""Every check does what it names, proved end to end on small runs.

Runs go through `pipeline.run` and are read back from their files. Most explain a CNN
that the tests trained and saved (`model.checkpoint=`), so the expected maps, classes
and scores can be recomputed here, from the model, with the project's libraries
(`explain`, `compare`, `histogram_entropy`, `reinitialize`) but none of the wiring
that a run goes through.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch

from sanity_cli.methods import explain
from sanity_cli.methods.controls import random_map
from sanity_cli.methods.noise import image_seed
from sanity_cli.metrics import NORMALIZATIONS, compare, histogram_entropy
from sanity_cli.randomization import block_seed, reinitialize
from sanity_cli.signal import signal_figures
from small_runs import CNN_BLOCKS, Runs, load_checkpoint, trained_checkpoint

STEPS = range(len(CNN_BLOCKS) + 1)


@pytest.fixture
def runs(make_cfg, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.getbasetemp() / "runs", make_cfg)


@pytest.fixture
def checkpoint(runs) -> str:
    return f"model.checkpoint={trained_checkpoint(runs)}"


@pytest.fixture
def model(runs, checkpoint) -> torch.nn.Module:
    return load_checkpoint(runs, trained_checkpoint(runs))


def randomized(model: torch.nn.Module, blocks: list[str], seed: int = 0, init: str = "paper") -> torch.nn.Module:
    """A copy of `model` with `blocks` re-initialized as a run with `seed` re-initializes them."""
    model = copy.deepcopy(model)
    for name in blocks:
        reinitialize(model.get_submodule(name), block_seed(seed, name), init)
    return model


def cascade_model(model, step: int, seed: int = 0):
    return randomized(model, CNN_BLOCKS[:step], seed)


def independent_model(model, step: int, seed: int = 0):
    return randomized(model, CNN_BLOCKS[step - 1:step] if step else [], seed)


def predicted(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.array(images))).argmax(1).numpy()


def gradient(model, images: np.ndarray, targets: np.ndarray, method: str = "gradient", **options) -> np.ndarray:
    x = torch.from_numpy(np.array(images))
    return explain(model, x, torch.from_numpy(np.asarray(targets)), method, **options).detach().numpy()


def assert_maps(kept: np.ndarray, expected: np.ndarray) -> None:
    """maps.npz keeps maps in half precision over each map's max |value|."""
    scale = np.abs(expected).reshape(len(expected), -1).max(1).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(kept, expected, rtol=0, atol=1e-3 * scale.max() + 1e-12)


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    return not np.allclose(a, b, rtol=0.05, atol=1e-3 * np.abs(a).max())


# --- model randomization: cascading and independent -------------------------------


def test_cascade_is_cumulative_and_independent_randomizes_one_block(runs, checkpoint, model):
    cascade, independent = runs(checkpoint), runs(checkpoint, "test=independent")
    for run in (cascade, independent):
        assert list(run.states["block"]) == ["original", *CNN_BLOCKS]
    x = cascade.images
    for step in STEPS:
        for run, state_model in ((cascade, cascade_model(model, step)), (independent, independent_model(model, step))):
            targets = run.column("target", step)
            np.testing.assert_array_equal(targets, predicted(state_model, x))
            assert_maps(run.maps("gradient", step), gradient(state_model, x, targets))
    # the first step randomizes the same block in both; from the second on they differ
    np.testing.assert_array_equal(cascade.maps("gradient", 1), independent.maps("gradient", 1))
    for step in STEPS[2:]:
        assert differ(cascade.maps("gradient", step), independent.maps("gradient", step))


def test_the_signal_check_reads_the_trained_models_maps(runs, checkpoint, model):
    run = runs(checkpoint)  # every image is an example here, so the whole of signal.csv can be recomputed
    assert len(run.image_ids) == run.rows(step=0)["image"].nunique()
    maps = gradient(model, run.images, run.column("target", 0))
    expected = signal_figures(torch.from_numpy(maps), torch.from_numpy(run.images))
    table = pd.read_csv(run.dir / "signal.csv")
    assert table.columns[0] == "method"  # no unnamed index column
    table = table.set_index("method")
    for figure, values in expected.items():
        assert table.loc["gradient", figure] == pytest.approx(float(values.mean()), abs=1e-4), figure
    # the random reference: a standard normal map per image, drawn with the run's seed
    images = torch.from_numpy(run.images)
    noise = signal_figures(random_map(images.to(torch.float64), run.info["settings"]["seed"]), images)
    for figure, values in noise.items():
        kept = values[~torch.isnan(values)]
        assert table.loc["random_reference", figure] == pytest.approx(float(kept.mean()), abs=1e-4), figure


# --- data randomization ---------------------------------------------------------------


def test_data_check_explains_the_shuffled_label_model_second(runs):
    data = runs("test=data", "test.shuffled_epochs=1")  # the shuffled-label model of labels=shuffled
    true_model, shuffled_model = runs(), runs("labels=shuffled")
    assert list(data.states["block"]) == ["true labels", "shuffled labels"]
    # no blocks are re-initialized, so the randomization's columns are empty
    assert data.results[["init", "reset_bn_stats"]].isna().all().all()
    for step, reference in ((0, true_model), (1, shuffled_model)):
        np.testing.assert_array_equal(data.maps("gradient", step), reference.maps("gradient", 0))
        np.testing.assert_array_equal(data.column("target", step), reference.column("target", 0))
    assert differ(data.maps("gradient", 0), data.maps("gradient", 1))
    assert data.rows(step=1, metric="spearman_abs")["value"].mean() < 0.9
    accuracy = data.summary.drop_duplicates("step").set_index("step")
    assert accuracy.loc[0, "test_accuracy"] > 0.6 and accuracy.loc[1, "test_accuracy"] < 0.25
    assert accuracy.loc[1, "train_accuracy"] == shuffled_model.info["models"]["trained"]["train_accuracy"]
    assert accuracy.loc[1, "train_accuracy"] == data.info["models"]["shuffled"]["train_accuracy"]


def test_shuffled_label_model_trains_the_epochs_and_subset_of_the_data_check(runs):
    quick = runs("test=data", "test.shuffled_epochs=1", "test.shuffled_subset=100")
    longer = runs("test=data", "test.shuffled_epochs=80", "test.shuffled_subset=100")
    assert quick.info["models"]["trained"] == longer.info["models"]["trained"]  # the true-label model is the same
    memorized = [run.info["models"]["shuffled"]["train_accuracy"] for run in (quick, longer)]
    assert memorized[0] < 0.5 < 0.9 < memorized[1]  # 100 random labels: learnt only with more epochs
    said = (r"the shuffled-label model reached train accuracy 0\.\d{3} < 0\.90: it has not memorized its labels, so "
            r"the data randomization test means little; raise test\.shuffled_epochs, or lower test\.shuffled_lr if "
            r"the loss stays at chance")
    assert [line for line in quick.warnings if re.fullmatch(said, line)]
    assert not any("not memorized" in line for line in longer.warnings)


# --- random logit -----------------------------------------------------------------------


def test_random_logit_explains_another_class_drawn_with_the_seed(runs, checkpoint, model):
    run = runs(checkpoint, "test=random_logit")
    assert list(run.states["block"]) == ["predicted class", "random other class"]
    first, second = run.column("target", 0), run.column("target", 1)
    np.testing.assert_array_equal(first, predicted(model, run.images))
    assert (second != first).all() and ((second >= 0) & (second < 10)).all()
    assert_maps(run.maps("gradient", 1), gradient(model, run.images, second))

    def shifts(other):  # the drawn offsets, whatever the images and their classes
        return (other.column("target", 1) - other.column("target", 0)) % 10

    same_seed_other_model, other_seed = runs("test=random_logit"), runs(checkpoint, "test=random_logit", "seed=1")
    np.testing.assert_array_equal(shifts(same_seed_other_model), shifts(run))
    assert (shifts(other_seed) != shifts(run)).any()
    # the draw itself: each image's offset comes from a generator seeded by the run's seed
    # and the image's id (another seed chooses other images too, so it alone cannot show this)
    drawn = [torch.randint(1, 10, (1,), generator=torch.Generator().manual_seed(image_seed(0, image))).item()
             for image in run.image_ids]
    np.testing.assert_array_equal(shifts(run), drawn)


# --- sMPRT and eMPRT ----------------------------------------------------------------------


def smoothed(model, images: np.ndarray, targets: np.ndarray, samples: int, noise: float, seed: int,
             ids: np.ndarray) -> np.ndarray:
    """The map averaged over `samples` noisy copies, noise std = noise x each image's range,
    each image's noise drawn in turn from a generator seeded with the randomization seed
    and the image's id."""
    x = torch.from_numpy(np.array(images))
    sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    generators = [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in ids]
    draw = lambda: torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])  # noqa: E731
    copies = [x + sigma * draw() for _ in range(samples)]
    return np.mean([gradient(model, c.numpy(), targets) for c in copies], axis=0)


def test_smooth_cascade_averages_noisy_copies(runs, checkpoint, model):
    run = runs(checkpoint, "test=smooth_cascade", "test.samples=3", "test.noise=0.2", "seed=3")
    for step in (0, 1, len(CNN_BLOCKS)):
        state_model = cascade_model(model, step, seed=3)
        targets = run.column("target", step)
        assert_maps(run.maps("gradient", step), smoothed(state_model, run.images, targets, 3, 0.2, seed=3,
                                                         ids=run.image_ids))
    # noise 0: every copy is the image, so the maps and scores are the cascade's
    plain, noiseless = runs(checkpoint), runs(checkpoint, "test=smooth_cascade", "test.samples=2", "test.noise=0")
    for step in STEPS:
        assert_maps(noiseless.maps("gradient", step), plain.maps("gradient", step))
    np.testing.assert_allclose(noiseless.results["value"], plain.results["value"], atol=1e-6)


def test_entropy_rise_is_each_state_over_step_0_minus_1(runs, checkpoint):
    run = runs(checkpoint, "test=entropy", "test.bins=20", "method=[gradient,random]")
    rows = run.results.set_index(["seed", "method", "image", "metric", "step"])["value"]
    entropy, rise = rows.xs("entropy", level="metric"), rows.xs("entropy_rise", level="metric")
    start = entropy.xs(0, level="step")
    expected = entropy / start.reindex(entropy.index.droplevel("step")).to_numpy() - 1.0
    np.testing.assert_allclose(rise.sort_index(), expected.sort_index(), rtol=1e-9, atol=1e-12)
    assert (entropy <= np.log(20) + 1e-9).all()
    for step in STEPS:  # the entropy of the kept maps' histograms (half precision moves a few values)
        kept = torch.from_numpy(run.maps("gradient", step))
        np.testing.assert_allclose(run.column("value", step, method="gradient", metric="entropy"),
                                   histogram_entropy(kept, 20).numpy(), atol=0.1)


# --- which class is explained ----------------------------------------------------------


def test_target_predicted_follows_each_state_original_the_trained_model_label_the_labels(runs, checkpoint,
                                                                                         model):
    from sanity_cli.data import load_dataset

    predicted_run = runs(checkpoint)
    x = predicted_run.images
    trained_class = predicted(model, x)
    last = predicted_run.column("target", len(CNN_BLOCKS))
    assert (last != trained_class).any()  # the randomized model predicts otherwise: the choice matters
    original = runs(checkpoint, "target=original")
    for step in STEPS:
        np.testing.assert_array_equal(original.column("target", step), trained_class)
    cfg = runs.cfg()
    labels = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, n_images=cfg.n_images,
                          image_size=12).test_y[predicted_run.image_ids].numpy()
    by_label = runs(checkpoint, "target=label")
    for run in (predicted_run, original, by_label):
        np.testing.assert_array_equal(run.column("label", 0), labels)
    for step in STEPS:
        np.testing.assert_array_equal(by_label.column("target", step), labels)
        assert_maps(by_label.maps("gradient", step), gradient(cascade_model(model, step), x, labels))


# --- noise of SmoothGrad and VarGrad, and the random control ------------------------------


def test_smoothgrad_and_vargrad_draw_the_same_noise_in_every_state(runs, checkpoint, model):
    methods = ["method=[smoothgrad,vargrad,random]", "method.smoothgrad.samples=4", "method.vargrad.samples=4",
               "method.smoothgrad.seed=5", "method.vargrad.seed=5"]
    run = runs(checkpoint, "seed=2", *methods)
    for step in (0, 2, len(CNN_BLOCKS)):
        state_model = cascade_model(model, step, seed=2)
        targets = run.column("target", step)
        for method in ("smoothgrad", "vargrad"):  # noise seed: the method's plus the run's, in every state
            assert_maps(run.maps(method, step), gradient(state_model, run.images, targets, method, samples=4, seed=7,
                                                         ids=torch.as_tensor(run.image_ids)))
    # the same model at step 0 of two randomization seeds: the same noisy maps; a new random map
    seeds = runs(checkpoint, "seed=2", "test.seeds=[0,1]", *methods)
    for method in ("smoothgrad", "vargrad"):
        np.testing.assert_array_equal(seeds.maps(method, 0, seed=0), seeds.maps(method, 0, seed=1))
    assert differ(seeds.maps("random", 0, seed=0), seeds.maps("random", 0, seed=1))
    for step in STEPS[1:]:
        assert differ(run.maps("random", step), run.maps("random", 0))
        assert abs(run.rows(method="random", metric="spearman", step=step)["value"].mean()) < 0.2


# --- several randomization seeds -------------------------------------------------------


def test_every_seed_randomizes_anew_and_rows_name_their_seed(runs, checkpoint, model):
    both, alone, default = runs(checkpoint, "test.seeds=[0,1]"), runs(checkpoint, "test.seeds=[1]"), runs(checkpoint)
    assert set(both.results["seed"]) == {0, 1} and list(both.states["seed"]) == [0] * 5 + [1] * 5
    key = ["step", "method", "image", "metric"]
    for seed, single in ((0, default), (1, alone)):
        mine = both.rows(seed=seed).sort_values(key)["value"].to_numpy()
        np.testing.assert_array_equal(mine, single.results.sort_values(key)["value"].to_numpy())
    np.testing.assert_array_equal(both.maps("gradient", 0, seed=0), both.maps("gradient", 0, seed=1))
    for step in STEPS[1:]:
        assert differ(both.maps("gradient", step, seed=0), both.maps("gradient", step, seed=1))
        state_model = cascade_model(model, step, seed=1)
        expected = gradient(state_model, both.images, predicted(state_model, both.images))
        assert_maps(both.maps("gradient", step, seed=1), expected)


# --- normalization reaches the metric ----------------------------------------------------


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_scores_are_the_named_normalization_of_the_kept_maps(runs, checkpoint, normalization):
    run = runs(checkpoint, f"metrics.normalization={normalization}", "test.granularity=[fc2]")
    assert set(run.results["normalization"]) == {normalization}
    reference, randomized_maps = (torch.from_numpy(run.maps("gradient", step)) for step in (0, 1))
    for name in NORMALIZATIONS:
        scores = compare(reference, randomized_maps, ["spearman_abs", "spearman", "ssim"], name, single_channel=True)
        for metric, values in scores.items():
            reported = run.column("value", 1, metric=metric)
            if name == normalization:
                np.testing.assert_allclose(reported, values.numpy(), atol=2e-3, err_msg=metric)
            elif metric == "ssim":  # scale changes SSIM, not ranks: SSIM tells the normalizations apart
                assert np.abs(reported - values.numpy()).max() > 5e-3, (name, normalization)


# --- the receipt of every state (states.csv) ---------------------------------------------


def block_sizes(model) -> dict[str, int]:
    return {name: sum(p.numel() for p in model.get_submodule(name).parameters()) for name in CNN_BLOCKS}


def check_accuracy(run) -> None:
    """accuracy: the explained model's on the chosen images, i.e. how often its
    predicted class (the target of target=predicted) is the label."""
    for state in run.states.itertuples():
        rows = run.rows(seed=state.seed, step=state.step, method="gradient")
        rows = rows[rows["metric"] == rows["metric"].iloc[0]]
        assert state.accuracy == pytest.approx((rows["target"] == rows["label"]).mean())


@pytest.mark.parametrize("check", ["cascade", "independent", "smooth_cascade", "entropy"])
def test_receipt_of_model_randomization(runs, checkpoint, model, check):
    extra = ["test.samples=2"] if check == "smooth_cascade" else []
    states = runs(checkpoint, f"test={check}", *extra).states
    sizes, total = block_sizes(model), sum(p.numel() for p in model.parameters())
    cumulative = check != "independent"
    randomized_blocks = [CNN_BLOCKS[:k] if cumulative else CNN_BLOCKS[k - 1:k] for k in STEPS]
    np.testing.assert_allclose(states["params_randomized"],
                               [sum(sizes[b] for b in blocks) / total for blocks in randomized_blocks])
    assert list(states["tensors_left_trained"]) == [8 - 2 * len(blocks) for blocks in randomized_blocks]
    assert states["weights"].str.fullmatch("[0-9a-f]{12}").all() and states["weights"].is_unique
    check_accuracy(runs(checkpoint, f"test={check}", *extra))
    if cumulative:
        assert states["params_randomized"].iloc[-1] == 1.0 and states["accuracy"].iloc[-1] <= 0.25
    assert states["accuracy"].iloc[0] >= 0.6


def test_receipt_cascade_and_independent_share_the_first_step_only(runs, checkpoint):
    cascade, independent = (runs(checkpoint, f"test={c}").states["weights"] for c in ("cascade", "independent"))
    assert list(cascade[:2]) == list(independent[:2])
    assert all(a != b for a, b in zip(cascade[2:], independent[2:]))


def test_receipt_of_data_and_random_logit(runs, checkpoint):
    data, true_model, shuffled_model = runs("test=data", "test.shuffled_epochs=1"), runs(), runs("labels=shuffled")
    assert data.states["weights"].is_unique
    assert list(data.states["weights"]) == [true_model.states["weights"][0], shuffled_model.states["weights"][0]]
    check_accuracy(data)
    logit, cascade = runs(checkpoint, "test=random_logit"), runs(checkpoint)
    assert list(logit.states["weights"]) == [cascade.states["weights"][0]] * 2  # one model, two classes
    assert logit.states["accuracy"].nunique() == 1 and logit.states["accuracy"][0] == cascade.states["accuracy"][0]
