"""Every numeric setting is refused just outside its range and accepted just inside it.

Driven by the table that validation uses (`validation.NUMBERS`, `INCLUSIVE`, `MAXIMA`),
and by the ranges that the methods and the verdict check for their own options
(`OTHER_LIMITS`); every number in the config tree must be in one of the two.
"""

from __future__ import annotations

import copy
import functools

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sanity_cli import cli
from sanity_cli.cli import config_dir
from sanity_cli.errors import SanityError
from sanity_cli.validation import INCLUSIVE, MAXIMA, NUMBERS, validate
from setting_effects import conf_files, leaves

TINY = 1e-6  # just beside a bound of a number that need not be whole
# Where a setting lives when the default config lacks it
HOMES = {"test.bins": ["test=entropy"], "test.samples": ["test=smooth_cascade"], "test.noise": ["test=smooth_cascade"],
         "test.shuffled_epochs": ["test=data"], "test.memorization_threshold": ["test=data"],
         "test.shuffled_subset": ["test=data"], "test.shuffled_lr": ["test=data"],
         **{f"test.{key}": ["test=spurious"] for key in (
             "aligned_class", "rate", "tag_size", "tag_value", "stripes_period", "stripes_strength", "blur_sigma",
             "reliance_margin", "detect_margin")},
         **{f"test.{key}": ["test=manifold"] for key in ("latent_dim", "vae_epochs", "vae_lr", "margin",
                                                          "min_reconstruction")}}
# Upper bounds that validation checks outside MAXIMA: setting -> (highest, highest allowed)
UPPER = {"dataset.test_fraction": (1.0, False)}
# Numbers that the methods (registry) and the verdict check themselves: setting ->
# (overrides that select it, whole number, lowest, lowest allowed, highest or None, highest allowed)
OTHER_LIMITS = {
    "method.edge.sigma": (["method=[edge]"], False, 0.0, True, None, True),
    "method.integrated_gradients.steps": (["method=[integrated_gradients]"], True, 2, True, None, True),
    "method.random.seed": (["method=[random]"], True, 0, True, None, True),
    "method.smoothgrad.noise": (["method=[smoothgrad]"], False, 0.0, True, None, True),
    "method.smoothgrad.samples": (["method=[smoothgrad]"], True, 1, True, None, True),
    "method.smoothgrad.seed": (["method=[smoothgrad]"], True, 0, True, None, True),
    "method.vargrad.noise": (["method=[vargrad]"], False, 0.0, True, None, True),
    "method.vargrad.samples": (["method=[vargrad]"], True, 1, True, None, True),
    "method.vargrad.seed": (["method=[vargrad]"], True, 0, True, None, True),
    "verdict.threshold": ([], False, -1.0, True, 1.0, True),
    "verdict.rise_threshold": ([], False, -1.0, True, None, True),
    "verdict.level": ([], False, 0.0, False, 1.0, False),
    "verdict.resamples": ([], True, 1, True, None, True),
    # a number of draws (validation.MAX_DRAWS at most), or a list of seeds
    "test.seeds": ([], True, 1, True, 100, True),
    # a number of classes, or a list of class folder names (so a word is no wrong type)
    "dataset.classes": (["dataset=imagefolder"], True, 1, True, None, True),
}
NAMES_ALLOWED = {"dataset.classes"}
# Numbers in the config tree checked where they are used, with the test that checks them
ELSEWHERE = {"method.captum.seed": "tests/test_external_methods.py: Captum's own draws"}


@functools.cache
def _composed(overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def composed(overrides: list[str], **values):
    """The config of `sanity run OVERRIDES`, with `values` (dotted keys) set as given."""
    cfg = copy.deepcopy(_composed(tuple(overrides)))
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def home(key: str) -> list[str]:
    return HOMES.get(key, [])


def limits(whole: bool, low, low_in: bool, high, high_in: bool) -> tuple[list, list]:
    """Values just inside and just outside a range, and values of the wrong type."""
    step = 1 if whole else TINY
    inside = [low if low_in else low + step]
    outside = [low - step if low_in else low, "abc", True]
    if high is not None:
        inside.append(high if high_in else high - step)
        outside.append(high + step if high_in else high)
    if whole:
        outside.append(low + 0.5)
    return inside, outside


def number_cases() -> list:
    cases = []
    for key, kind, bound in NUMBERS:
        low = bound if bound is not None else -(2**31)
        high, high_in = UPPER.get(key, (MAXIMA.get(key), True))
        inside, outside = limits(kind is int, low, kind is int or key in INCLUSIVE, high, high_in)
        if bound is None:
            outside = outside[1:]  # no lower bound
        cases += [pytest.param(key, home(key), v, True, id=f"{key}={v}") for v in inside]
        cases += [pytest.param(key, home(key), v, False, id=f"{key}={v}") for v in outside]
    for key, (overrides, whole, low, low_in, high, high_in) in OTHER_LIMITS.items():
        inside, outside = limits(whole, low, low_in, high, high_in)
        outside = [v for v in outside if key not in NAMES_ALLOWED or not isinstance(v, (str, bool, float))]
        cases += [pytest.param(key, overrides, v, True, id=f"{key}={v}") for v in inside]
        cases += [pytest.param(key, overrides, v, False, id=f"{key}={v}") for v in outside]
    return cases


@pytest.mark.parametrize(("key", "overrides", "value", "valid"), number_cases())
def test_numbers_at_their_bounds(key, overrides, value, valid):
    cfg = composed(overrides, **{key: value})
    if valid:
        validate(cfg)
        return
    with pytest.raises(SanityError) as refused:
        validate(cfg)
    message = str(refused.value)
    assert "\n" not in message and key.rsplit(".", 1)[-1] in message, message


def numbers_in_the_tree() -> set[str]:
    return {key for _, _, values in conf_files() for key, value in leaves(values)
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def test_every_number_in_the_configs_has_limits():
    covered = {key for key, _, _ in NUMBERS} | set(OTHER_LIMITS) | set(ELSEWHERE)
    missing = sorted(numbers_in_the_tree() - covered)
    assert not missing, f"numbers with no range checked: {missing}"


def test_a_number_out_of_range_is_one_line_and_exit_2_before_any_work(tmp_path, capsys):
    code = cli.main(["run", "n_images=0", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"])
    error = capsys.readouterr().err
    assert code == 2 and error.strip() == "sanity: error: n_images must be at least 1, not 0"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "results.csv").exists()
