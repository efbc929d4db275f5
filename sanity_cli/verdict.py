"""A run's verdicts, judged from its files: `write_verdicts` reads the run directory
(results.csv, robustness.csv, signal.csv, run.json, states.csv, maps.npz's controls),
judges it by the rule of `sanity_cli.judging` and writes verdict.csv. The verdict
settings are the run's own (run.json), or others given as `verdict.KEY=VALUE`
(`sanity report RUN verdict.threshold=0.3`), whose files are named after what differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf

from sanity_cli.checks.base import Evidence
from sanity_cli.errors import SanityError
from sanity_cli.judging import VerdictSettings, controls_of_signal, verdict_table
from sanity_cli.methods import is_control
from sanity_cli.runfiles import read_info, read_meta, read_results, read_run_file


def write_verdicts(run_dir: Path, cfg: Mapping | None = None, name: str = "verdict.csv") -> pd.DataFrame:
    """Judge a run from its files and write run_dir/NAME (verdict.csv); return the table.

    Reads results.csv, and robustness.csv, signal.csv, run.json, states.csv and
    maps.npz's list of controls where present. The verdict settings are run.json's,
    overridden by `cfg["verdict"]` (a config or any mapping with a `verdict` block) when given.
    """
    run_dir = Path(run_dir)
    results_path = run_dir / "results.csv"
    if not results_path.is_file():
        raise SanityError(f"'{run_dir}' has no results.csv; give the directory of a run")
    run_settings = read_info(run_dir).get("settings", {})
    settings = settings_of(run_settings, cfg)
    results = read_results(run_dir)
    table = verdict_table(results, **asdict(settings), signal=read_run_file(run_dir / "signal.csv"),
                          robustness=read_run_file(run_dir / "robustness.csv"), controls=controls_of_run(run_dir),
                          evidence=evidence_of(run_dir, results, settings.level), run_settings=run_settings)
    table.to_csv(run_dir / name, index=False)
    return table


def evidence_of(run_dir: Path, results: pd.DataFrame, level: float) -> Evidence:
    """What run_dir's run.json and states.csv record of its models and states, for the preconditions."""
    info = read_info(run_dir)
    first = results[(results["step"] == 0) & (results["seed"] == results["seed"].min())] if len(results) else results
    return Evidence(settings=info.get("settings") or {}, models=info.get("models") or {},
                    states=read_run_file(Path(run_dir) / "states.csv"), images=int(first["image"].nunique()) or None,
                    level=level)


def rejudged_name(run_settings: Mapping, cfg: Mapping) -> str:
    """What a re-judged run's files are called after: the verdict settings that differ from
    the run's own, e.g. "threshold=0.3" (verdict.threshold=0.3.csv, report.threshold=0.3.html);
    '' when none differs."""
    own = asdict(settings_of(run_settings))
    new = asdict(settings_of(run_settings, cfg))
    return ",".join(f"{key}={new[key]:g}" if isinstance(new[key], float) else f"{key}={new[key]}"
                    for key in new if new[key] != own[key])


def settings_of(run_settings: Mapping, cfg: Mapping | None = None) -> VerdictSettings:
    """The verdict settings: defaults, then those the run recorded, then `cfg`'s."""
    values = dict(run_settings.get("verdict") or {})
    override = cfg.get("verdict") if cfg is not None else None
    if override is not None:
        values.update(_plain(override))
    return VerdictSettings.from_mapping(values)


def parse_verdict_arguments(args: Sequence[str]) -> dict:
    """`verdict.KEY=VALUE` arguments as {"verdict": {KEY: value}}, values read as YAML
    (0.3 a number, spearman a string): what may follow the run directory of
    `sanity report` and `sanity figures`."""
    values = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key.startswith("verdict.") or key.count(".") != 1:
            raise SanityError(f"unexpected argument '{arg}'; only verdict settings may follow the run directory, "
                              "e.g. verdict.threshold=0.3")
        try:
            values[key.removeprefix("verdict.")] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise SanityError(f"cannot read the value of {arg}; e.g. {key}=0.3") from None
    VerdictSettings.from_mapping(values)  # refuse a bad value before any work
    return {"verdict": values}


def _plain(values) -> dict:
    """A plain dict of a DictConfig or mapping."""
    return OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)


def controls_of_run(run_dir: Path) -> set[str]:
    """The control methods of a run: maps.npz's list, signal.csv's, and the selected
    methods of the kinds edge and random (from run.json's settings)."""
    found = set((read_meta(run_dir) or {}).get("controls", []))
    found |= controls_of_signal(read_run_file(Path(run_dir) / "signal.csv"))
    methods = read_info(run_dir).get("settings", {}).get("method") or {}
    found |= {name for name, options in methods.items() if is_control(name, options)}
    return found
