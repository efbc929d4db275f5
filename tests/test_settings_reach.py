"""Every setting in conf/ reaches its effect: changing it changes what a run reports.

The table of effects (setting_effects.TABLE) is checked against the config tree itself:
every key of every file of conf/, and every option of every group, has an entry, so a
setting added without saying what it does fails here. Settings of the checks (`test.*`)
are flipped under each test option that has them (cascade, independent, data,
random_logit; sMPRT and eMPRT take their states from the cascade's code), since each
check reads its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from setting_effects import FASHION, FASHION_FILES, TABLE, Effect, Elsewhere, Inert, Refused, conf_files, leaves
from small_runs import GreyBatchNormNet, Runs, image_folder, trained_checkpoint

# What each test option needs besides its name to stay small
TEST_OPTIONS = {"cascade": (), "independent": ("test=independent",), "data": ("test=data", "test.shuffled_epochs=1",
                "test.shuffled_subset=100"), "random_logit": ("test=random_logit",),
                "smooth_cascade": ("test=smooth_cascade", "test.samples=2"), "entropy": ("test=entropy",)}
# sMPRT and eMPRT take their states from the cascade's code: its settings are flipped
# under cascade and independent only
FLIPPED_UNDER = ("cascade", "independent", "data", "random_logit")


def every_setting() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each key of the config tree -> the `test` options that have it ("" for settings
    outside `test`), with each option as a key (`model=mlp`); and each experiment's keys."""
    found: dict[str, set[str]] = {}
    experiments: dict[str, set[str]] = {}
    for group, option, values in conf_files():
        keys = {key for key, _ in leaves(values)}
        if group == "experiment":
            experiments[option] = keys
            continue
        for key in keys:
            found.setdefault(key, set()).add(option if group == "test" and key.startswith("test.") else "")
        if group:
            found[f"{group}={option}"] = {""}
    return found, experiments


SETTINGS, EXPERIMENTS = every_setting()


def cases(kind) -> list:
    """(setting, test option) of every entry of `kind`; `test.*` settings once per test option."""
    found = []
    for key, entry in sorted(TABLE.items()):
        if isinstance(entry, kind):
            options = sorted(SETTINGS.get(key, {""}) & set(FLIPPED_UNDER)) if key.startswith("test.") else []
            options = options if key != "test.name" and options else [""]
            found += [pytest.param(key, option, id=f"{key}[{option}]" if option else key) for option in options]
    return found


def test_every_setting_and_option_has_an_entry():
    missing = sorted(set(SETTINGS) - set(TABLE))
    assert not missing, f"settings without an entry in setting_effects.TABLE: {missing}"


def test_every_entry_names_a_setting():
    stale = sorted(set(TABLE) - set(SETTINGS))
    assert not stale, f"entries of setting_effects.TABLE for no setting of conf/: {stale}"


def test_experiments_only_set_existing_settings():
    for experiment, keys in EXPERIMENTS.items():
        assert keys <= set(SETTINGS), (experiment, sorted(keys - set(SETTINGS)))


@pytest.fixture
def runs(make_cfg, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.getbasetemp() / "runs", make_cfg)


@pytest.fixture
def places(runs) -> dict[str, str]:
    """What flips name: checkpoints and image folders, made once per session."""
    root = runs.root
    other, batch_norm = root / "other.pt", root / "batch_norm.pt"
    if not other.exists():
        state = torch.load(trained_checkpoint(runs), weights_only=True)
        state["conv1.weight"] = -state["conv1.weight"]
        torch.save(state, other)
        torch.manual_seed(0)
        torch.save(GreyBatchNormNet().state_dict(), batch_norm)
        image_folder(root / "folder", seed=0), image_folder(root / "other_folder", seed=1)
    return {"root": str(root), "checkpoint": str(trained_checkpoint(runs)), "other_checkpoint": str(other),
            "batch_norm_checkpoint": str(batch_norm), "folder": str(root / "folder"),
            "other_folder": str(root / "other_folder")}


def trained_weights(run) -> set[str]:
    """The fingerprints (states.csv) of the models a run explains unrandomized: the
    trained one, and the shuffled-label one of the data check."""
    states = run.states
    return set(states.loc[~(states["params_randomized"] > 0), "weights"])


def overrides(entry, option: str, places: dict[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The base run's overrides and the flipped run's, for a check's `option` when given."""
    base = (*TEST_OPTIONS[option], *entry.base) if option else entry.base
    fill = lambda items: tuple(item.format(**places) for item in items)  # noqa: E731
    return fill(base), fill((*base, *entry.flip))


@pytest.mark.parametrize(("key", "option"), cases(Effect))
def test_setting_reaches_its_effect(runs, places, key, option):
    entry = TABLE[key]
    if entry.needs and not Path(entry.needs).exists():
        pytest.skip(f"needs {entry.needs}")
    base, flipped = overrides(entry, option, places)
    before = runs(*base)
    after = runs(*flipped)
    entry.check(before, after)
    if entry.weights is not None:
        changed = trained_weights(before) != trained_weights(after)
        assert changed == entry.weights, f"{key} {'keeps' if entry.weights else 'changes'} the trained weights"


@pytest.mark.parametrize(("key", "option"), [case for case in cases(Inert) if TABLE[case.values[0]].flip])
def test_inert_setting_changes_nothing(runs, places, key, option):
    entry = TABLE[key]
    base, flipped = overrides(entry, option, places)
    before, after = runs(*base), runs(*flipped)
    assert before.results["value"].notna().any()
    key = ["seed", "step", "method", "metric", "image"]  # the order of rows is not a result (chunks of images)
    before_rows, after_rows = (run.results.sort_values(key).reset_index(drop=True) for run in (before, after))
    assert before_rows.drop(columns="value").equals(after_rows.drop(columns="value"))
    # batching and the device move float rounding only; a rank correlation may swap a near tie
    assert (before_rows["value"] - after_rows["value"]).abs().max() < 1e-3
    for state, maps in before.examples.items():  # kept in half precision: one step of it apart at most
        torch.testing.assert_close(torch.from_numpy(after.examples[state]), torch.from_numpy(maps), rtol=0,
                                   atol=1e-3 * float(abs(maps).max()) + 1e-12)


@pytest.mark.parametrize(("key", "option"), cases(Refused))
def test_setting_with_one_choice_refuses_others(runs, places, key, option):
    entry = TABLE[key]
    _, flipped = overrides(entry, option, places)
    assert entry.match in runs.error(*flipped)


@pytest.mark.skipif(not Path(FASHION_FILES).is_dir(), reason=f"needs {FASHION_FILES} (Debian's dataset-fashion-mnist)")
def test_seed_chooses_the_images_of_a_fixed_test_split(runs, places):
    """The digits' split follows the seed too; Fashion-MNIST's test split is fixed, so only
    the choice of images shows the seed: a balanced, seeded draw of one image per class."""
    chosen = [runs(*(item.format(**places) for item in (*FASHION, f"seed={seed}"))) for seed in (0, 1)]
    for run in chosen:
        assert sorted(run.results.drop_duplicates("image")["label"]) == list(range(10))
    assert set(chosen[0].image_ids).isdisjoint(chosen[1].image_ids)


def test_every_entry_says_why_it_has_no_run():
    for key, entry in TABLE.items():
        if isinstance(entry, (Inert, Elsewhere)):
            assert len(entry.reason) > 20, key
