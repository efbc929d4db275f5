"""Merge finished runs into one table: a sweep's jobs, the shards of one run, separate runs.

`collect(dirs, out)` finds every run under `dirs` (a directory holding run.json),
refuses any that is unfinished or failed, and writes into `out`:

  results.csv   every run's rows, with one column per swept setting in front
  summary.csv   sanity_cli.summary.summarize per combination of swept settings
  verdict.csv   sanity_cli.judging.verdict_table per combination, under the runs' verdict settings
  pooled.csv    one verdict per test, model, dataset, method (and block, metric) over all the runs: each
                run's randomization seeds are draws of their own, resampled first, then the images
                within each (`pooled_verdicts`); `runs_agree` counts the runs whose own verdict is the same
  report.html   the runs' verdicts as a method by run table, with the pooled verdict beside them
  runs.csv      one line per run: its directory, swept settings, shard, rows, accuracies
  figures/      per test and metric: each method's similarity at the decisive (last) step,
                one bar per combination of swept settings (seeds pooled)

A swept setting is one the runs' Hydra overrides (.hydra/overrides.yaml) set to
different values. Runs whose settings (run.json "settings") differ anywhere else
are not one experiment, and are refused. Shards of one combination are merged back
into one run: all N shards must be there, each once, on disjoint images.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from sanity_cli.errors import SanityError
from sanity_cli.rundir import plain_name
from sanity_cli.runfiles import COLUMNS, INFO, read_info, read_results, read_run_file
from sanity_cli.sharding import ERROR_FILE, Shard, parse_shard, sweep_size
from sanity_cli.summary import summarize

SKIPPED_DIRS = (".hydra", ".submitit", ".gpus", "figures", "maps")
GLOBAL_GROUPS = ("experiment",)  # groups that may set any setting (`# @package _global_`)
DAMAGED = "so the run cannot be collected; rerun it"  # what a damaged run.json means here


@dataclass
class FoundRun:
    """One finished run directory, as collect reads it."""

    path: Path
    settings: dict              # run.json "settings", nested
    flat: dict[str, str]        # the same as dotted key -> JSON text, for comparing
    overrides: dict[str, str]   # Hydra's task overrides: key -> value as typed
    models: dict                # run.json "models": accuracies
    shard: Shard | None
    swept: dict[str, object] = field(default_factory=dict)


@dataclass
class Collected:
    """What collect wrote, and what it merged."""

    out: Path
    runs: list[FoundRun]
    swept: list[str]
    results: pd.DataFrame
    summary: pd.DataFrame
    verdict: pd.DataFrame
    figures: list[Path]
    notes: list[str]
    pooled: pd.DataFrame | None = None
    report: Path | None = None


def collect(dirs: Sequence[str | Path], out: str | Path | None = None) -> Collected:
    """Merge the runs under `dirs` into `out` (default: the first dir's collected/)."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise SanityError("name at least one directory: sanity collect DIR [DIR ...] [--out DIR]")
    found = find_runs(dirs)
    out = Path(out) if out is not None else dirs[0] / "collected"
    check_out(out, [*dirs, *found])
    runs = [load_run(path) for path in found]
    swept = swept_settings(runs)
    combos = merge_shards(runs, swept)
    tables = [results_of(combo) for combo in combos]
    results = pd.concat([_with_swept(t, c[0], swept) for c, t in zip(combos, tables)], ignore_index=True)
    summary = pd.concat([_with_swept(summarize(t, c[0].models), c[0], swept) for c, t in zip(combos, tables)],
                        ignore_index=True)
    verdict, notes = verdicts(combos, tables, swept)
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "results.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    verdict.to_csv(out / "verdict.csv", index=False)
    pooled = pooled_verdicts(combos, tables, verdict, swept)
    pooled.to_csv(out / "pooled.csv", index=False)
    runs_csv = run_table(combos, swept)
    runs_csv.to_csv(out / "runs.csv", index=False)
    figures = comparison_figures(results, swept, out / "figures", verdict)
    from sanity_cli.report import write_collection_report

    report = write_collection_report(out, verdict, pooled, run_labels(combos, swept), figures)
    return Collected(out, runs, swept, results, summary, verdict, figures, notes, pooled, report)


# -- finding and reading runs -------------------------------------------------------------------


def check_out(out: Path, inputs: Sequence[Path]) -> None:
    """SanityError when writing the merged tables into `out` would overwrite a run's own
    (out is an input or a run directory) or cannot name a directory at all (NUL)."""
    if "\0" in str(out):
        raise SanityError(f"--out {str(out)!r} holds a NUL character; choose another directory")
    where = os.path.realpath(out)
    clash = next((path for path in inputs if os.path.realpath(path) == where), None)
    if clash is not None or (out / INFO).exists() or (out / "states.csv").exists():
        what = f"the input {clash}" if clash is not None else "the directory of a run"
        raise SanityError(f"--out {out} is {what}: its results.csv, summary.csv and verdict.csv would be replaced "
                          "by the merged tables; choose another directory, e.g. --out "
                          f"{(clash or out) / 'collected'}")


def find_runs(dirs: Iterable[Path]) -> list[Path]:
    """Every run directory under `dirs`, in order, each once; refuses failed and unfinished jobs."""
    found: list[Path] = []
    for top in dirs:
        if not top.is_dir():
            raise SanityError(f"'{top}' is not a directory; give run or sweep directories")
        candidates = runs_below(top)
        if not candidates:
            raise SanityError(f"'{top}' holds no run (no run.json below it); give the directory of a run or sweep")
        expected = sweep_size(top) if (top / "multirun.yaml").is_file() else None
        if expected and len(candidates) < expected:
            raise SanityError(f"the sweep {top} has {expected} jobs but only {len(candidates)} have started: the rest "
                              "are queued or were never run; collect once all are done, or name the finished jobs' "
                              "directories")
        found += [p for p in candidates if p.resolve() not in {f.resolve() for f in found}]
    return found


def runs_below(top: Path) -> list[Path]:
    """`top` itself when it is a run's directory, else every run's directory below it, sweep
    jobs in numeric order (hidden folders and those of SKIPPED_DIRS left out)."""
    if _is_job(top):
        return [top]
    return sorted((p for p in top.rglob("*") if p.is_dir() and _is_job(p) and not _skipped(p, top)), key=_natural)


def _is_job(path: Path) -> bool:
    """A run's directory: it has run.json, or it is a Hydra job's directory (.hydra/, error.txt)."""
    return any((path / name).exists() for name in (INFO, ".hydra", ERROR_FILE))


def _skipped(path: Path, top: Path) -> bool:
    return any(part in SKIPPED_DIRS or part.startswith(".") for part in path.relative_to(top).parts)


def _natural(path: Path) -> list:
    """Sweep job directories 0, 1, ..., 10 in numeric order."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def load_run(path: Path) -> FoundRun:
    """Read one run's settings, overrides and accuracies; SanityError when it is not finished."""
    problem = unfinished(path)
    if problem:
        raise SanityError(problem)
    info = read_info(path, DAMAGED)
    settings = info.get("settings")
    if not isinstance(settings, dict):
        raise SanityError(f"{path / 'run.json'} has no settings; the run is damaged, rerun it")
    return FoundRun(path, settings, flatten(settings), read_overrides(path), info.get("models", {}),
                    parse_shard(settings.get("shard")))


def unfinished(path: Path) -> str | None:
    """Why the run in `path` cannot be collected yet, or None when it is finished."""
    if (path / ERROR_FILE).is_file():
        return f"{path} failed: {(path / ERROR_FILE).read_text().strip()}; fix it and rerun that job"
    if not (path / INFO).is_file():
        return (f"{path} has no run.json: the job failed before its first state or has not started "
                f"(see its log there); rerun it, or leave it out")
    for lock in sorted(path.glob("*.lock")):
        if _held(lock):
            return f"{path} is still running (its lock {lock.name} is held); collect once it is done"
    info = read_info(path, DAMAGED)
    expected, done = info.get("states_expected"), _states_done(path)
    if expected is not None and done < int(expected):
        return f"{path} is unfinished: {done} of {expected} states; continue it with resume=true"
    if not (path / "summary.csv").is_file() or "timing_s" not in info:
        return (f"{path} is unfinished (no summary yet): still running or interrupted; "
                "continue it with resume=true")
    return None


def _held(lock: Path) -> bool:
    """Whether another process holds the flock on `lock`; probed without changing the file."""
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: nothing to learn from it
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _states_done(path: Path) -> int:
    try:
        states = pd.read_csv(path / "states.csv")
    except (OSError, ValueError):
        return 0
    return len(states.drop_duplicates(["seed", "step"]))


def read_overrides(path: Path) -> dict[str, str]:
    """Hydra's task overrides of the job in `path` (.hydra/overrides.yaml): key -> value as typed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    parsed = OverridesParser.create().parse_overrides(list(OmegaConf.load(file)))
    return {o.key_or_group: o.get_value_element_as_str() for o in parsed if not o.is_delete()}


def flatten(values: Mapping, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: nested settings as dotted keys with JSON values."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True, default=str)
    return flat


# -- what was swept, and what may be merged -----------------------------------------------------


def swept_settings(runs: Sequence[FoundRun]) -> list[str]:
    """The override keys whose values differ between runs (the shard aside), in order of
    appearance; SanityError when the runs' settings differ in a key no such override explains."""
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides if k != "shard"))
    swept = [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]
    for key in dict.fromkeys(k for run in runs for k in run.flat):
        values = {run.flat.get(key) for run in runs}
        if key == "shard" or len(values) == 1 or _explained(key, swept):
            continue
        a, b = _two_differing(runs, key)
        raise SanityError(f"cannot merge {a.path} and {b.path}: they differ in {key} ({a.flat.get(key)} vs "
                          f"{b.flat.get(key)}), which no sweep varies; collect runs of one experiment, "
                          f"or run them as one sweep (-m {key}=...)")
    for run in runs:
        run.swept = {key: swept_value(run, key) for key in swept}
    return swept


