"""What each setting of conf/ does to a run: the table that test_settings_reach.py and
test_cache_key.py walk.

Keys are dotted settings (`metrics.ssim.sigma`) and group options (`model=mlp`); the
entries of conf/experiment/ only set these. Every key of conf/'s files must have an
entry, so a setting added without one fails a test. An entry is one of:

* `Effect`: a run with `flip` reports something else than a run without it; `check`
  says what, in the direction or by the amount it should where that is cheap to know.
* `Inert`: the setting cannot change results (where things are kept, batching,
  progress); with a `flip`, a run with it reports the same values.
* `Refused`: every other value is refused with one line (a setting with one choice today).
* `Elsewhere`: too slow or needs what a test machine lacks here; the reason names
  where it is tested.

`weights`: whether a flip changes the weights of a model trained here, so that it must
train anew (True) or must reuse the cached model (False); None where either is right.
Flips may name {checkpoint} (a trained CNN state_dict), {other_checkpoint} (another
one), {batch_norm_checkpoint} (small_runs.GreyBatchNormNet's), {folder} and
{other_folder} (image folders of class sub-folders), {root}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from sanity_cli.cli import config_dir
from small_runs import CNN_BLOCKS, Run

KEY = ["seed", "step", "method", "image", "metric"]


@dataclass(frozen=True)
class Effect:
    flip: tuple[str, ...]
    check: Callable[[Run, Run], None]
    base: tuple[str, ...] = ()
    weights: bool | None = False
    needs: str | None = None  # a path that must exist (else the test skips, naming it)


@dataclass(frozen=True)
class Inert:
    reason: str
    flip: tuple[str, ...] = ()
    base: tuple[str, ...] = ()
    weights: bool | None = False


@dataclass(frozen=True)
class Refused:
    flip: tuple[str, ...]
    match: str
    base: tuple[str, ...] = ()
    weights: bool | None = None


@dataclass(frozen=True)
class Elsewhere:
    reason: str
    weights: bool | None = None


# --- the settings of conf/ -------------------------------------------------------------------


def conf_files() -> Iterator[tuple[str, str, dict]]:
    """(group, option, values placed where composing puts them) of every file of conf/;
    group "" for config.yaml. Reading the files is what composing each option would
    give here, at a fraction of the time."""
    root = config_dir()
    top = OmegaConf.to_container(OmegaConf.load(root / "config.yaml"), resolve=False)
    yield "", "config", {key: value for key, value in top.items() if key not in ("defaults", "hydra")}
    for folder in sorted(path for path in root.iterdir() if path.is_dir() and path.name != "hydra"):
        for file in sorted(folder.glob("*.yaml")):
            values = OmegaConf.to_container(OmegaConf.load(file), resolve=False) or {}
            values.pop("defaults", None)
            package = _package(file)
            if package is None and not values:  # a file of defaults only (method=paper)
                yield folder.name, file.stem, {}
                continue
            package = package or folder.name
            if package != "_global_":
                for part in reversed(package.split(".")):
                    values = {part: values}
            yield folder.name, file.stem, values


def _package(file) -> str | None:
    for line in file.read_text().splitlines():
        if line.startswith("# @package "):
            return line.removeprefix("# @package ").strip()
    return None


def leaves(node, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of a plain config; an empty mapping is a key of its own
    (`method.gradient: {}`)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif prefix:
        yield prefix[:-1], node


# --- what a run reports, and how two runs differ ------------------------------------------


def rows(run: Run) -> pd.DataFrame:
    return run.results.sort_values(KEY).reset_index(drop=True)


def same_values(a: Run, b: Run, atol: float = 1e-6) -> bool:
    x, y = rows(a), rows(b)
    return x[KEY].equals(y[KEY]) and np.allclose(x["value"], y["value"], rtol=0, atol=atol, equal_nan=True)


def values_differ(a: Run, b: Run) -> None:
    assert not same_values(a, b, atol=1e-9), "the run reports the same values"


def metric_differs(metric: str) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        x, y = (run.results[run.results["metric"] == metric].sort_values(KEY)["value"].to_numpy() for run in (a, b))
        assert len(x) and (len(x) != len(y) or not np.allclose(x, y, rtol=0, atol=1e-9, equal_nan=True)), metric

    return check


def maps_differ(method: str) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        states = sorted({(s, k) for s, k, m in a.examples if m == method})
        assert states, f"no maps of {method}"
        assert any(a.examples[(*state, method)].shape != b.examples[(*state, method)].shape
                   or not np.allclose(a.examples[(*state, method)], b.examples[(*state, method)], rtol=0, atol=1e-6)
                   for state in states), f"{method}'s maps are the same"

    return check


def blocks(run: Run) -> list[str]:
    return list(run.states.drop_duplicates("step")["block"])


def blocks_are(expected: list[str]) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        assert blocks(b) == ["original", *expected], blocks(b)
        assert blocks(a) != blocks(b), blocks(a)

    return check


def summary_value(run: Run, column: str, step: int = 0) -> float:
    return float(run.summary.loc[run.summary["step"] == step, column].iloc[0])


def trained(model: str = "trained") -> Callable[[Run], float]:
    return lambda run: run.info["models"][model]["train_accuracy"]


def lower(measure: Callable[[Run], float]) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        assert measure(b) < measure(a), (measure(a), measure(b))

    return check


def differs(measure: Callable[[Run], float]) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        assert measure(b) != measure(a), measure(a)

    return check


def higher(measure: Callable[[Run], float]) -> Callable[[Run, Run], None]:
    return lambda a, b: lower(measure)(b, a)


def all_of(*checks: Callable[[Run, Run], None]) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        for one in checks:
            one(a, b)

    return check


def verdicts(run: Run) -> pd.DataFrame:
    path = run.dir / "verdict.csv"
    assert path.is_file(), "the run wrote no verdict.csv"
    return pd.read_csv(path)


def decided_by(metric: str) -> Callable[[Run, Run], None]:
    """verdict.csv has a row per metric; the verdict's metric is the one that decides."""

    def check(a: Run, b: Run) -> None:
        deciding = [set(verdicts(run).loc[verdicts(run)["decides"], "metric"]) for run in (a, b)]
        assert deciding[1] == {metric} != deciding[0], deciding

    return check


