"""report.html: one self-contained page per run that a person opens in a browser.

It opens with the verdict per method (colour and words), then the curves with their
confidence bands, the map grids, the signal table, the robustness of each verdict
to the normalization and the absolute value, the models' accuracies, the receipt of
the states, the time taken, the settings and the command that reproduces the run.
Figures are inlined as data URIs: the file needs no server and no network.

Everything is read from the run directory, so a finished run can be reported again
(`sanity report RUN_DIR`).
"""

from __future__ import annotations

import base64
import math
import re
import shlex
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sanity_cli import checks
from sanity_cli.configs import config_dir
from sanity_cli.errors import SanityError
from sanity_cli.figures import METRIC_TITLES, draw_verdict_figure
from sanity_cli.judging import variant_outcomes
from sanity_cli.runfiles import read_info, read_meta, read_run_file
from sanity_cli.verdict import write_verdicts

VERDICT_ORDER = ("pass", "fail", "inconclusive", "uninformative", "not valid", "undefined", "aligned", "not aligned")
FIGURE_SECTIONS = (  # (section, caption, how a figure's file name ends)
    ("curves", "The deciding metric at every state, with its bootstrap interval and the threshold", "_verdict.png"),
    ("curves", "Every metric, mean and one standard deviation over images", "_curves.png"),
    ("curves", "Similarity of the two compared maps, mean and one standard deviation", "_similarity.png"),
    ("maps", "Each method's map of the trained model, beside the controls", "methods.png"),
    ("maps", "Maps at every state, |map|", "_grid_abs_"),
    ("maps", "Maps at every state, signed", "_grid_diverging_"),
    ("maps", "Maps of the two compared conditions", "_maps_"),
    ("curves", "Spurious signal: K-SSD gain, CCM and FAM per method, and the mask mass ratio, with intervals",
     "_spurious_measures.png"),
    ("maps", "The artifact, and each method's maps of the normal and the spurious model on clean and "
             "artifact images", "_spurious_gallery.png"),
    ("curves", "Share of each map in the tangent space of the data manifold, with its interval",
     "manifold_fractions.png"),
    ("maps", "Each method's map, its part in the manifold's tangent space and the rest", "manifold_maps.png"),
)