def _explained(key: str, swept: Sequence[str]) -> bool:
    return any(key == k or key.startswith(f"{k}.") or k in GLOBAL_GROUPS for k in swept)


def _two_differing(runs: Sequence[FoundRun], key: str) -> tuple[FoundRun, FoundRun]:
    first = runs[0]
    return first, next(run for run in runs if run.flat.get(key) != first.flat.get(key))


def swept_value(run: FoundRun, key: str) -> object:
    """A run's value of a swept key: the setting when it is a single value, else the
    config's name (model=mlp -> "mlp") or the override as typed; None when unset."""
    value = run.flat.get(key)
    if value is not None:  # a list or mapping (test.seeds=[3]) as its JSON text: a column value, hashable
        loaded = json.loads(value)
        return json.dumps(loaded) if isinstance(loaded, (list, dict)) else loaded
    if f"{key}.name" in run.flat and key not in run.overrides:
        return json.loads(run.flat[f"{key}.name"])
    if key in run.overrides:
        return run.overrides[key]
    nested = run.settings
    for part in key.split("."):
        nested = nested.get(part) if isinstance(nested, Mapping) else None
    return ",".join(nested) if isinstance(nested, Mapping) else None


def merge_shards(runs: Sequence[FoundRun], swept: Sequence[str]) -> list[list[FoundRun]]:
    """Runs grouped by their swept values, shards in order; SanityError for a duplicate
    run, a missing or repeated shard, or shards of different N."""
    groups: dict[str, list[FoundRun]] = defaultdict(list)
    for run in runs:
        groups[json.dumps([run.swept.get(k) for k in swept], default=str)].append(run)
    combos = []
    for members in groups.values():
        members.sort(key=lambda r: r.shard.index if r.shard else -1)
        _check_shards(members)
        combos.append(members)
    return combos