def verdict_column(column: str, value) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        assert (verdicts(b)[column] == value).all() and not (verdicts(a)[column] == value).all()

    return check


# --- checks with a direction or an amount --------------------------------------------------


def images_per_state(run: Run) -> int:
    return int(run.results.groupby(["seed", "step", "method", "metric"]).size().iloc[0])


def other_images(a: Run, b: Run) -> None:
    assert set(a.results["image"]) != set(b.results["image"])
    values_differ(a, b)


def six_images(a: Run, b: Run) -> None:
    assert (images_per_state(a), images_per_state(b)) == (8, 6)


def three_examples(a: Run, b: Run) -> None:
    assert {len(m) for m in a.examples.values()} == {8} and {len(m) for m in b.examples.values()} == {3}


def explains_the_labels(a: Run, b: Run) -> None:
    assert (b.results["target"] == b.results["label"]).all()
    assert not (a.results["target"] == a.results["label"]).all()


def learns_no_classes(a: Run, b: Run) -> None:
    accuracy = [summary_value(run, "test_accuracy") for run in (a, b)]
    assert accuracy[0] > 0.6 and accuracy[1] < 0.3, accuracy


def half_of_the_images(a: Run, b: Run) -> None:
    """The shard's rows are the full run's rows of its images, and it has half of them."""
    mine = set(b.results["image"])
    assert len(mine) == 4 and mine < set(a.results["image"]), sorted(mine)
    pd.testing.assert_frame_equal(rows(b)[[*KEY, "target", "value"]],
                                  rows(a)[rows(a)["image"].isin(mine)].reset_index(drop=True)[[*KEY, "target",
                                                                                                "value"]])


def only_spearman_abs(a: Run, b: Run) -> None:
    assert set(b.results["metric"]) == {"spearman_abs"} and len(set(a.results["metric"])) > 1


def ssim_nearer_1(a: Run, b: Run) -> None:
    """SSIM's constants grow with data_range**2: every score moves towards 1."""
    distance = [(1 - run.rows(metric="ssim").query("step > 0")["value"]).abs().mean() for run in (a, b)]
    assert distance[1] < distance[0], distance


def hog_defined(a: Run, b: Run) -> None:
    """12x12 maps hold no 16x16 HOG cell: NaN; 4x4 cells: finite scores."""
    assert a.rows(metric="hog")["value"].isna().all() and b.rows(metric="hog")["value"].notna().all()


def only_gradcam_changes(a: Run, b: Run) -> None:
    maps_differ("gradcam")(a, b)


def not_trained_here(a: Run, b: Run) -> None:
    assert trained()(a) is not None and trained()(b) is None
    values_differ(a, b)


def sixteen_pixels(a: Run, b: Run) -> None:
    assert {m.shape[-1] for m in a.examples.values()} == {12} and {m.shape[-1] for m in b.examples.values()} == {16}


def named(column: str, value: str) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        assert set(b.results[column]) == {value} and set(a.results[column]) != {value}

    return check


def two_seeds(a: Run, b: Run) -> None:
    assert set(a.results["seed"]) == {0} and set(b.results["seed"]) == {0, 1}


def entropy_at_most_log_10(a: Run, b: Run) -> None:
    entropy = [run.rows(metric="entropy")["value"] for run in (a, b)]
    assert (entropy[1] <= np.log(10) + 1e-9).all() and entropy[0].max() > np.log(10)


