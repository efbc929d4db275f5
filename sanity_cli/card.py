"""The card: one page that answers "can I trust this method on my model?" with every check.

`sanity card [OVERRIDES]` runs, on one model and dataset, each check that applies (the
check registry's, so that a check registered later is on the card too, and the columns of
conf/card.yaml's `extra`, e.g. the cascade bottom-up) as a Hydra multirun: one job per
check, each in a subdirectory of the card's directory named after its column, so that a
launcher (SLURM included) runs them unchanged. Every job runs with resume=true, and a
check whose run has finished is not run again: an interrupted card continues where it
stopped. `sanity card DIR ...` reads finished runs into a card without computing anything.

The card reads each run's own verdict.csv (never judging again), and writes

  card.csv    one row per method and check: the deciding verdict with its interval,
              holds_in, the note (a precondition that failed: `not valid` and why), the
              method's standing over all checks, and the path of the check's report
  card.html   the method by check matrix (controls as reference rows, each cell linking to
              the check's report.html), a card per method with a reading of what its verdicts
              show and do not show, each check's verdict figure, and the model's receipt
              (accuracy per state, weights fingerprints, share randomized; states.csv)

A pass is necessary, not sufficient: noise passes these checks too (the random control
shows it); a method is never called trustworthy, only one that fails a check is called
untrustworthy on this model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from sanity_cli import checks
from sanity_cli.configs import config_dir
from sanity_cli.errors import SanityError
from sanity_cli.randomization import ORDERS
from sanity_cli.runfiles import INFO, read_info, read_run_file

CARD_FILE = "card.yaml"
NOT_RUN = "not run"
# What a fail says of a check that says nothing of its own (`Check.fail_meaning`)
FAIL_MEANING = "the map does not change under the check's randomization"
# The order of the standings, from the worst: a single fail decides
STANDINGS = {"fails": "fails a check: not to be trusted to explain this model",
             "incomplete": "no check failed, but not every check could judge it",
             "passes": "passes every check run (necessary, not sufficient)"}


@dataclass(frozen=True)
class Column:
    """One column of the card: the check it runs and the overrides of its own."""

    name: str
    overrides: tuple[str, ...]


@dataclass
class CardRun:
    """One run found for the card: its column, directory, and why it has no verdicts (if so)."""

    column: str
    path: Path
    problem: str | None
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class Card:
    """What `build_card` wrote."""

    out: Path
    table: pd.DataFrame       # card.csv
    standings: dict[str, str]  # method -> fails | incomplete | passes
    html: Path
    csv: Path


# ---------------------------------------------------------------- settings and columns


def card_settings(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/card.yaml with the `card.KEY=VALUE` overrides; SanityError for an unknown key or bad value."""
    base = OmegaConf.load(config_dir() / CARD_FILE)
    for override in overrides:
        key, sep, text = override.removeprefix("card.").partition("=")
        if not sep or key not in base:
            raise SanityError(f"unknown card setting '{override.partition('=')[0]}'; the card's settings are "
                              f"{', '.join(f'card.{k}' for k in base)} (conf/card.yaml)")
        try:
            value = OmegaConf.create({"v": text})["v"] if not text.startswith(("[", "{")) else \
                OmegaConf.to_container(OmegaConf.create(f"v: {text}"))["v"]
        except Exception:  # noqa: BLE001 - any YAML error is one line
            raise SanityError(f"cannot read the value of {override}; e.g. card.checks=[cascade,data]") from None
        base[key] = None if value in ("null", None) else value
    if not isinstance(base.runs, (list, ListConfig)) or not all(isinstance(o, str) for o in base.runs):
        raise SanityError(f"card.runs must be a list of overrides, e.g. [n_images=16]; not {base.runs!r}")
    return base


def all_columns(settings: DictConfig) -> dict[str, Column]:
    """Every column the card may have: each registered check, then `extra`'s, by name."""
    extra = []
    for name, overrides in (settings.extra or {}).items():
        if not isinstance(overrides, (list, ListConfig)) or not any(str(o).startswith("test=") for o in overrides):
            raise SanityError(f"card.extra.{name} must be a list of overrides that names its check, e.g. "
                              "[test=cascade, test.order=bottom_up]")
        extra.append(Column(str(name), tuple(str(o) for o in overrides)))
    columns = {}
    for name in checks.CHECKS:  # each extra column right after the check it runs again
        columns[name] = Column(name, (f"test={name}",))
        columns.update({c.name: c for c in extra if _test_of(c) == name})
    columns.update({c.name: c for c in extra if c.name not in columns})
    for name, overrides in (settings.overrides or {}).items():
        if name not in columns or not isinstance(overrides, (list, ListConfig)):
            raise SanityError(f"card.overrides.{name} must be a list of overrides of one of the card's columns "
                              f"({', '.join(columns)}), e.g. [test.samples=10]")
        columns[name] = Column(name, (*columns[name].overrides, *(str(o) for o in overrides)))
    return columns