def _check_shards(members: list[FoundRun]) -> None:
    if len(members) == 1 and members[0].shard is None:
        return
    whole = [run for run in members if run.shard is None]
    if whole:
        other = next(run for run in members if run is not whole[0])
        raise SanityError(f"{whole[0].path} and {other.path} are the same experiment (same settings); "
                          "collect only one of them")
    counts = {run.shard.count for run in members}
    if len(counts) > 1:
        ways = ", ".join(map(str, sorted(counts)))
        raise SanityError(f"shards of one experiment split the images differently ({ways} ways): "
                          f"{members[0].path}; rerun them with one N")
    count = counts.pop()
    seen: dict[int, FoundRun] = {}
    for run in members:
        if run.shard.index in seen:
            raise SanityError(f"shard {run.shard} appears twice: {seen[run.shard.index].path} and {run.path}; "
                              "collect only one of them")
        seen[run.shard.index] = run
    missing = [f"{k}/{count}" for k in range(count) if k not in seen]
    if missing:
        raise SanityError(f"shard {', '.join(missing)} of {members[0].path.parent} is missing "
                          f"({len(seen)} of {count} found); run it (shard={missing[0]}) before collecting")


def results_of(combo: Sequence[FoundRun]) -> pd.DataFrame:
    """The rows of one combination. Shards' rows come in the unsharded run's order: state by
    state, method by method, metric by metric, the images of shard 0 first. SanityError if
    two shards explain one image."""
    tables, owner = [], {}
    for run in combo:
        table = read_results(run.path)
        for image in set(table["image"].tolist()):
            if image in owner:
                raise SanityError(f"{owner[image]} and {run.path} both explain image {image}: these shards "
                                  "overlap; rerun them with the same settings")
            owner[image] = run.path
        tables.append(table)
    rows = pd.concat(tables, ignore_index=True)
    if len(tables) == 1:
        return rows
    ranks = pd.DataFrame({key: rows[key].map({v: i for i, v in enumerate(dict.fromkeys(rows[key]))})
                          for key in ("seed", "step", "method", "metric")})
    order = ranks.sort_values(list(ranks.columns), kind="stable").index  # stable: images stay in shard order
    return rows.loc[order].reset_index(drop=True)