def smoothgrad_is_the_gradient(a: Run, b: Run) -> None:
    for state in {(s, k) for s, k, _ in b.examples}:
        np.testing.assert_allclose(b.examples[(*state, "smoothgrad")], b.examples[(*state, "gradient")], atol=1e-6)
    maps_differ("smoothgrad")(a, b)


def vargrad_is_zero(a: Run, b: Run) -> None:
    assert all(not m.any() for (_, _, method), m in b.examples.items() if method == "vargrad")
    maps_differ("vargrad")(a, b)


def smoothgrad_squared(a: Run, b: Run) -> None:
    assert all((m >= 0).all() for (_, _, method), m in b.examples.items() if method == "smoothgrad")
    maps_differ("smoothgrad")(a, b)


def memorization_warning(a: Run, b: Run) -> None:
    said = [any("not memorized" in line for line in run.warnings) for run in (a, b)]
    assert said == [True, False], said


def only_the_shuffled_model(a: Run, b: Run) -> None:
    """The true-label model (step 0) is the same; the shuffled-label one (step 1) is another."""
    weights = [[run.states.loc[run.states["step"] == step, "weights"].tolist() for step in (0, 1)] for run in (a, b)]
    assert weights[0][0] == weights[1][0] and weights[0][1] != weights[1][1], weights


def batch_norm_statistics(a: Run, b: Run) -> None:
    """Only the randomized states change: step 0 is the trained model either way."""
    values_differ(a, b)
    first = [rows(run)[rows(run)["step"] == 0][[*KEY, "value"]].reset_index(drop=True) for run in (a, b)]
    pd.testing.assert_frame_equal(*first)


def narrower_interval(a: Run, b: Run) -> None:
    width = [(verdicts(run)["ci_high"] - verdicts(run)["ci_low"]).mean() for run in (a, b)]
    assert width[1] < width[0], width


def other_interval(a: Run, b: Run) -> None:
    # 200, or ten times as many where an end came within its Monte Carlo error of the threshold
    assert verdicts(b)["resamples"].isin([200, 2000, 20000]).all() and (verdicts(b)["resamples"] == 200).any()
    assert not np.allclose(verdicts(a)["ci_low"], verdicts(b)["ci_low"])


def one_class(a: Run, b: Run) -> None:
    assert len(set(b.results["label"])) == 1 < len(set(a.results["label"]))


def methods_are(expected: set[str]) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        assert set(b.results["method"]) == expected and {m for _, _, m in b.examples} == expected

    return check


def test_named(name: str) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        assert set(b.results["test"]) == {name}

    return check


def mask_share(run: Run) -> float:
    """The share of the image that test=spurious's artifact mask (step 2) covers."""
    return float(np.mean([maps.mean() for (_, step, _), maps in run.examples.items() if step == 2]))


def kssd_gain(run: Run, column: str = "mean", method: str = "gradient"):
    table = verdicts(run)
    return table.loc[(table["block"] == "K-SSD gain") & (table["method"] == method), column].iloc[0]


def not_valid_above(margin: float) -> Callable[[Run, Run], None]:
    """Every verdict of b is `not valid`, its note naming the margin the spurious score missed."""
    def check(a: Run, b: Run) -> None:
        decided = verdicts(b)[verdicts(b)["decides"]]
        assert (decided["verdict"] == "not valid").all(), decided["verdict"].tolist()
        assert decided["note"].str.contains(f"not above {margin:g}").all()
        assert not verdicts(a)["note"].fillna("").str.contains(f"not above {margin:g}").any()

    return check


def detect_threshold(value: float) -> Callable[[Run, Run], None]:
    """The K-SSD gain is judged against the new margin: far below any gain, the gradient detects."""
    def check(a: Run, b: Run) -> None:
        assert kssd_gain(b, "threshold") == value != kssd_gain(a, "threshold")
        assert kssd_gain(b, "outcome") == "detects"
        assert kssd_gain(b, "outcome", "edge") == "does not detect"  # a control never detects

    return check


# --- the table -------------------------------------------------------------------------

def step_1_mean(metric: str) -> Callable[[Run], float]:
    """The mean of one metric at step 1 (test=manifold: the reconstruction R^2, sqrt(k/d))."""
    return lambda run: float(run.rows(step=1, metric=metric)["value"].mean())


def chance_fraction_is(value: float) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        assert np.isclose(step_1_mean("chance_fraction")(b), value), step_1_mean("chance_fraction")(b)
        assert not np.isclose(step_1_mean("chance_fraction")(a), value)

    return check