def write_report(run_dir: Path, verdicts: pd.DataFrame | None = None, rejudged: str = "") -> Path:
    """Render run_dir/report.html from the run's files and return its path.

    Uses verdict.csv (written by `write_verdicts` when absent) and whatever else the
    run holds: figures/*.png, signal.csv, robustness.csv, run.json, states.csv,
    .hydra/overrides.yaml. With `rejudged` (the changed verdict settings, e.g.
    "threshold=0.3") the page is the run judged again with `verdicts`:
    report.{rejudged}.html, beside the run's own report, which stays as it was.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "results.csv").is_file():
        raise SanityError(f"'{run_dir}' has no results.csv; give the directory of a run")
    if verdicts is None:
        verdict_path = run_dir / "verdict.csv"
        verdicts = read_run_file(verdict_path) if verdict_path.is_file() else write_verdicts(run_dir)
    suffix = f".{rejudged}" if rejudged else ""
    draw_verdict_figure(run_dir, verdicts, **interval_settings(verdicts), suffix=suffix)
    for test in verdicts["test"].unique() if len(verdicts) else ():  # the check's figures of its own
        checks.get(str(test)).figures(run_dir, verdicts[verdicts["test"] == test])
    context = report_context(run_dir, verdicts, suffix)
    context["rejudged"] = rejudged
    html = _environment().get_template("report.html.j2").render(**context)
    path = run_dir / f"report{suffix}.html"
    partial = path.with_suffix(".partial")
    partial.write_text(html, encoding="utf-8")
    partial.replace(path)
    return path


def interval_settings(verdicts: pd.DataFrame) -> dict:
    """The level and resamples verdict.csv was computed with, so the figure's bands match its intervals."""
    if verdicts.empty:
        return {}
    return {"level": float(verdicts["level"].iloc[0]), "resamples": int(verdicts["resamples"].iloc[0])}


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("sanity_cli", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["number"] = number
    return env


def report_context(run_dir: Path, verdicts: pd.DataFrame, suffix: str = "") -> dict:
    """What the template shows, as plain values (strings, lists of dicts)."""
    info = read_info(run_dir)
    settings = info.get("settings", {})
    meta = read_meta(run_dir) or {}
    verdicts = _with_defaults(verdicts)
    deciding = verdicts[verdicts["decides"].astype(bool)]
    others = verdicts[~verdicts["decides"].astype(bool)]
    per_block = deciding.groupby("method")["block"].nunique().max() > 1 if len(deciding) else False
    return {
        "title": meta.get("title") or _title(verdicts, settings),
        "rejudged": "",
        "own_settings": ", ".join(f"{key}={value}" for key, value in (settings.get("verdict") or {}).items()),
        "warnings": qualified_warnings(info.get("warnings") or [], deciding),
        "rule": _rule(deciding),
        "counts": _counts(deciding, bool(per_block)),
        "per_block": bool(per_block),
        "matrix": _matrix(deciding) if per_block else {},
        "verdicts": _records(deciding),
        "shared_notes": shared_notes(deciding),
        "other_metrics": _records(others),
        "robustness": _robustness(run_dir, deciding),
        "figures": _figures(run_dir, suffix),
        "signal": _signal_table(run_dir / "signal.csv"),
        "models": [{"model": name, **{k: number(v) for k, v in values.items()}}
                   for name, values in (info.get("models") or {}).items()],
        "states": _table(run_dir / "states.csv"),
        "timing": [{"part": part, "seconds": number(seconds, 1)} for part, seconds in
                   (info.get("timing_s") or {}).items()],
        "command": reproduce_command(run_dir, settings),
        "settings": yaml.safe_dump(settings, sort_keys=False, default_flow_style=None, width=100) if settings
        else "",
    }


def write_collection_report(out: Path, per_run: pd.DataFrame, pooled: pd.DataFrame, runs: list[str],
                            figures: list[Path]) -> Path:
    """out/report.html of `sanity collect`: per test, a method by run table of the runs' own
    verdicts (verdict.csv, its `run` column naming the run), the pooled verdict beside it."""
    tests = []
    for test, part in pooled[pooled["decides"].astype(bool)].groupby("test", sort=False):
        own = per_run[per_run["decides"].astype(bool) & (per_run["test"] == test)]
        per_block = bool(part.groupby("method")["block"].nunique().max() > 1)
        rows = []
        for row in part.to_dict("records"):
            same = own[(own["method"] == row["method"]) & (own["block"] == row["block"])]
            by_run = {r["run"]: r for r in same.to_dict("records")}
            cells = [{"verdict": by_run[run]["verdict"], "borderline": _true(by_run[run].get("borderline")),
                      "mean": number(by_run[run]["mean"], 2)} if run in by_run else None for run in runs]
            rows.append({"method": row["method"], "block": row["block"], "is_control": _true(row["is_control"]),
                         "cells": cells, "pooled": row["verdict"], "borderline": _true(row["borderline"]),
                         "mean": number(row["mean"]),
                         "interval": f"[{number(row['ci_low'])}, {number(row['ci_high'])}]",
                         "draws_agree": "" if pd.isna(row["draws_agree"]) else row["draws_agree"],
                         "runs_agree": row["runs_agree"], "note": "" if pd.isna(row["note"]) else row["note"]})
        first = part.iloc[0]
        tests.append({"name": test, "metric": first["metric"], "threshold": number(first["threshold"], 2),
                      "per_block": per_block, "rows": rows})
    title = ", ".join(dict.fromkeys(f"{r.test}: {r.model} on {r.dataset}" for r in pooled.itertuples()))
    level = f"{pooled['level'].iloc[0]:.0%}" if len(pooled) else ""
    html = _environment().get_template("collect.html.j2").render(
        title=title, runs=runs, tests=tests, level=level,
        figures=[{"name": path.name, "uri": data_uri(path)} for path in figures if path.suffix == ".png"])
    path = Path(out) / "report.html"
    partial = path.with_suffix(".partial")
    partial.write_text(html, encoding="utf-8")
    partial.replace(path)
    return path


def verdict_lines(verdicts: pd.DataFrame) -> list[str]:
    """One line per deciding row, for the terminal: method (block), verdict, mean and interval."""
    deciding = verdicts[verdicts["decides"].astype(bool)]
    per_block = deciding.groupby("method")["block"].nunique().max() > 1 if len(deciding) else False
    names = [f"{row.method} ({row.block})" if per_block else str(row.method) for row in deciding.itertuples()]
    width = max(map(len, names), default=0)
    lines = []
    for name, row in zip(names, deciding.itertuples()):
        holds = f"  holds in {row.holds_in}" if isinstance(row.holds_in, str) and row.holds_in else ""
        lines.append(f"{name:{width}}  {row.verdict:13} {row.metric} {number(row.mean)} "
                     f"[{number(row.ci_low)}, {number(row.ci_high)}]{holds}")
    return lines


def number(value, digits: int = 3) -> str:
    """A table cell: numbers rounded, NaN and missing as an en dash, the rest as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _title(verdicts: pd.DataFrame, settings: Mapping) -> str:
    if len(verdicts):
        first = verdicts.iloc[0]
        return f"{first['test']}: {first['model']} on {first['dataset']}"
    return str(settings.get("test", {}).get("name", "run"))


def _rule(deciding: pd.DataFrame) -> dict:
    """The rule in words, with the numbers of this table."""
    if deciding.empty:
        return {}
    first = deciding.iloc[0]
    metric = str(first["metric"])
    return {"metric": metric, "metric_title": METRIC_TITLES.get(metric, metric), "threshold": first["threshold"],
            "side": first["change"], "other_side": "above" if first["change"] == "below" else "below",
            "level": f"{first['level']:.0%}", "resamples": int(first["resamples"]), "block": first["block"]}


def _counts(deciding: pd.DataFrame, per_block: bool = False) -> list[dict]:
    """How many methods get each verdict, controls aside, in the order of VERDICT_ORDER.
    With a verdict per block (the independent test) a method counts once, by `method_verdict`."""
    rows = deciding[~deciding["is_control"].astype(bool)]
    if per_block:
        counted = rows.groupby("method", sort=False)["verdict"].agg(method_verdict).value_counts()
    else:
        counted = rows["verdict"].value_counts()
    return [{"verdict": v, "n": int(counted[v])} for v in VERDICT_ORDER if v in counted]


def method_verdict(verdicts: pd.Series) -> str:
    """One method's verdict over the blocks of the independent test: pass when it passes in
    every block (its map depends on each), fail when it fails in any, and otherwise the
    first other word of VERDICT_ORDER that it has (not valid before undefined)."""
    found = set(verdicts)
    if found == {"pass"}:
        return "pass"
    for word in ("not valid", "fail", "uninformative", "inconclusive", "undefined"):
        if word in found:
            return word
    return str(verdicts.iloc[0])


def _matrix(deciding: pd.DataFrame) -> dict:
    """The independent test's verdicts as a method by block table of cells (verdict, mean, note)."""
    blocks = list(dict.fromkeys(deciding["block"]))
    rows = []
    for method, part in deciding.groupby("method", sort=False):
        by_block = {row["block"]: row for row in part.to_dict("records")}
        cells = [{"verdict": by_block[b]["verdict"], "borderline": bool(by_block[b]["borderline"]),
                  "mean": number(by_block[b]["mean"], 2), "note": "" if pd.isna(by_block[b]["note"])
                  else str(by_block[b]["note"])} if b in by_block else None for b in blocks]
        rows.append({"method": method, "is_control": bool(part["is_control"].iloc[0]), "cells": cells,
                     "overall": method_verdict(part["verdict"])})
    return {"blocks": blocks, "rows": rows}


def qualified_warnings(warnings: list[str], deciding: pd.DataFrame) -> list[dict]:
    """Each warning of the run with the verdicts it qualifies: the method it opens with
    ("gradcam: ..."), else the methods it names (controls only by that opening: their names,
    random and edge, are words of other warnings too), else all."""
    methods = list(dict.fromkeys(deciding["method"])) if len(deciding) else []
    controls = set(deciding.loc[deciding["is_control"].astype(bool), "method"]) if len(deciding) else set()
    found = []
    for text in warnings:
        opening = text.split(":", 1)[0].strip()
        named = [opening] if opening in methods else [
            m for m in methods if m not in controls and re.search(rf"(?<![\w.]){re.escape(m)}(?![\w])", text)]
        found.append({"text": text, "methods": ", ".join(named) if named else "all verdicts"})
    return found


def _with_defaults(verdicts: pd.DataFrame) -> pd.DataFrame:
    """verdict.csv of an older run lacks the newer columns: fill them so the page still renders."""
    defaults = {"borderline": False, "seeds_agree": "", "mc_error": math.nan}
    return verdicts.assign(**{key: value for key, value in defaults.items() if key not in verdicts})


def shared_notes(table: pd.DataFrame) -> list[str]:
    """The parts of the notes that every method's row has (e.g. too few images, a failed
    precondition), controls aside when there are two methods or more: said once above the table."""
    methods = table[~table["is_control"].astype(bool)] if "is_control" in table else table
    rows = methods if len(methods) > 1 else table
    parts = [_note_parts(note) for note in rows["note"]] if len(rows) > 1 else []
    common = set.intersection(*map(set, parts)) if parts else set()
    return [part for part in parts[0] if part in common] if parts else []  # in the notes' own order


def _note_parts(note) -> list[str]:
    return [] if pd.isna(note) or not str(note) else str(note).split("; ")


def _records(table: pd.DataFrame) -> list[dict]:
    """Verdict rows as display strings; notes without the parts every row shares."""
    rows = []
    shared = set(shared_notes(table))
    for row in table.to_dict("records"):
        interval = (f"[{number(row['ci_low'])}, {number(row['ci_high'])}]"
                    if not math.isnan(row["ci_low"]) else "–")
        spread = f"{int(row['n_seeds'])} (spread {number(row['seed_std'])})" if row["n_seeds"] > 1 else \
            str(int(row["n_seeds"]))
        agree = "" if pd.isna(row["seeds_agree"]) else str(row["seeds_agree"])
        rows.append({**row, "mean_text": number(row["mean"]), "interval": interval, "seeds": spread,
                     "agree": agree, "borderline": _true(row["borderline"]),
                     "values": f"{int(row['n'])}" + (f" (+{int(row['n_nan'])} NaN)" if row["n_nan"] else ""),
                     "holds_in": "" if pd.isna(row["holds_in"]) else str(row["holds_in"]),
                     "note": "; ".join(p for p in _note_parts(row["note"]) if p not in shared),
                     "is_control": bool(row["is_control"])})
    return rows


def _robustness(run_dir: Path, deciding: pd.DataFrame) -> dict:
    """Each method's outcome under every normalization, with and without absolute value."""
    path = run_dir / "robustness.csv"
    if deciding.empty or not path.is_file():
        return {}
    first = deciding.iloc[0]
    variants = variant_outcomes(read_run_file(path), threshold=float(first["threshold"]), level=float(first["level"]),
                                resamples=int(first["resamples"]))
    if variants.empty:
        return {}
    schemes, metrics = list(dict.fromkeys(variants["normalization"])), list(dict.fromkeys(variants["metric"]))
    rows = []
    for (method, block), part in variants.groupby(["method", "block"], sort=False):
        cells = {(row.normalization, row.metric): {"outcome": row.outcome, "mean": number(row.mean)}
                 for row in part.itertuples()}
        rows.append({"method": method, "block": block,
                     "cells": [cells.get((scheme, metric)) for scheme in schemes for metric in metrics]})
    return {"schemes": schemes, "metrics": metrics, "rows": rows, "threshold": first["threshold"]}


def _true(value) -> bool:
    """A bool cell as read back from CSV."""
    return str(value).strip().lower() in ("true", "1", "1.0")


SIGNAL_HEADERS = {  # signal.csv's columns, as the page heads them
    "method": "method", "n_images": "images", "input_spearman": "rank corr. with the image",
    "neighbour_corr": "neighbour corr.", "edge_spearman": "rank corr. with the edges", "excess": "excess",
    "informative": "informative", "is_control": "control"}


def _signal_table(path: Path) -> dict:
    """signal.csv with readable headers; each figure's std beside its mean in one cell."""
    table = read_run_file(path)
    if table is None:
        return {}
    columns = [c for c in table.columns if not c.endswith("_std")]
    rows = []
    for record in table.to_dict("records"):
        cells = []
        for column in columns:
            text = number(record[column])
            if f"{column}_std" in record and not pd.isna(record[f"{column}_std"]):
                text += f" ± {number(record[f'{column}_std'], 2)}"
            cells.append(number(record[column]) if column in ("informative", "is_control") else text)
        rows.append(cells)
    return {"columns": [SIGNAL_HEADERS.get(c, c) for c in columns], "rows": rows}


def _figures(run_dir: Path, suffix: str = "") -> dict[str, list[dict]]:
    """The run's PNGs as data URIs, by section ("curves", "maps"), in FIGURE_SECTIONS' order;
    the verdict figure of this judgement (`suffix`) only, and each figure once."""
    found = sorted(p for p in (run_dir / "figures").glob("*.png")
                   if not p.name.endswith("_spearman.png")  # older runs' two panels of _curves.png again
                   and (not p.name.split(".")[0].endswith("_verdict") or p.name.endswith(f"_verdict{suffix}.png")))
    sections: dict[str, list[dict]] = {"curves": [], "maps": []}
    for section, caption, ending in FIGURE_SECTIONS:
        ending = ending.replace("_verdict.png", f"_verdict{suffix}.png")
        for path in [p for p in found if p.name.endswith(ending) or (ending.endswith("_") and ending in p.name)]:
            found.remove(path)
            sections[section].append({"caption": caption, "name": path.name, "uri": data_uri(path)})
    sections["maps"] += [{"caption": "", "name": p.name, "uri": data_uri(p)} for p in found]
    return sections


def data_uri(path: Path) -> str:
    """A PNG file as a data: URI, so the page carries its images."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(path: Path) -> dict:
    """A CSV file as {"columns": [...], "rows": [[cell, ...]]} of display strings; {} when absent."""
    if not path.is_file():
        return {}
    table = read_run_file(path)
    return {"columns": list(table.columns),
            "rows": [[number(v) for v in row] for row in table.itertuples(index=False)]}


# ---------------------------------------------------------------- the command that reproduces the run


def reproduce_command(run_dir: Path, settings: Mapping) -> str:
    """`sanity run ...` with the overrides Hydra recorded (.hydra/overrides.yaml), or,
    for a run started from Python, overrides reconstructed from run.json's settings."""
    recorded = Path(run_dir) / ".hydra" / "overrides.yaml"
    if recorded.is_file():
        overrides = [o for o in (yaml.safe_load(recorded.read_text()) or []) if not o.startswith("hydra.")]
    elif settings:
        overrides = overrides_of(settings)
    else:
        return ""
    return " ".join(["sanity run", *(shlex.quote(o) for o in overrides)])


def overrides_of(settings: Mapping) -> list[str]:
    """The overrides that compose `settings` from the packaged configs: the group choices,
    then every setting that differs from what those choices give."""
    choices = [f"{group}={settings[group]['name']}" for group in ("model", "dataset", "test")
               if isinstance(settings.get(group), Mapping) and settings[group].get("name")]
    methods = list(settings.get("method") or {})
    if methods:
        choices.append(f"method=[{','.join(methods)}]")
    defaults = _composed(choices)
    if defaults is None:  # a group choice that is not a packaged config (a plug-in): the choices say the most
        return choices
    return choices + [f"{key}={_value(value)}" for key, value in _differences(defaults, settings)]


def _composed(overrides: list[str]) -> dict | None:
    """The packaged config composed with `overrides` and resolved, as run.json records settings;
    None when it cannot be composed."""
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    except (HydraException, OmegaConfBaseException):
        return None


def _differences(defaults: Mapping, settings: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) for every leaf of `settings` that `defaults` does not have the same
    (run.json leaves out where files go and how work is batched: those never show up)."""
    found = []
    for key, value in settings.items():
        if isinstance(value, Mapping) and isinstance(defaults.get(key), Mapping):
            found += _differences(defaults[key], value, f"{prefix}{key}.")
        elif key not in defaults:
            found.append((f"+{prefix}{key}", value))
        elif defaults[key] != value:
            found.append((f"{prefix}{key}", value))
    return found


def _value(value) -> str:
    """A value as Hydra's override grammar writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return f"[{','.join(_value(v) for v in value)}]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{_value(v)}" for key, v in value.items()) + "}"
    return str(value)