def swept_columns(swept: Sequence[str]) -> dict[str, str]:
    """Column name of each swept key; keys that are also result columns ("seed") get a "cfg." prefix."""
    return {key: f"cfg.{key}" if key in COLUMNS else key for key in swept}


def _with_swept(table: pd.DataFrame, run: FoundRun, swept: Sequence[str]) -> pd.DataFrame:
    names = swept_columns(swept)
    front = pd.DataFrame({names[k]: [run.swept[k]] * len(table) for k in swept}, index=table.index)
    return pd.concat([front, table], axis=1)


def run_table(combos: Sequence[Sequence[FoundRun]], swept: Sequence[str]) -> pd.DataFrame:
    """One line per run: directory, swept values, shard, row count and the trained model's accuracies."""
    names = swept_columns(swept)
    lines = []
    for run in (run for combo in combos for run in combo):
        trained = run.models.get("trained", {})
        rows = sum(1 for _ in open(run.path / "results.csv")) - 1
        lines.append({"run": str(run.path), **{names[k]: run.swept[k] for k in swept},
                      "shard": str(run.shard) if run.shard else "", "rows": rows,
                      "train_accuracy": trained.get("train_accuracy"), "test_accuracy": trained.get("test_accuracy")})
    return pd.DataFrame(lines)


# -- verdicts and figures -----------------------------------------------------------------------