def threshold_rises_by(amount: float) -> Callable[[Run, Run], None]:
    def check(a: Run, b: Run) -> None:
        rise = verdicts(b)["threshold"].iloc[0] - verdicts(a)["threshold"].iloc[0]
        assert np.isclose(rise, amount), rise

    return check


def all_not_valid(a: Run, b: Run) -> None:
    assert (verdicts(b)["verdict"] == "not valid").all() and not (verdicts(a)["verdict"] == "not valid").any()


def exact_manifold(a: Run, b: Run) -> None:
    """The exact decoder of the decoded images: 4 latent dimensions, perfect reconstructions."""
    assert np.isclose(step_1_mean("reconstruction_r2")(b), 1.0) and step_1_mean("reconstruction_r2")(a) < 0.999
    chance_fraction_is((4 / 144) ** 0.5)(a, b)


HOG = ("metrics.names=[spearman_abs,hog]",)  # the verdict's metric stays among the names
HOG4 = (*HOG, "metrics.hog.pixels_per_cell=4")
SMOOTH = ("method=[gradient,smoothgrad]", "method.smoothgrad.samples=2")
VAR = ("method=[vargrad]", "method.vargrad.samples=2")
DATA = ("test=data", "test.shuffled_epochs=1", "test.shuffled_subset=100")
ENTROPY = ("test=entropy",)
SPURIOUS = ("test=spurious", "method=[gradient,edge]")
STRIPES = (*SPURIOUS, "test.artifact=stripes")
BLUR = (*SPURIOUS, "test.artifact=blur")
SMOOTH_CASCADE = ("test=smooth_cascade", "test.samples=2")
MANIFOLD = ("test=manifold", "test.vae_epochs=10", "method=[gradient]")
DECODED = (*MANIFOLD, "dataset=decoded")
# A small CNN with batch norm of the tests' own, as a user's model (model=custom); at
# Adam 1e-3 one epoch leaves it near chance, and such a model is never cached
CUSTOM = ("model=custom", "model._target_=small_runs.BatchNormNet", "train.lr=0.01")
# A timm ViT of random weights on scikit-image's photos: two images, one block randomized
TIMM = ("model=timm", "model.name=test_vit", "model.pretrained=false", "dataset=samples", "n_images=2",
        "n_examples=2", "test.granularity=[head]")
# Debian's Fashion-MNIST (dataset-fashion-mnist): a fixed test split of 10,000 images
FASHION_FILES = "/usr/share/datasets/fashion-mnist"
FASHION = ("dataset=fashion_mnist", "model=custom", "model._target_=small_runs.GreyBatchNormNet",
           "model.checkpoint={batch_norm_checkpoint}", "n_images=10", "n_examples=10")
FOLDER = ("dataset=imagefolder", "dataset.path={folder}", "model=custom", "model._target_=small_runs.GreyBatchNormNet",
          "model.checkpoint={batch_norm_checkpoint}", "model.channels=1", "model.input_size=12", "n_images=4",
          "n_examples=4")
CAPTUM = ("method=[captum]", "method.captum.attribution=Saliency")
LRP = ("method=[lrp]",)
CALLABLE = ("method=[callable]", "method.callable._target_=small_runs.input_map")

TOP = {
    "seed": Effect(("seed=1",), other_images, weights=True),
    "device": Inert("where the run computes: results agree to float precision; a model trained on a GPU is "
                    "cached apart (test_cache_key.py, on a machine with a GPU)", weights=True),
    "n_images": Effect(("n_images=6",), six_images),
    "n_examples": Effect(("n_examples=3",), three_examples),
    "target": Effect(("target=label",), explains_the_labels),
    "labels": Effect(("labels=shuffled",), learns_no_classes, weights=True),
    "max_batch": Inert("how many inputs share one forward pass", ("max_batch=3",), base=("target=original",)),
    "batch": Inert("which batch up to max_batch the passes take, measured (test_batching.py)",
                   ("batch=auto", "max_batch=16"), base=("target=original",)),
    "image_chunk": Inert("how many images' maps are held at once; a run in chunks writes the same numbers "
                         "up to float rounding (test_chunks.py)", ("image_chunk=3",)),
    "reuse_activations": Inert("keeps the trained blocks' activations for later states; the maps are those of "
                               "plain passes (test_reuse.py)", ("reuse_activations=64",)),
    "resume": Inert("continues an interrupted run in its directory (test_pipeline.py); a new one runs as usual",
                    ("resume=true",)),
    "shard": Effect(("shard=1/2",), half_of_the_images),
    "data_dir": Inert("where datasets are downloaded and unpacked", ("data_dir={root}/other_data",)),
    "cache_dir": Inert("where trained models are kept: one trained again elsewhere is the same",
                       ("cache_dir={root}/other_cache",), weights=None),
}

