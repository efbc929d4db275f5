"""Every setting in conf/ reaches its effect: changing it changes what a run reports.

The table of effects (setting_effects.TABLE) is checked against the config tree itself:
every key of every composed option of every group, and every option, has an entry,
so a setting added without saying what it does fails here. Settings of the checks
(`test.*`) are flipped under every test option that has them, since each check reads
its own.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sanity_cli.cli import config_dir
from setting_effects import TABLE, Effect, Elsewhere, Inert, Refused
from small_runs import GreyBatchNormNet, Runs, image_folder, trained_checkpoint

SKIPPED_GROUPS = ("hydra",)
# What each test option needs besides its name to stay small
TEST_OPTIONS = {"cascade": (), "independent": ("test=independent",), "data": ("test=data", "test.shuffled_epochs=1",
                "test.shuffled_subset=100"), "random_logit": ("test=random_logit",),
                "smooth_cascade": ("test=smooth_cascade", "test.samples=2"), "entropy": ("test=entropy",)}


def groups() -> dict[str, list[str]]:
    root = config_dir()
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir())
            if d.is_dir() and d.name not in SKIPPED_GROUPS}


def option_override(group: str, option: str) -> str:
    return f"+experiment={option}" if group == "experiment" else f"{group}={option}"


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def leaves(node, prefix: str = ""):
    """Dotted keys of a plain config; an empty mapping is a key of its own (`method.gradient: {}`)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


def settings_of(group: str, option: str) -> set[str]:
    return set(leaves(OmegaConf.to_container(composed([option_override(group, option)]), resolve=False)))


def every_setting() -> dict[str, set[str]]:
    """Each key of the config tree -> the `test` options that have it ("" for settings outside `test`)."""
    found: dict[str, set[str]] = {}
    for group, options in groups().items():
        for option in options:
            for key in settings_of(group, option):
                found.setdefault(key, set()).add(option if group == "test" and key.startswith("test.") else "")
            if group != "experiment":
                found[f"{group}={option}"] = {""}
    return found


SETTINGS = every_setting()
EXPERIMENTS = {f"+experiment={name}" for name in groups().get("experiment", [])}


def cases(kind) -> list:
    """(setting, test option) of every entry of `kind`; `test.*` settings once per test option."""
    found = []
    for key, entry in sorted(TABLE.items()):
        if isinstance(entry, kind):
            options = sorted(SETTINGS.get(key, {""}) - {""}) if key.startswith("test.") and key != "test.name" else [""]
            found += [pytest.param(key, option, id=f"{key}[{option}]" if option else key) for option in options]
    return found


def test_every_setting_and_option_has_an_entry():
    missing = sorted(set(SETTINGS) - set(TABLE))
    assert not missing, f"settings without an entry in setting_effects.TABLE: {missing}"


def test_every_entry_names_a_setting():
    stale = sorted(set(TABLE) - set(SETTINGS))
    assert not stale, f"entries of setting_effects.TABLE for no setting of conf/: {stale}"


def test_experiments_only_set_existing_settings():
    for experiment in EXPERIMENTS:
        keys = set(leaves(OmegaConf.to_container(composed([experiment]), resolve=False)))
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
    assert before.results.drop(columns="value").equals(after.results.drop(columns="value"))
    # batching and the device move float rounding only; a rank correlation may swap a near tie
    assert (before.results["value"] - after.results["value"]).abs().max() < 1e-3
    for state, maps in before.examples.items():  # kept in half precision: one step of it apart at most
        torch.testing.assert_close(torch.from_numpy(after.examples[state]), torch.from_numpy(maps), rtol=0,
                                   atol=1e-3 * float(abs(maps).max()) + 1e-12)


@pytest.mark.parametrize(("key", "option"), cases(Refused))
def test_setting_with_one_choice_refuses_others(runs, places, key, option):
    entry = TABLE[key]
    _, flipped = overrides(entry, option, places)
    assert entry.match in runs.error(*flipped)


def test_every_entry_says_why_it_has_no_run():
    for key, entry in TABLE.items():
        if isinstance(entry, (Inert, Elsewhere)):
            assert len(entry.reason) > 20, key