def verdicts(combos: Sequence[Sequence[FoundRun]], tables: Sequence[pd.DataFrame],
             swept: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """verdict_table of each combination's rows under its runs' verdict settings, with the
    swept columns; and notes on what the verdicts of shards lack."""
    from sanity_cli import verdict
    from sanity_cli.judging import verdict_table

    parts, notes = [], []
    for combo, table in zip(combos, tables):
        first = combo[0]
        extra = {"signal": read_run_file(first.path / "signal.csv")} if (
            len(combo) == 1 and (first.path / "signal.csv").is_file()) else {}
        robust = [run.path / "robustness.csv" for run in combo if (run.path / "robustness.csv").is_file()]
        if robust and len(robust) == len(combo):  # per image, so the shards' rows simply add up
            extra["robustness"] = pd.concat([read_run_file(path) for path in robust], ignore_index=True)
        if len(combo) > 1 and any((run.path / "signal.csv").is_file() for run in combo):
            notes.append(f"signal.csv of the shards of {first.path.parent} is per shard and not merged: "
                         "their verdicts do not mark uninformative methods")
        settings = verdict.settings_of(first.settings)
        if len(combo) == 1:  # a shard's record holds its own images' accuracy only: no preconditions of shards
            extra["evidence"] = verdict.evidence_of(first.path, table, settings.level)
        else:
            notes.append(f"the preconditions of the shards of {first.path.parent} are not tested (each shard "
                         "records its own images only)")
        judged = verdict_table(table, **asdict(settings), **extra,
                                       controls=set().union(*(verdict.controls_of_run(run.path) for run in combo)),
                                       run_settings=first.settings)
        parts.append(_with_swept(judged.reset_index(drop=True), first, swept).assign(run=_label(first, swept)))
    return pd.concat(parts, ignore_index=True), notes


def _label(run: FoundRun, swept: Sequence[str]) -> str:
    """A run's name in the collection: its swept values, else its directory's name."""
    return ", ".join(f"{key}={run.swept[key]}" for key in swept) or run.path.name


def run_labels(combos: Sequence[Sequence[FoundRun]], swept: Sequence[str]) -> list[str]:
    return [_label(combo[0], swept) for combo in combos]


POOLED_KEYS = ["test", "model", "dataset", "method", "block", "metric"]


def pooled_verdicts(combos: Sequence[Sequence[FoundRun]], tables: Sequence[pd.DataFrame], per_run: pd.DataFrame,
                    swept: Sequence[str]) -> pd.DataFrame:
    """One verdict per (test, model, dataset, method, block, metric) over all runs collected.

    Every run's randomization seeds become draws of their own (two runs' seed 0 are two
    draws: another model, another sweep value), so the bootstrap resamples draws first,
    then the images within each (`bootstrap.bootstrap_interval`). Judged under the first
    run's verdict settings. `runs_agree` says how many runs' own verdicts (`per_run`,
    verdict.csv) are the same; a row that is `not valid` in any run is not valid pooled.
    """
    from sanity_cli import verdict
    from sanity_cli.judging import verdict_table

    draws, parts = {}, []
    for index, table in enumerate(tables):
        ids = [draws.setdefault((index, seed), len(draws)) for seed in table["seed"]]
        parts.append(table.assign(seed=ids))
    pooled_rows = pd.concat(parts, ignore_index=True)
    settings = verdict.settings_of(combos[0][0].settings)
    controls = set().union(*(verdict.controls_of_run(run.path) for combo in combos for run in combo))
    pooled = verdict_table(pooled_rows, **asdict(settings), controls=controls)
    pooled = pooled.rename(columns={"seeds_agree": "draws_agree", "n_seeds": "n_draws"})
    return _runs_agree(pooled, per_run, len(tables))


def _runs_agree(pooled: pd.DataFrame, per_run: pd.DataFrame, n_runs: int) -> pd.DataFrame:
    """`runs_agree` ('k/R') beside each pooled row; rows not valid in some run become not valid."""
    own = per_run.groupby(POOLED_KEYS, sort=False)["verdict"].agg(list)
    notes = per_run.groupby(POOLED_KEYS, sort=False)["note"].agg(list)
    agree, verdicts, pooled_notes = [], list(pooled["verdict"]), list(pooled["note"])
    for i, row in enumerate(pooled.itertuples(index=False)):
        key = tuple(getattr(row, k) for k in POOLED_KEYS)
        words = own.get(key, [])
        if "not valid" in words:
            reason = next(n for w, n in zip(words, notes[key]) if w == "not valid")
            verdicts[i] = "not valid"
            pooled_notes[i] = "; ".join(filter(None, [f"not valid in {words.count('not valid')} of {len(words)} "
                                                      f"runs ({reason})", pooled_notes[i]]))
        agree.append(f"{sum(w == verdicts[i] for w in words)}/{n_runs}")
    return pooled.assign(verdict=verdicts, note=pooled_notes, runs_agree=agree)


def decisive_rows(results: pd.DataFrame, swept: Sequence[str]) -> pd.DataFrame:
    """The rows of each run's last step (full randomization, or the compared model), step 0 excluded."""
    names = list(swept_columns(swept).values())
    keys = [*names, "test", "seed"]
    last = results.groupby(keys, dropna=False, sort=False)["step"].transform("max")
    return results[(results["step"] == last) & (results["step"] > 0)]


VERDICT_SYMBOLS = {"pass": "✓", "fail": "✗", "inconclusive": "?", "uninformative": "∅", "not valid": "⊘",
                   "undefined": "–"}


def comparison_figures(results: pd.DataFrame, swept: Sequence[str], out: Path,
                       verdicts: pd.DataFrame | None = None) -> list[Path]:
    """One figure per (test, metric): a panel per method, a bar per combination of the
    swept settings (seeds pooled; the swept setting on the x-axis), mean ± std over images
    at the decisive step; for the metric that decides, the threshold and each run's verdict
    (`verdicts`: verdict.csv with its `run` column) above its bar."""
    from sanity_cli.figures import METRIC_TITLES, THRESHOLD_COLOR, method_style, panels, save, style_panel, y_limits

    names = [n for k, n in swept_columns(swept).items() if not _is_seed(k)]
    decisive = decisive_rows(results, swept)
    paths = []
    for (test, metric), rows in decisive.groupby(["test", "metric"], sort=False):
        rows = rows.assign(combo=_labels(rows, names))
        table = rows.groupby(["method", "combo"], sort=False)["value"].agg(["mean", "std"]).reset_index()
        if table["mean"].notna().sum() == 0:
            continue  # e.g. HOG on maps smaller than one block
        combos, methods = list(dict.fromkeys(table["combo"])), list(dict.fromkeys(table["method"]))
        fig, axes = panels(len(methods), (max(3.0, 0.35 * len(combos) + 1.4), 3.8),
                           f"{METRIC_TITLES.get(metric, metric)}\nat the last step of {test}")
        by = ", ".join(k for k in swept if not _is_seed(k)) or "run"
        judged = _deciding(verdicts, test, metric)
        for ax, method in zip(axes, methods):
            bars = table[table["method"] == method].set_index("combo").reindex(combos)
            ax.bar(range(len(combos)), bars["mean"], yerr=bars["std"].fillna(0), capsize=2,
                   color=method_style(method)[0], error_kw={"elinewidth": 1})
            ax.set_xticks(range(len(combos)), combos, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
            ax.set_ylim(*y_limits(metric, bars["mean"] - bars["std"].fillna(0)))
            style_panel(ax, metric)
            ax.set_title(method, fontsize=11)
            ax.set_xlabel(by, fontsize=9)
            if judged is not None:
                ax.axhline(judged["threshold"].iloc[0], color=THRESHOLD_COLOR, linestyle="--", linewidth=1.2)
                # a bar pools the seeds of a sweep, but each run has its own verdict: then none is drawn
                words = (judged[judged["method"] == method].groupby("combo")["verdict"].first()
                         if not any(_is_seed(k) for k in swept) else {})
                for x, combo in enumerate(combos):
                    if combo in words:
                        ax.annotate(VERDICT_SYMBOLS.get(words[combo], "?"), (x, 1.0), ha="center", va="bottom",
                                    fontsize=10, annotation_clip=False)
        pooled = " (seeds pooled)" if any(_is_seed(k) for k in swept) else ""
        fig.suptitle(f"{test}: {METRIC_TITLES.get(metric, metric)} by {by}{pooled}", fontsize=12)
        name = f"compare_{plain_name(test, 'test')}_{plain_name(metric, 'metric')}.png"  # names read from files
        paths.append(save(fig, out / name))
    return paths


def _deciding(verdicts: pd.DataFrame | None, test: str, metric: str) -> pd.DataFrame | None:
    """The deciding verdict rows of `test` when `metric` decides them, with a `combo` label
    like the figure's; None otherwise."""
    if verdicts is None or verdicts.empty or "run" not in verdicts:
        return None
    rows = verdicts[verdicts["decides"].astype(bool) & (verdicts["test"] == test) & (verdicts["metric"] == metric)]
    if rows.empty:
        return None
    return rows.assign(combo=rows["run"].str.replace(r"(^|, )[^=,]*seed=[^,]*", "", regex=True)
                       .str.replace(r"(^|, )[^=,]*=", r"\1", regex=True).str.strip(", ").replace("", "all runs"))


def _is_seed(key: str) -> bool:
    """Seeds repeat an experiment; the figures pool them rather than draw a bar each."""
    return key.split(".")[-1] in ("seed", "seeds")


def _labels(rows: pd.DataFrame, names: Sequence[str]) -> pd.Series:
    if not names:
        return pd.Series(["all runs"] * len(rows), index=rows.index)
    return rows[list(names)].astype(str).agg(", ".join, axis=1)