METRICS = {
    "metrics.names": Effect(("metrics.names=[spearman_abs]",), only_spearman_abs),
    "metrics.normalization": Effect(("metrics.normalization=max_abs",), metric_differs("ssim")),
    "metrics.ssim.data_range": Effect(("metrics.ssim.data_range=20",), ssim_nearer_1),
    "metrics.ssim.sigma": Effect(("metrics.ssim.sigma=0.8",), metric_differs("ssim")),
    "metrics.ssim.sample_covariance": Effect(("metrics.ssim.sample_covariance=false",), metric_differs("ssim")),
    "metrics.hog.pixels_per_cell": Effect(("metrics.hog.pixels_per_cell=4",), hog_defined,
                                          base=HOG),
    "metrics.hog.cells_per_block": Effect(("metrics.hog.cells_per_block=2",), metric_differs("hog"), base=HOG4),
    "metrics.hog.orientations": Effect(("metrics.hog.orientations=4",), metric_differs("hog"), base=HOG4),
}

TRAIN = {
    "train.epochs": Effect(("train.epochs=3",), higher(trained()), weights=True),
    "train.batch_size": Effect(("train.batch_size=100",), all_of(values_differ, lower(trained())), weights=True),
    "train.lr": Effect(("train.lr=0.0002",), lower(trained()), weights=True),
    "train.optimizer": Refused(("train.optimizer=sgd",), "optimizer"),
}

MODEL = {
    "model.kind": Effect(("model.kind=mlp",), blocks_are(["fc4", "fc3", "fc2", "fc1"]), weights=True),
    "model.name": Effect(("model.name=small_cnn",), named("model", "small_cnn"), weights=None),
    "model.init": Effect(("model.init=paper",), values_differ, weights=True),
    "model.pretrained": Refused(("model.pretrained=true",), "pretrained weights", base=TIMM),
    "model.checkpoint": Effect(("model.checkpoint={other_checkpoint}",), not_trained_here, weights=None),
    "model.gradcam_layer": Effect(("model.gradcam_layer=relu1",), only_gradcam_changes, base=("method=[gradcam]",)),
    "model._target_": Effect(("model._target_=small_runs.WideBatchNormNet",), values_differ, base=CUSTOM,
                             weights=True),
    "model.channels": Effect(("model.channels=3",), values_differ, base=CUSTOM, weights=True),
    "model.input_size": Effect(("model.input_size=16",), sixteen_pixels, base=CUSTOM, weights=True),
    "model.mean": Effect(("model.mean=0.5",), values_differ, base=CUSTOM, weights=True),
    "model.std": Effect(("model.std=0.5",), values_differ, base=CUSTOM, weights=True),
}

DATASET = {
    "dataset.name": Inert("the dataset's name in the results; which data is loaded is its group option "
                          "(dataset=...) or `kind`"),
    "dataset.kind": Inert("which loader reads a dataset=custom: only `custom` is valid there"),
    "dataset.image_size": Effect(("dataset.image_size=16",), sixteen_pixels, weights=True),
    "dataset.test_fraction": Effect(("dataset.test_fraction=0.3",), all_of(other_images, higher(trained())),
                                    weights=True),
    "dataset.path": Effect(("dataset.path={other_folder}",), values_differ, base=FOLDER),
    "dataset.classes": Effect(("dataset.classes=1",), one_class, base=FOLDER),
    "dataset.system_dir": Inert("where a system copy of Fashion-MNIST lies: the same files give the same data"),
    "dataset._target_": Elsewhere("dataset=custom: tests/test_plugins.py and test_example.py"),
    "dataset.train_split": Elsewhere("dataset=custom: tests/test_plugins.py and test_example.py"),
    "dataset.train_split._target_": Elsewhere("dataset=custom's training split (dataset=decoded names one): "
                                              "tests/test_plugins.py and tests/test_manifold.py"),
}