def columns_for(settings: DictConfig, trainable: bool) -> list[Column]:
    """The columns to run: card.checks in its order, or every one that applies on this model
    (a check that needs a model trained on shuffled labels only where the model is trained here)."""
    known = all_columns(settings)
    if settings.checks is None:
        chosen = [c for c in known.values() if trainable or not checks.get(_test_of(c)).needs_shuffled_model]
        return chosen
    names = [settings.checks] if isinstance(settings.checks, str) else list(settings.checks)
    for name in names:
        if name not in known:
            raise SanityError(f"unknown check '{name}' in card.checks; choose from: {', '.join(known)}")
    if len(set(names)) < len(names):
        raise SanityError(f"card.checks names a check twice: {', '.join(names)}")
    return [known[name] for name in names]


def _test_of(column: Column) -> str:
    return next(o.partition("=")[2] for o in column.overrides if o.startswith("test="))


# ---------------------------------------------------------------- running the card


def split_arguments(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(card.KEY=VALUE overrides, the runs' overrides); SanityError for what the card sets itself."""
    card, runs = [], []
    for arg in args:
        key = arg.lstrip("+~").partition("=")[0]
        if key.startswith("card."):
            card.append(arg)
        elif key == "test":  # test.KEY=VALUE goes to every check (++test.KEY where some lack the key)
            raise SanityError(f"the card runs every check itself; choose them with card.checks=[...] rather than "
                              f"{arg}")
        elif key == "shard":
            raise SanityError("a card reads whole runs; leave out shard= (shard a single check with "
                              "`sanity run -m shard=...` and `sanity collect`)")
        elif key in ("hydra.sweep.dir", "hydra.sweep.subdir", "hydra.run.dir", "resume") or arg == "-m":
            raise SanityError(f"the card sets {key} itself (its directory: --out DIR; it always resumes)")
        else:
            runs.append(arg)
    return card, runs


def run_card(args: Sequence[str], out: str | Path | None = None) -> tuple[Card, list[str]]:
    """Run the card's checks (those not finished yet) as Hydra multiruns into `out`, then build it.
    Returns the card and the lines of the jobs that failed (their cells say why)."""
    from sanity_cli import cli

    card_args, run_args = split_arguments(args)
    settings = card_settings(card_args)
    run_args = [*settings.runs, *run_args]
    cfg = _composed(run_args)
    trainable = _trainable(cfg)
    columns = columns_for(settings, trainable)
    out = Path(out) if out is not None else Path("cards") / f"{cfg.model.name}-{cfg.dataset.name}"
    if any(bad in str(out) for bad in ('"', "\\", "${", "\0")):  # Hydra would read them in the override
        raise SanityError(f"--out {str(out)!r} holds a quote, backslash, NUL or ${{: Hydra cannot take it as "
                          "the card's directory; choose another")
    pending = [c for c in columns if _unfinished(out / c.name)]
    failures = []
    for group in _groups(pending):
        tests = ",".join(_test_of(c) for c in group)
        subdir = "${test.name}" if len(group) > 1 else group[0].name
        own = [o for o in group[0].overrides if not o.startswith("test=")]
        argv = ["-m", f"test={tests}", *own, *run_args, "resume=true", f'hydra.sweep.dir="{out}"',
                f"hydra.sweep.subdir={subdir}"]
        code = cli.run(argv)
        if code == 2 and not any((out / c.name).is_dir() for c in group):
            raise SanityError("the card's runs were refused (the line above says why)")
        failures += [f"{c.name}: {_unfinished(out / c.name)}" for c in group if _unfinished(out / c.name)]
    return build_card([out], out, order=[c.name for c in columns]), failures


def _groups(columns: Sequence[Column]) -> list[list[Column]]:
    """Columns that one sweep can run: those with no overrides of their own (one job per
    check, its directory named after it), and each other column alone."""
    plain = [c for c in columns if c.overrides == (f"test={c.name}",)]
    return ([plain] if plain else []) + [[c] for c in columns if c not in plain]


def _composed(overrides: Sequence[str]) -> DictConfig:
    """The runs' config as `sanity run` composes it (cascade standing for every check), or
    SanityError with the one line `sanity run` would print."""
    from sanity_cli import cli

    _, parsed = cli.hydra_arguments([*overrides, "test=cascade"])
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps:
        raise SanityError(f"{sweeps[0]} sweeps over several values; a card is of one setting: "
                          "make one card per value (--out DIR each)")
    return cli.checked_config(parsed)


def _trainable(cfg: DictConfig) -> bool:
    from sanity_cli.models import TRAINABLE_KINDS

    return cfg.model.kind in TRAINABLE_KINDS and not cfg.model.get("checkpoint")


def _unfinished(path: Path) -> str | None:
    """Why the run in `path` has no verdicts yet (not started, failed, unfinished); None when finished."""
    from sanity_cli.collect import unfinished

    if not path.is_dir():
        return "not run yet"
    return unfinished(path)


# ---------------------------------------------------------------- reading runs into a card


def find_card_runs(dirs: Sequence[str | Path]) -> list[CardRun]:
    """Every run under `dirs` (a card's directory, runs, or a directory of runs), each once, in order."""
    from sanity_cli.collect import runs_below

    found: list[Path] = []
    for top in map(Path, dirs):
        if not top.is_dir():
            raise SanityError(f"'{top}' is not a directory; give a card's directory or runs' directories")
        below = runs_below(top)
        if not below:
            raise SanityError(f"'{top}' holds no run (no run.json below it); give a card's directory or a run's")
        found += [p for p in below if p.resolve() not in {f.resolve() for f in found}]
    runs = []
    for path in found:
        problem = _unfinished(path)
        info = read_info(path) if (path / INFO).is_file() else {}
        settings = info.get("settings") or {}
        runs.append(CardRun(column_of(settings) or path.name, path, problem, settings, info))
    _check_one_model(runs)
    seen: dict[str, Path] = {}
    for run in runs:
        if run.column in seen:
            raise SanityError(f"{seen[run.column]} and {run.path} are both runs of {run.column}; a card has one run "
                              "per check: name only one of them")
        seen[run.column] = run.path
    return runs


def column_of(settings: dict) -> str | None:
    """The card's column of a run: its test, with `_bottom_up` when it ran from the input up."""
    test = settings.get("test") or {}
    name = test.get("name")
    if not name:
        return None
    return f"{name}_{test['order']}" if test.get("order") not in (None, "top_down") else str(name)


SAME_SETTINGS = ("model", "dataset", "seed", "n_images", "labels", "target")


def check_of_column(column: str) -> tuple[checks.Check, str] | None:
    """The check a column runs and its test.order (`column_of` backwards); None for a
    column of a check this installation lacks."""
    if column in checks.CHECKS:
        return checks.CHECKS[column], "top_down"
    for name, check in checks.CHECKS.items():
        order = column.removeprefix(f"{name}_")
        if order != column and order in ORDERS:
            return check, order
    return None


def fail_meaning(column: str) -> str:
    """What a fail in `column` says about a method, in the check's words; '' when it says nothing."""
    found = check_of_column(column)
    return found[0].fail_meaning(found[1]) if found else ""


def pass_meaning(column: str) -> str:
    """What a pass in `column` says about a method, for a positive test; '' for the rest."""
    found = check_of_column(column)
    return found[0].pass_meaning(found[1]) if found else ""


def aside(column: str) -> str:
    """What the card's list of checks adds about `column`, in the check's words."""
    found = check_of_column(column)
    return found[0].card_aside(found[1]) if found else ""


def _check_one_model(runs: Sequence[CardRun]) -> None:
    """A card is of one model on one dataset: SanityError naming the first setting two runs differ in."""
    started = [run for run in runs if run.settings]
    for run in started[1:]:
        for key in SAME_SETTINGS:
            a, b = started[0].settings.get(key), run.settings.get(key)
            if a != b:
                raise SanityError(f"cannot put {started[0].path} and {run.path} on one card: they differ in {key} "
                                  f"({json.dumps(a, default=str)} vs {json.dumps(b, default=str)}); a card is of one "
                                  "model on one dataset, with one set of images")


def card_table(runs: Sequence[CardRun], out: Path, order: Sequence[str] = ()) -> pd.DataFrame:
    """card.csv: one row per method and column, from each run's own verdict.csv (deciding rows)."""
    rank = {name: i for i, name in enumerate(order)}
    runs = sorted(runs, key=lambda r: rank.get(r.column, len(rank)))
    rows = []
    for run in runs:
        report = run.path / "report.html"
        link = os.path.relpath(report, out) if report.is_file() else ""
        verdicts = None if run.problem else read_run_file(run.path / "verdict.csv")
        if verdicts is None:
            rows.append({"check": run.column, "method": "", "verdict": NOT_RUN,
                         "note": run.problem or "the run has no verdict.csv; write it with: sanity report "
                                               f"{run.path}", "report": link, "run": str(run.path)})
            continue
        deciding = verdicts[verdicts["decides"].astype(str).str.lower().isin(("true", "1"))]
        for _method, part in deciding.groupby("method", sort=False):
            rows.append({"check": run.column, **_cell(in_card_words(part)), "report": link, "run": str(run.path)})
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"]))
    controls = {row["method"] for row in rows if row.get("is_control")}
    if methods:  # a check without verdicts: a cell for every method, so that the matrix is whole
        rows = [row if row["method"] else {**row, "method": method, "is_control": method in controls}
                for row in rows for method in ([row["method"]] if row["method"] else methods)]
    table = pd.DataFrame(rows, columns=CARD_COLUMNS[:-1])
    return table.assign(standing=table["method"].map(standings(table)).fillna(""))


CARD_COLUMNS = ["method", "is_control", "check", "test", "verdict", "metric", "mean", "ci_low", "ci_high", "level",
                "threshold", "change", "holds_in", "seeds_agree", "n_seeds", "block", "blocks", "borderline", "note",
                "report", "run", "standing"]


def in_card_words(part: pd.DataFrame) -> pd.DataFrame:
    """A check's deciding rows with outcomes of its own words (detects, aligned, false alarm)
    as pass or fail, what they mean for trusting the method (`Check.meanings`); each such
    row's note starts with its own word, so that the card still says which measure decided."""
    test = str(part["test"].iloc[0])
    meanings = checks.CHECKS[test].meanings if test in checks.CHECKS else {}
    own = part["verdict"].isin(list(meanings))
    if not own.any():
        return part
    notes = [f"{block}: {word}" + (f"; {note}" if isinstance(note, str) and note else "") if mine else note
             for block, word, note, mine in zip(part["block"], part["verdict"], part["note"], own)]
    return part.assign(verdict=part["verdict"].map(lambda word: meanings.get(word, word)), note=notes)


def _cell(part: pd.DataFrame) -> dict:
    """One method's cell of one check, from its deciding rows (one per block for the independent
    test: the method's verdict over the blocks, shown by the block nearest to failing)."""
    from sanity_cli.report import method_verdict

    verdict = method_verdict(part["verdict"]) if len(part) > 1 else str(part["verdict"].iloc[0])
    same = part[part["verdict"] == verdict]
    same = same if len(same) else part
    below = str(same["change"].iloc[0]) == "below"
    row = same.loc[same["mean"].idxmax() if below else same["mean"].idxmin()] if same["mean"].notna().any() \
        else same.iloc[0]
    blocks = f"{int((part['verdict'] == 'pass').sum())}/{len(part)} pass" if len(part) > 1 else ""

    def text(value: object) -> str:
        return "" if pd.isna(value) else str(value)

    return {"method": row["method"], "is_control": str(row["is_control"]).lower() in ("true", "1"),
            "test": row["test"], "verdict": verdict, "metric": row["metric"], "mean": row["mean"],
            "ci_low": row["ci_low"], "ci_high": row["ci_high"], "level": row["level"], "threshold": row["threshold"],
            "change": row["change"], "holds_in": text(row.get("holds_in")), "seeds_agree": text(row.get("seeds_agree")),
            "n_seeds": row.get("n_seeds"), "block": text(row["block"]), "blocks": blocks,
            "borderline": str(row.get("borderline")).lower() in ("true", "1"), "note": text(row["note"])}


def standings(table: pd.DataFrame) -> dict[str, str]:
    """Each method's standing over the card's columns: `fails` when any check fails it, else
    `incomplete` when any check could not judge it (or was not run), else `passes`.
    Controls get none: they are the reference, not a method to trust."""
    columns = list(dict.fromkeys(table["check"]))
    found = {}
    methods = [m for m in dict.fromkeys(table["method"]) if m and not _is_control(table, m)]
    for method, part in table[table["method"].isin(methods)].groupby("method", sort=False):
        words = dict(zip(part["check"], part["verdict"]))
        if "fail" in words.values():
            found[method] = "fails"
        elif any(words.get(c) != "pass" for c in columns):
            found[method] = "incomplete"
        else:
            found[method] = "passes"
    return found


def reading(method: str, table: pd.DataFrame) -> str:
    """The card's paragraph on one method: what it passes, fails and cannot be judged on, and
    what that shows and does not show."""
    columns = list(dict.fromkeys(table["check"]))
    own = table[table["method"] == method].set_index("check")
    words = {c: (own.loc[c, "verdict"] if c in own.index else NOT_RUN) for c in columns}
    passed = [c for c in columns if words[c] == "pass"]
    failed = [c for c in columns if words[c] == "fail"]
    open_ = [f"{c} ({words[c]}{_why(own, c)})" for c in columns if words[c] not in ("pass", "fail")]
    parts = [f"{method} passes {_list(passed) or 'no check'} ({len(passed)} of {len(columns)})"]
    if failed:
        parts.append(f"fails {_list(failed)}")
    if open_:
        parts.append(f"cannot be judged on {_list(open_)}")
    text = "; ".join(parts) + "."
    if failed:
        text += (" A fail is evidence against the method on this model: " +
                 "; ".join(f"under {c}, {fail_meaning(c) or FAIL_MEANING}" for c in failed) +
                 ". Its maps should not be read as explaining this model's decisions.")
    noise = table[(table["method"] == "random") & (table["verdict"] == "pass")] if _is_control(table, "random") \
        else table.iloc[:0]
    found = [c for c in passed if pass_meaning(c)]  # positive tests: the map found what was planted
    changed = [c for c in passed if c not in found]
    trivial = [c for c in changed if c in set(noise["check"])]
    if found:
        text += (" A pass of a positive test is evidence for the method on this model: " +
                 "; ".join(f"under {c}, {pass_meaning(c)}" for c in found))
        controls = table[table["is_control"].eq(True) & (table["verdict"] == "pass") & table["check"].isin(found)]
        text += "".join(f" (the {control} control passes {_list(list(part['check']))} as well, so there the pass "
                        "need not come from the model)" for control, part in controls.groupby("method", sort=False)
                        if control != method) + "."
    if changed:
        text += (f" A pass of {'a check that randomizes' if found else 'a check'} shows only that the map changes "
                 "when the check randomizes the model, the labels or the class; it is necessary, not sufficient: it "
                 "does not show that the map is faithful to the model or useful to a person")
        text += (f" (random noise passes {_list(trivial)} as well)." if trivial else ".")
    if open_ and not failed:
        text += " Until the open checks are settled (more images or seeds, a model that meets the preconditions), " \
                "the card does not clear it."
    return text


def _why(own: pd.DataFrame, column: str) -> str:
    if column not in own.index:
        return ""
    note = str(own.loc[column, "note"] or "")
    first = note.split("; ")[0]
    return f": {first.removeprefix('not valid: ')}" if own.loc[column, "verdict"] == "not valid" and first else ""


def _list(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else "".join(items)


# ---------------------------------------------------------------- the receipt


def receipt(runs: Sequence[CardRun]) -> dict:
    """The model's receipt: its accuracies and source, the trained weights' fingerprint in every
    run (they should be one), and each run's states (accuracy, fingerprints, share randomized)."""
    from sanity_cli.report import number

    models, prints, states = {}, {}, []
    for run in runs:
        for name, values in (run.info.get("models") or {}).items():
            # trained in this run or loaded from the cache: the same weights (the cache key), one receipt
            values = {**values, "source": "trained here" if values.get("source") in ("trained", "cache")
                      else values.get("source")}
            models.setdefault(name, {"model": name, **{k: number(v) for k, v in values.items()}})
        table = read_run_file(run.path / "states.csv") if run.info else None
        if table is None or table.empty:
            continue
        first = table[table["step"] == 0]
        if len(first) and "weights" in first:
            prints[run.column] = str(first["weights"].iloc[0])
        columns = [c for c in ("seed", "step", "block", "accuracy", "weights", "params_randomized",
                               "tensors_left_trained") if c in table]
        states.append({"check": run.column, "columns": columns,
                       "rows": [[number(v) if not isinstance(v, float) or c != "params_randomized" else f"{v:.1%}"
                                 for c, v in zip(columns, row)] for row in table[columns].itertuples(index=False)]})
    unique = sorted(set(prints.values()))
    return {"models": list(models.values()), "fingerprints": prints, "one_model": len(unique) <= 1,
            "fingerprint": unique[0] if len(unique) == 1 else "", "states": states}


# ---------------------------------------------------------------- writing the card


def build_card(dirs: Sequence[str | Path], out: str | Path | None = None, order: Sequence[str] = ()) -> Card:
    """Read the runs under `dirs` into out/card.csv and out/card.html (default out: the first
    directory, or its card/ when it is a run's own); nothing is computed again."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise SanityError("name at least one directory: sanity card DIR [DIR ...] [--out DIR]")
    runs = find_card_runs(dirs)
    if out is None:
        out = dirs[0] / "card" if (dirs[0] / INFO).is_file() else dirs[0]
    out = Path(out)
    if (out / INFO).is_file():
        raise SanityError(f"--out {out} is the directory of a run; choose another, e.g. --out {out / 'card'}")
    if not order:  # the default card's order, then any other column as found
        order = list(all_columns(card_settings()))
    table = card_table(runs, out, order)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "card.csv"
    partial = csv_path.with_suffix(".partial")
    table.to_csv(partial, index=False)
    partial.replace(csv_path)
    html = write_card_html(out, table, runs)
    return Card(out, table, standings(table), html, csv_path)


def write_card_html(out: Path, table: pd.DataFrame, runs: Sequence[CardRun]) -> Path:
    """out/card.html: self-contained (figures as data URIs), nothing fetched."""
    from sanity_cli.report import _environment, data_uri, number

    columns = list(dict.fromkeys(table["check"]))
    by_cell = {(r["method"], r["check"]): r for r in table.to_dict("records")}
    missing = {r["check"]: r for r in table.to_dict("records") if r["verdict"] == NOT_RUN}
    methods = [m for m in dict.fromkeys(table["method"]) if m]
    controls = {m for m in methods if _is_control(table, m)}
    standing = standings(table)

    def cell(method: str, column: str) -> dict:
        row = by_cell.get((method, column)) or missing.get(column)
        if row is None:
            return {"verdict": NOT_RUN, "text": "", "note": "this check did not explain this method", "report": ""}
        interval = "" if _nan(row.get("ci_low")) else f"{number(row['mean'], 2)} [{number(row['ci_low'], 2)}, " \
                                                        f"{number(row['ci_high'], 2)}]"
        return {"verdict": row["verdict"], "borderline": bool(row.get("borderline")), "text": interval,
                "holds_in": row.get("holds_in") or "", "blocks": row.get("blocks") or "",
                "note": (row.get("note") or "").removeprefix("not valid: "), "report": row.get("report") or ""}

    rows = [{"method": m, "control": m in controls, "standing": standing.get(m, ""),
             "cells": [cell(m, c) for c in columns]} for m in methods]
    first = next((r for r in table.to_dict("records") if r["verdict"] != NOT_RUN), None)
    settings = next((r.settings for r in runs if r.settings), {})
    figures = [{"check": run.column, "uri": data_uri(path), "name": path.name}
               for run in runs if not run.problem for path in sorted((run.path / "figures").glob("*_verdict.png"))
               if path.name.count(".") == 1]
    context = {
        "title": f"{(settings.get('model') or {}).get('name', 'model')} on "
                 f"{(settings.get('dataset') or {}).get('name', 'dataset')}",
        "columns": columns, "rows": rows, "standing_words": STANDINGS,
        "cards": [{"method": m, "standing": standing[m], "reading": reading(m, table)}
                  for m in methods if m not in controls],
        "controls": sorted(controls),
        "n_images": settings.get("n_images"), "seed": settings.get("seed"),
        "rule": {"metric": first["metric"], "threshold": first["threshold"], "level": first["level"]} if first else {},
        "receipt": receipt(runs), "figures": figures,
        "problems": [{"check": r.column, "problem": r.problem} for r in runs if r.problem],
        "meaning": {c: fail_meaning(c) for c in columns}, "asides": {c: aside(c) for c in columns},
    }
    html = _environment().get_template("card.html.j2").render(**context)
    path = out / "card.html"
    partial = path.with_suffix(".partial")
    partial.write_text(html, encoding="utf-8")
    partial.replace(path)
    return path


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_control(table: pd.DataFrame, method: str) -> bool:
    """Whether `method` is a control in any of the card's checks (the runs say so in verdict.csv)."""
    return bool(table.loc[table["method"] == method, "is_control"].eq(True).any())  # NaN is not a control