METHOD = {
    "method.gradient": Effect(("method=[gradient]",), methods_are({"gradient"}), base=("method=[random]",)),
    "method.input_x_gradient": Effect(("method=[input_x_gradient]",), methods_are({"input_x_gradient"})),
    "method.guided_backprop": Effect(("method=[guided_backprop]",), methods_are({"guided_backprop"})),
    "method.edge.detector": Effect(("method.edge.detector=canny",), maps_differ("edge"), base=("method=[edge]",)),
    "method.edge.sigma": Effect(("method.edge.sigma=2.0",), maps_differ("edge"),
                                base=("method=[edge]", "method.edge.detector=canny")),
    "method.gradcam.layer": Effect(("method.gradcam.layer=relu1",), maps_differ("gradcam"), base=("method=[gradcam]",)),
    "method.gradcam.interpolation": Effect(("method.gradcam.interpolation=nearest",), maps_differ("gradcam"),
                                           base=("method=[gradcam]",)),
    "method.guided_gradcam.layer": Effect(("method.guided_gradcam.layer=relu1",), maps_differ("guided_gradcam"),
                                          base=("method=[guided_gradcam]",)),
    "method.guided_gradcam.interpolation": Effect(("method.guided_gradcam.interpolation=nearest",),
                                                  maps_differ("guided_gradcam"), base=("method=[guided_gradcam]",)),
    "method.integrated_gradients.steps": Effect(("method.integrated_gradients.steps=2",),
                                                maps_differ("integrated_gradients"),
                                                base=("method=[integrated_gradients]",)),
    "method.integrated_gradients.baseline": Effect(("method.integrated_gradients.baseline=0.5",),
                                                   maps_differ("integrated_gradients"),
                                                   base=("method=[integrated_gradients]",)),
    "method.integrated_gradients.rule": Effect(("method.integrated_gradients.rule=riemann_trapezoid",),
                                               maps_differ("integrated_gradients"),
                                               base=("method=[integrated_gradients]",)),
    "method.random.seed": Effect(("method.random.seed=3",), maps_differ("random"), base=("method=[random]",)),
    "method.smoothgrad.base": Effect(("method.smoothgrad.base=input_x_gradient",), maps_differ("smoothgrad"),
                                     base=SMOOTH),
    "method.smoothgrad.base_options": Effect(("+method.smoothgrad.base_options.layer=relu1",),
                                             maps_differ("smoothgrad"),
                                             base=(*SMOOTH, "method.smoothgrad.base=gradcam")),
    "method.smoothgrad.noise": Effect(("method.smoothgrad.noise=0",), smoothgrad_is_the_gradient, base=SMOOTH),
    "method.smoothgrad.samples": Effect(("method.smoothgrad.samples=3",), maps_differ("smoothgrad"), base=SMOOTH),
    "method.smoothgrad.square": Effect(("method.smoothgrad.square=true",), smoothgrad_squared, base=SMOOTH),
    "method.smoothgrad.seed": Effect(("method.smoothgrad.seed=4",), maps_differ("smoothgrad"), base=SMOOTH),
    "method.vargrad.base": Effect(("method.vargrad.base=input_x_gradient",), maps_differ("vargrad"), base=VAR),
    "method.vargrad.base_options": Effect(("+method.vargrad.base_options.layer=relu1",), maps_differ("vargrad"),
                                          base=(*VAR, "method.vargrad.base=gradcam")),
    "method.vargrad.noise": Effect(("method.vargrad.noise=0",), vargrad_is_zero, base=VAR),
    "method.vargrad.samples": Effect(("method.vargrad.samples=3",), maps_differ("vargrad"), base=VAR),
    "method.vargrad.seed": Effect(("method.vargrad.seed=4",), maps_differ("vargrad"), base=VAR),
    "method.captum.method": Inert("names the plug-in kind of the entry (captum)"),
    "method.captum.attribution": Effect(("method.captum.attribution=InputXGradient",), maps_differ("captum"),
                                        base=CAPTUM),
    "method.captum.kwargs": Effect(("+method.captum.kwargs.multiply_by_inputs=false",), maps_differ("captum"),
                                   base=("method=[captum]", "method.captum.attribution=IntegratedGradients")),
    "method.captum.attribute_kwargs": Effect(("+method.captum.attribute_kwargs.abs=false",), maps_differ("captum"),
                                             base=CAPTUM),
    "method.captum.layer": Effect(("method.captum.layer=relu1",), maps_differ("captum"),
                                  base=("method=[captum]", "method.captum.attribution=LayerGradCam")),
    "method.captum.baselines": Effect(("method.captum.baselines=0.5",), maps_differ("captum"),
                                      base=("method=[captum]", "method.captum.attribution=IntegratedGradients")),
    "method.captum.base": Effect(("method.captum.base=InputXGradient",), maps_differ("captum"),
                                 base=("method=[captum]", "method.captum.attribution=NoiseTunnel",
                                       "method.captum.base=Saliency", "+method.captum.attribute_kwargs.nt_samples=2")),
    "method.captum.base_kwargs": Elsewhere("the arguments of NoiseTunnel's wrapped class: no class that NoiseTunnel "
                                           "wraps here takes any; tests/test_external_methods.py"),
    "method.captum.interpolation": Effect(("method.captum.interpolation=nearest",), maps_differ("captum"),
                                          base=("method=[captum]", "method.captum.attribution=LayerGradCam")),
    "method.captum.seed": Effect(("method.captum.seed=4",), maps_differ("captum"),
                                 base=("method=[captum]", "method.captum.attribution=NoiseTunnel",
                                       "method.captum.base=Saliency", "+method.captum.attribute_kwargs.nt_samples=2")),
    "method.lrp.method": Inert("names the plug-in kind of the entry (lrp)"),
    "method.lrp.composite": Effect(("method.lrp.composite=EpsilonAlpha2Beta1Flat",), maps_differ("lrp"), base=LRP),
    "method.lrp.composite_kwargs": Effect(("+method.lrp.composite_kwargs.epsilon=10.0",), maps_differ("lrp"),
                                          base=LRP),
    "method.lrp.canonizers": Effect(("method.lrp.canonizers=[SequentialMergeBatchNorm]",), maps_differ("lrp"),
                                    base=(*LRP, *CUSTOM)),
    "method.callable.method": Inert("names the plug-in kind of the entry (callable)"),
    "method.callable._target_": Effect(("method.callable._target_=small_runs.squared_input_map",),
                                       maps_differ("callable"), base=CALLABLE),
    "method.attention_rollout.head_fusion": Effect(("method.attention_rollout.head_fusion=max",),
                                                   maps_differ("attention_rollout"),
                                                   base=(*TIMM, "method=[attention_rollout]")),
    "method.attention_rollout.interpolation": Effect(("method.attention_rollout.interpolation=nearest",),
                                                     maps_differ("attention_rollout"),
                                                     base=(*TIMM, "method=[attention_rollout]")),
    "method.chefer.interpolation": Effect(("method.chefer.interpolation=nearest",), maps_differ("chefer"),
                                          base=(*TIMM, "method=[chefer]")),
}

# Settings of the checks: flipped under every test option that has them (see `under`).
TEST = {
    "test.name": Effect(("test.name=independent",), all_of(test_named("independent"), maps_differ("gradient"))),
    "test.granularity": Effect(("test.granularity=[fc2]",), blocks_are(["fc2"])),
    "test.order": Effect(("test.order=bottom_up",), blocks_are(list(reversed(CNN_BLOCKS)))),
    "test.init": Effect(("test.init=default",), values_differ),
    "test.reset_bn_stats": Effect(("test.reset_bn_stats=true",), batch_norm_statistics, base=CUSTOM),
    "test.seeds": Effect(("test.seeds=[0,1]",), two_seeds),
    "test.shuffled_epochs": Effect(("test.shuffled_epochs=40",), higher(trained("shuffled")), base=DATA,
                                   weights=True),
    "test.shuffled_subset": Effect(("test.shuffled_subset=300",), all_of(values_differ, differs(trained("shuffled"))),
                                   base=DATA, weights=True),
    "test.shuffled_lr": Effect(("test.shuffled_lr=0.01",), all_of(values_differ, only_the_shuffled_model), base=DATA,
                               weights=True),
    "test.memorization_threshold": Effect(("test.memorization_threshold=0.0",), memorization_warning, base=DATA),
    "test.artifact": Effect(("test.artifact=stripes",), all_of(values_differ, higher(mask_share)), base=SPURIOUS,
                            weights=True),
    "test.aligned_class": Effect(("test.aligned_class=3",), values_differ, base=SPURIOUS, weights=True),
    "test.rate": Effect(("test.rate=0.3",), values_differ, base=SPURIOUS, weights=True),
    "test.tag_size": Effect(("test.tag_size=0.5",), all_of(values_differ, higher(mask_share)), base=SPURIOUS,
                            weights=True),
    "test.tag_position": Effect(("test.tag_position=random",), all_of(values_differ, maps_differ("gradient")),
                                base=SPURIOUS, weights=True),
    "test.tag_value": Effect(("test.tag_value=0.5",), values_differ, base=SPURIOUS, weights=True),
    "test.stripes_period": Effect(("test.stripes_period=2",), higher(mask_share), base=STRIPES, weights=True),
    "test.stripes_strength": Effect(("test.stripes_strength=0.3",), values_differ, base=STRIPES, weights=True),
    "test.blur_sigma": Effect(("test.blur_sigma=2.0",), values_differ, base=BLUR, weights=True),
    "test.reliance_margin": Effect(("test.reliance_margin=1.0",), not_valid_above(1.0), base=SPURIOUS),
    "test.detect_margin": Effect(("test.detect_margin=-1.9",), detect_threshold(-1.9), base=SPURIOUS),
    "test.bins": Effect(("test.bins=10",), entropy_at_most_log_10, base=ENTROPY),
    "test.samples": Effect(("test.samples=3",), values_differ, base=SMOOTH_CASCADE),
    "test.noise": Effect(("test.noise=0",), values_differ, base=SMOOTH_CASCADE),  # equal to the cascade's: e2e
    "test.latent_dim": Effect(("test.latent_dim=3",), chance_fraction_is((3 / 144) ** 0.5), base=MANIFOLD),
    "test.vae_epochs": Effect(("test.vae_epochs=1",), lower(step_1_mean("reconstruction_r2")), base=MANIFOLD),
    "test.vae_lr": Effect(("test.vae_lr=0.0001",), lower(step_1_mean("reconstruction_r2")), base=MANIFOLD),
    "test.margin": Effect(("test.margin=0.3",), threshold_rises_by(0.25), base=MANIFOLD),
    "test.min_reconstruction": Effect(("test.min_reconstruction=1.0",), all_not_valid, base=MANIFOLD),
    "test.decoder._target_": Effect(("test.decoder._target_=sanity_cli.manifold.exact_decoder",), exact_manifold,
                                    base=DECODED),
    "test.decoder.checkpoint": Elsewhere("the weights of a user's decoder: tests/test_manifold.py loads a flipped "
                                         "checkpoint into the exact decoder"),
}

VERDICT = {
    "verdict.metric": Effect(("verdict.metric=spearman",), decided_by("spearman")),
    "verdict.threshold": Effect(("verdict.threshold=0.9",), verdict_column("threshold", 0.9)),
    "verdict.rise_threshold": Effect(("verdict.rise_threshold=0.5",), verdict_column("threshold", 0.5),
                                     base=ENTROPY),
    "verdict.level": Effect(("verdict.level=0.5",), narrower_interval),
    "verdict.resamples": Effect(("verdict.resamples=200",), other_interval),
}

GROUPS = {
    "model=cnn": Effect(("model=cnn",), values_differ, base=("model=mlp",), weights=True),
    "model=mlp": Effect(("model=mlp",), blocks_are(["fc4", "fc3", "fc2", "fc1"]), weights=True),
    "model=timm": Effect(TIMM, named("model", "test_vit"), weights=None),
    "model=custom": Effect(CUSTOM, named("model", "custom"), weights=True),
    "model=inception_v3": Elsewhere("needs the ImageNet weights and 299x299 images; its 17 blocks: "
                                    "tests/test_architectures.py; the paper rerun: tests/test_paper.py"),
    "dataset=digits": Inert("the default dataset of every run here"),
    "dataset=samples": Effect(TIMM, named("dataset", "samples"), weights=None),
    "dataset=imagefolder": Effect(FOLDER, named("dataset", "imagefolder"), weights=None),
    "dataset=fashion_mnist": Effect(FASHION, named("dataset", "fashion_mnist"), weights=None, needs=FASHION_FILES),
    "dataset=mnist": Elsewhere("downloaded at run time: tests/test_data.py reads a local copy"),
    "dataset=cifar10": Elsewhere("downloaded at run time: tests/test_data.py reads a local copy"),
    "dataset=custom": Elsewhere("tests/test_plugins.py and tests/test_example.py"),
    "method=paper": Effect(("method=paper",), methods_are({"gradient", "input_x_gradient", "integrated_gradients",
                                                           "guided_backprop", "gradcam", "guided_gradcam",
                                                           "smoothgrad", "vargrad", "edge", "random"})),
    "test=cascade": Effect(("test=cascade",), test_named("cascade"), base=("test=independent",)),
    "test=independent": Effect(("test=independent",), test_named("independent")),
    "test=data": Effect(DATA, test_named("data"), weights=None),
    "test=random_logit": Effect(("test=random_logit",), test_named("random_logit")),
    "test=smooth_cascade": Effect(SMOOTH_CASCADE, test_named("smooth_cascade")),
    "test=entropy": Effect(ENTROPY, test_named("entropy")),
    "test=spurious": Effect(SPURIOUS, test_named("spurious"), weights=None),
    "test=manifold": Effect(MANIFOLD, test_named("manifold")),
    "dataset=decoded": Effect(DECODED, named("dataset", "decoded"), weights=None),
}
for _method in ("gradient", "input_x_gradient", "guided_backprop", "integrated_gradients", "gradcam",
                "guided_gradcam", "smoothgrad", "vargrad", "edge", "random"):
    GROUPS[f"method={_method}"] = Effect((f"method=[{_method}]",), methods_are({_method}),
                                         base=("method=[random]",) if _method == "gradient" else ())
GROUPS["method=captum"] = Effect(CAPTUM, methods_are({"captum"}))
GROUPS["method=lrp"] = Effect(LRP, methods_are({"lrp"}))
GROUPS["method=callable"] = Effect(CALLABLE, methods_are({"callable"}))
GROUPS["method=attention_rollout"] = Effect((*TIMM, "method=[attention_rollout]"), methods_are({"attention_rollout"}),
                                           weights=None)
GROUPS["method=chefer"] = Effect((*TIMM, "method=[chefer]"), methods_are({"chefer"}), weights=None)

TABLE: dict[str, Effect | Inert | Refused | Elsewhere] = {**TOP, **METRICS, **TRAIN, **MODEL, **DATASET, **METHOD,
                                                         **TEST, **VERDICT, **GROUPS}
