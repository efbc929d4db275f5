"""The `sanity` command.

`sanity run [overrides]` hands everything after `run` to Hydra, so `-m`, `--cfg job`,
`--help` and `hydra.run.dir=...` behave as Hydra users expect. Before Hydra starts, the
CLI reads the same command line with Hydra's own parser, composes the config once with
Hydra's Compose API and checks it, so that bad input ends in one line before Hydra makes
a directory or starts a sweep. The other verbs are ordinary functions.

Every verb ends a SanityError the same way (`verb`): one line on stderr, exit code 2.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import logging
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.errors import HydraException

from sanity_cli.configs import GROUPS, available, config_dir
from sanity_cli.errors import SanityError, one_line

if TYPE_CHECKING:
    import argparse

    import pandas as pd
    from hydra.core.override_parser.types import Override
    from omegaconf import DictConfig

USAGE = """usage: sanity VERB [ARGS]

verbs:
  run [OVERRIDES]   run an experiment (Hydra overrides, e.g. model=cnn test=cascade; -m sweeps)
  list              the models, datasets, methods and tests the configs offer
  figures RUN_DIR [verdict.KEY=VALUE ...]
                    redraw the figures, summary and verdicts of a run from its results.csv
  report RUN_DIR [verdict.KEY=VALUE ...]
                    write the run's report.html (opens in a browser); with other verdict settings, judge
                    again into verdict.KEY=VALUE.csv and report.KEY=VALUE.html beside the run's own
  paper FIG [OVERRIDES] [--out DIR]
                    rerun a figure of the paper (fig1 .. fig6, or all) into DIR (outputs/paper)
  collect DIR [DIR ...] [--out DIR]
                    merge finished runs, shards and sweeps into one table (default: DIR/collected)
  card [OVERRIDES] [--out DIR]
                    every check on one model and dataset, read into card.html: can a method be trusted
                    on this model? (card.checks=[...] chooses; an interrupted card continues)
  card DIR [DIR ...] [--out DIR]
                    the card of finished runs, computing nothing

examples:
  sanity run
  sanity run model=mlp n_images=16
  sanity run -m method=gradient,guided_backprop seed=0,1
  sanity run -m hydra/launcher=joblib shard=0/2,1/2 && sanity collect multirun/DATE/TIME
  sanity card model=mlp
"""


def fail(message: str) -> int:
    """Print a one-line error and return the exit code for bad input."""
    print(f"sanity: error: {message}", file=sys.stderr)
    return 2


def verb(function: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """A verb of the command: a SanityError it raises is printed in one line and returns
    exit code 2; any other exception is a bug and keeps its traceback."""

    @functools.wraps(function)
    def guarded(args: list[str]) -> int:
        try:
            return function(args)
        except SanityError as error:
            return fail(str(error))

    return guarded


class _Stderr(logging.StreamHandler):
    """A handler that writes to sys.stderr as it is when a record comes, not as it was when
    the handler was made: the verbs run in-process from Python too, whose stderr may change."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the current stderr is used instead
        pass


def log_to_stderr(fmt: str) -> None:
    """INFO and above of the verbs that are not Hydra jobs to stderr, in `fmt`, as
    logging.basicConfig does: only where no handler is set up yet."""
    root = logging.getLogger()
    if not root.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    verbs = {"run": run, "list": list_configs, "figures": redraw, "report": report, "paper": paper,
             "collect": collect, "card": card}
    if argv[0] not in verbs:
        return fail(f"unknown verb '{argv[0]}'; use one of: {', '.join(verbs)} (sanity --help)")
    return verbs[argv[0]](argv[1:])


@verb
def list_configs(args: list[str]) -> int:
    for group in (*GROUPS, "experiment"):
        print(f"{group + 's':12} {', '.join(available(group))}")
    return 0


def finished_run(args: list[str], name: str) -> Path:
    """The run directory that `sanity figures` or `sanity report` (`name`) was given."""
    if not args:
        raise SanityError(f"{name} takes the run directory: sanity {name} RUN_DIR [verdict.KEY=VALUE ...]")
    run_dir = Path(args[0])
    if not (run_dir / "results.csv").is_file():
        raise SanityError(f"'{run_dir}' has no results.csv; give the directory of a run")
    return run_dir


def judge_again(run_dir: Path, overrides: dict) -> tuple[str, str, pd.DataFrame]:
    """(name, csv name, verdicts) of the run judged under its verdict settings and `overrides`:
    other settings than the run's own are written beside its own verdict.csv, which stays."""
    from sanity_cli.runfiles import read_info
    from sanity_cli.verdict import rejudged_name, write_verdicts

    name = rejudged_name(read_info(run_dir).get("settings", {}), overrides)
    csv_name = f"verdict.{name}.csv" if name else "verdict.csv"
    return name, csv_name, write_verdicts(run_dir, overrides, name=csv_name)


def unwritable(run_dir: Path, error: OSError, name: str) -> SanityError:
    """A run directory that `sanity figures` or `sanity report` (`name`) cannot write into."""
    where = error.filename or run_dir
    fix = ("free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else
           "make the directory writable")
    return SanityError(f"cannot write {where} ({error.strerror or error}); {fix}, or copy the run "
                       f"(cp -r {run_dir} NEW_DIR) and run: sanity {name} NEW_DIR")


@verb
def redraw(args: list[str]) -> int:
    """sanity figures RUN_DIR [verdict.KEY=VALUE ...]: figures, summary and verdicts again;
    the report too when the run has one, so that it never disagrees with verdict.csv."""
    run_dir = finished_run(args, "figures")
    from sanity_cli.figures import draw_verdict_figure
    from sanity_cli.pipeline import finish
    from sanity_cli.report import interval_settings, write_report
    from sanity_cli.runfiles import check_maps
    from sanity_cli.verdict import parse_verdict_arguments

    log_to_stderr("%(levelname)s %(message)s")
    try:
        overrides = parse_verdict_arguments(args[1:])
        check_maps(run_dir)
        figures = finish(run_dir).figures
        name, csv_name, verdicts = judge_again(run_dir, overrides)
        figures.append(draw_verdict_figure(run_dir, verdicts, **interval_settings(verdicts),
                                           suffix=f".{name}" if name else ""))
        if (run_dir / "report.html").is_file():  # keep it in step with the verdicts
            figures.append(write_report(run_dir, verdicts, rejudged=name))
    except OSError as error:  # a read-only directory or file system, a full disk
        raise unwritable(run_dir, error, "figures") from None
    for path in filter(None, figures):
        print(path)
    print(run_dir / csv_name)
    return 0


@verb
def report(args: list[str]) -> int:
    """sanity report RUN_DIR [verdict.KEY=VALUE ...]: verdict.csv and report.html from the run's files."""
    run_dir = finished_run(args, "report")
    from sanity_cli.report import verdict_lines, write_report
    from sanity_cli.runfiles import check_maps
    from sanity_cli.verdict import parse_verdict_arguments

    log_to_stderr("%(levelname)s %(message)s")
    try:
        check_maps(run_dir)
        name, csv_name, verdicts = judge_again(run_dir, parse_verdict_arguments(args[1:]))
        path = write_report(run_dir, verdicts, rejudged=name)
    except OSError as error:  # a read-only directory or file system, a full disk
        raise unwritable(run_dir, error, "report") from None
    for line in verdict_lines(verdicts):
        print(line)
    print(f"verdict: {run_dir / csv_name}")
    print(f"report:  {path}")
    return 0


def take_out(args: list[str]) -> tuple[str | None, list[str]]:
    """The value of `--out DIR` and the arguments without it; SanityError when DIR is missing."""
    if "--out" not in args:
        return None, args
    at = args.index("--out")
    if at + 1 >= len(args):
        raise SanityError("--out needs a directory: --out DIR")
    return args[at + 1], args[:at] + args[at + 2:]


@verb
def paper(args: list[str]) -> int:
    from sanity_cli.paper import rerun

    out, args = take_out(args)
    out = Path(out or "outputs/paper")
    if not args:
        raise SanityError("name a figure: sanity paper fig3 (fig1 .. fig6, or all)")
    check_overrides(hydra_arguments(args[1:])[1], keys=(*GROUPS, "experiment"))
    log_to_stderr("%(asctime)s %(levelname)s %(message)s")
    try:
        outcomes = rerun(args[0], args[1:], out)
    except HydraException as error:  # e.g. a misspelt key in the overrides
        raise SanityError(one_line(error)) from None
    for outcome in outcomes:
        took = f"{outcome.seconds:7.1f} s" if outcome.status == "done" else "       -"
        print(f"{outcome.experiment:32} {outcome.status:8} {took}  {outcome.detail}")
    return 0


@verb
def collect(args: list[str]) -> int:
    """sanity collect DIR [DIR ...] [--out DIR]: merge finished runs into one table."""
    from sanity_cli.collect import collect as collect_runs

    log_to_stderr("%(levelname)s %(message)s")
    out, dirs = take_out(args)
    options = [a for a in dirs if a.startswith("-")]
    if options:
        raise SanityError(f"unknown option '{options[0]}'; usage: sanity collect DIR [DIR ...] [--out DIR]")
    try:
        collected = collect_runs(dirs, out)
    except OSError as error:  # --out names a file, or a directory that cannot be written
        raise SanityError(f"cannot write {error.filename or out} ({error.strerror or error}); choose another "
                          "directory with --out DIR") from None
    swept = ", ".join(collected.swept) or "nothing"
    print(f"collected {len(collected.runs)} runs (swept: {swept}) into {collected.out}")
    for note in collected.notes:
        print(f"note: {note}")
    from sanity_cli.report import verdict_lines

    for line in verdict_lines(collected.pooled.rename(columns={"n_draws": "n_seeds"})):
        print(f"pooled: {line}")
    for name in ("results.csv", "summary.csv", "verdict.csv", "pooled.csv", "runs.csv", "report.html"):
        if (collected.out / name).is_file():
            print(f"{name.split('.')[0] + ':':9}{collected.out / name}")
    for figure in collected.figures:
        print(f"figure:  {figure}")
    return 0


@verb
def card(args: list[str]) -> int:
    """sanity card [OVERRIDES] | DIR [DIR ...], [--out DIR]: run every check and read them into
    one card, or read finished runs into one (arguments that are directories, not overrides)."""
    from sanity_cli.card import build_card, run_card

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    failures: list[str] = []
    try:
        out, rest = take_out(args)
        if any(a in ("-h", "--help") for a in rest):
            print("usage: sanity card [OVERRIDES] [--out DIR] | sanity card DIR [DIR ...] [--out DIR]\n"
                  "  the card's own settings: card.checks, card.extra, card.overrides, card.runs (conf/card.yaml);\n"
                  "  every other override goes to each check's run, as in `sanity run`")
            return 0
        options = [a for a in rest if a.startswith("-")]
        if options:
            raise SanityError(f"unknown option '{options[0]}'; usage: sanity card [OVERRIDES] [--out DIR]")
        if rest and all("=" not in a for a in rest):
            made = build_card(rest, out)
        else:
            made, failures = run_card(rest, out)
    except (KeyboardInterrupt, Terminated, SystemExit) as stop:  # a job ended by Ctrl-C or SIGTERM
        if isinstance(stop, SystemExit) and stop.code not in (130, 143):
            return stop.code if isinstance(stop.code, int) else 2  # a job refused: it said why
        again = shlex.join(["sanity", "card", *args])
        print(f"sanity: the card was interrupted; continue it with: {again}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) or getattr(stop, "code", 0) == 143 else 130
    for method, standing in made.standings.items():
        print(f"{method:24} {standing}")
    for line in failures:
        print(f"not run: {line}", file=sys.stderr)
    print(f"card:    {made.html}")
    print(f"table:   {made.csv}")
    return 0


def hydra_arguments(args: list[str]) -> tuple[argparse.Namespace, list[Override]]:
    """Hydra's reading of `sanity run` arguments: (its flags: -m, --cfg, --help, ...; the parsed
    overrides), or SanityError with Hydra's parse error in one line.

    The one use of Hydra's private API (hydra._internal): Hydra's public API reads its command
    line only inside hydra.main, which goes on to make the run's directory and start the job
    or sweep, and the CLI must refuse bad input before that, in one line, with nothing made.
    The parser hydra.main itself calls, not a copy of its flags, keeps the two in step. The
    override grammar (hydra.core.override_parser) is the API Hydra gives its sweeper plugins.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    flags = get_args_parser().parse_args(args)
    try:
        return flags, OverridesParser.create().parse_overrides(flags.overrides)
    except HydraException as error:
        raise SanityError(parse_failure(args, error)) from None


def parse_failure(args: list[str], error: Exception) -> str:
    """Hydra's parse error in one line; where a value parses once quoted (non-ASCII letters,
    brackets or parentheses in a path), how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args:
        key, equals, value = arg.partition("=")
        if not equals or arg.startswith("-"):
            continue
        try:
            parser.parse_override(arg)
        except HydraException:
            quoted = f"{key}=\"{value}\""
            try:
                parser.parse_override(quoted)
            except HydraException:
                continue
            return (f"cannot parse the override {shlex.quote(arg)}: Hydra reads this value only in quotes; "
                    f"write {shlex.quote(quoted)}")
    return f"cannot parse the overrides: {one_line(error)}"


def check_overrides(parsed: list[Override], keys: tuple[str, ...] | None = None) -> None:
    """SanityError for an override (of `keys`; None: all of them) that names a config, a
    launcher, a shard or a job name that cannot be, found before anything is composed."""
    from sanity_cli.rundir import plain_name
    from sanity_cli.sharding import parse_shard

    checks = [((*GROUPS, "experiment"), _check_choice), (("hydra/launcher",), _check_launcher),
              (("shard",), lambda _, value: parse_shard(None if value == "None" else value)),
              (("hydra.job.name",), lambda key, value: plain_name(value, key))]
    for names, check in checks:  # in this order: an unknown model is named before a bad shard
        for override in parsed:
            key = override.key_or_group
            if key in names and (keys is None or key in keys) and not override.is_delete():
                for value in _choices(override):
                    check(key, value)


def _check_choice(group: str, name: str) -> None:
    if name not in available(group):
        raise SanityError(f"unknown {group} '{name}'; choose one of: {', '.join(available(group))}")


# Launchers that come with an extra of this package: name -> (extra, plugin module).
LAUNCHER_EXTRAS = {"submitit_slurm": ("slurm", "hydra_plugins.hydra_submitit_launcher"),
                   "submitit_local": ("slurm", "hydra_plugins.hydra_submitit_launcher"),
                   "joblib": ("joblib", "hydra_plugins.hydra_joblib_launcher")}


def _check_launcher(key: str, name: str) -> None:
    """A launcher whose plugin comes with an extra of this package must be installed."""
    import importlib.util

    extra, module = LAUNCHER_EXTRAS.get(name, (None, None))
    if extra and importlib.util.find_spec(module) is None:
        raise SanityError(f"{key}={name} needs its plugin: pip install 'sanity-cli[{extra}]'")


def _choices(override: Override) -> list[str]:
    try:
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception:  # noqa: BLE001 - glob() sweeps resolve only inside Hydra; it checks those itself
        return []
    flat: list[str] = []
    for value in values:
        flat += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return flat


def checked_config(parsed: list[Override]) -> DictConfig:
    """The config as Hydra will compose it for the run (a sweep's first value standing for all
    of it), checked: SanityError with the first problem in one line, before Hydra makes any
    directory. (hydra.main composes again for the job: no public API hands it a config, and
    it reports its own failures, with exit code 1. A setting left unset, ???, is named by
    the job, which knows where it is read.)"""
    from omegaconf.errors import OmegaConfBaseException

    from sanity_cli.validation import validate

    check_overrides(parsed)
    overrides = []
    for override in parsed:
        try:
            first = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else None
        except Exception:  # noqa: BLE001 - glob() sweeps: left to Hydra
            continue
        overrides.append(override.input_line if first is None else f"{override.get_key_element()}={first}")
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as error:
        unknown = re.match(r"Could not override '([^']+)'", str(error))
        if unknown and unknown.group(1) not in (*GROUPS, "experiment"):  # a group is added with +: Hydra says so
            raise SanityError(unknown_setting(unknown.group(1), overrides)) from None
        raise SanityError(one_line(error)) from None
    with contextlib.suppress(OmegaConfBaseException):
        validate(cfg)
    return cfg


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/config.yaml with `overrides`, composed by Hydra's Compose API."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def unknown_setting(key: str, overrides: list[str]) -> str:
    """One line for an override of a key the config does not have, naming the known key it
    most resembles (Hydra's advice, to add it with +, leads to a key that is then refused)."""
    from omegaconf import DictConfig

    others = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        node = compose_config(others)
    except Exception:  # noqa: BLE001 - another override is wrong as well: that one is named next time
        node = None
    parts, found = key.split("."), []
    while len(found) < len(parts) - 1 and isinstance(node, DictConfig) and \
            isinstance(node.get(parts[len(found)]), DictConfig):
        node = node.get(parts[len(found)])
        found.append(parts[len(found)])
    prefix = "".join(f"{part}." for part in found)
    unknown = f"{prefix}{parts[len(found)]}"  # the first part of the key that the config lacks
    known = sorted(str(k) for k in node) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(parts[len(found)], known, n=1, cutoff=0.6)
    hint = (f"; did you mean {prefix}{close[0]}?" if close else
            f"; the settings{f' under {prefix[:-1]}' if prefix else ''} are {', '.join(known)}" if known else "")
    return f"unknown setting '{unknown}'{hint} (`sanity run --cfg job` shows them all)"


def make_output_dir(parsed: list[Override], multirun: bool) -> None:
    """Create the run's (or sweep's) directory as Hydra is about to, and turn a failure into
    one line (SanityError). Of the default directory (outputs/DATE/...) and of one given
    with ${...}, the part before the first interpolation is created; Hydra makes the rest."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o for o in parsed if o.key_or_group == key and not o.is_sweep_override() and not o.is_delete()]
    path = str(given[-1].value()) if given else ("multirun" if multirun else "outputs")
    made = Path(path.split("${")[0] or ".").expanduser()
    try:
        made.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SanityError(f"{key}={path} cannot be created ({error.strerror}: {error.filename}); choose another "
                          f"directory with {key}=PATH") from None
    if not os.access(made, os.W_OK):  # e.g. a read-only file system: Hydra's log would fail in a traceback
        raise SanityError(f"{key}={path} cannot be written ({made} is read-only); choose another directory with "
                          f"{key}=PATH")


class Terminated(BaseException):
    """SIGTERM, raised where the run is, so that it ends as Ctrl-C does: in one line, with the way on."""


def _terminate(signum, frame) -> None:
    raise Terminated


def continue_command(run_dir: Path, overrides: list[str]) -> str:
    """The command that continues the run in `run_dir`, given the job's overrides."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir="))]
    return shlex.join(["sanity", "run", *kept, f'hydra.run.dir="{run_dir}"', "resume=true"])


def interrupted(run_dir: Path, overrides: list[str]) -> str:
    """How many states the run in `run_dir` finished, and how to continue it."""
    from sanity_cli.runfiles import count_finished

    n = count_finished(run_dir)
    return (f"interrupted after {n} state{'' if n == 1 else 's'}; "
            f"continue with: {continue_command(run_dir, overrides)}")


@verb
def run(args: list[str]) -> int:
    """sanity run [HYDRA FLAGS] [OVERRIDES]: checked here, then run by hydra.main."""
    flags, parsed = hydra_arguments(args)
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps and not flags.multirun:
        raise SanityError(f"{sweeps[0]} sweeps over several values; add -m to run one job per value")
    if flags.help or flags.hydra_help:
        check_overrides(parsed)
    else:
        checked_config(parsed)
    if not (flags.cfg or flags.help or flags.hydra_help or flags.info):
        make_output_dir(parsed, flags.multirun)
    from sanity_cli.sharding import SWEEP_FAILURES  # filled when a sweep ends, whichever launcher ran it

    SWEEP_FAILURES.clear()
    try:
        with _sigterm_raises():
            _hydra_main(args)
    except (KeyboardInterrupt, Terminated) as stop:  # before a job started: nothing to continue
        print("sanity: interrupted before the run started", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    if SWEEP_FAILURES:
        raise SanityError(f"{len(SWEEP_FAILURES)} of the sweep's jobs failed: {'; '.join(SWEEP_FAILURES)}")
    return 0


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated while the run goes (in the main thread: where signals arrive)."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _hydra_main(args: list[str]) -> None:
    """Run `args` through `hydra.main`, as Hydra's own command line: a run, a sweep (-m, with
    any launcher and sweeper), --cfg, --help. hydra.main is Hydra's one public way to do all
    of these and it reads sys.argv, so sys.argv holds `args` for the call."""
    import hydra

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def task(cfg) -> None:
        run_task(cfg)

    argv = sys.argv
    sys.argv = ["sanity run", *args]
    try:
        task()
    finally:
        sys.argv = argv


def _hydra_record(run_dir: Path, cfg) -> Callable[[], None]:
    """What writes Hydra's record of the job into run_dir/.hydra (config.yaml, hydra.yaml,
    overrides.yaml). Hydra would write it before the job starts (conf/config.yaml turns
    that off with hydra.output_subdir: null); written once the run owns its directory,
    a refused run leaves the record of the run already there alone."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from sanity_cli.rundir import replace_atomically, writing

    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it

    def write() -> None:
        record = run_dir / ".hydra"
        with writing(record):
            record.mkdir(exist_ok=True)
        for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                           ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
            replace_atomically(record / name, OmegaConf.to_yaml(node).encode())

    return write


def discard_unused(run_dir: Path, job_log: str) -> None:
    """Remove the directory of a run that failed before its first result, if it holds nothing
    else than what the failed run put there (Hydra's record and log, the lock)."""
    from sanity_cli.rundir import LOCK_FILE

    if (run_dir / "results.csv").exists():
        return
    leftovers = {p.name for p in run_dir.iterdir()} - {".hydra", LOCK_FILE, job_log}
    if leftovers:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    default = (Path.cwd() / "outputs").resolve()  # the default outputs/DATE/TIME: its empty date folder too
    for parent in run_dir.resolve().parents:
        if default not in (parent, *parent.parents) or any(parent.iterdir()):
            break
        parent.rmdir()


def run_task(cfg) -> None:
    """One Hydra job: run the pipeline into Hydra's output directory.

    A bad setting ends a single run with exit code 2; in a sweep the other jobs go
    on, each failed job leaves its message in its directory (it may run in another
    process or on another node), and the sweep reports the failures at its end.
    The job runs within its share of the machine (threads, GPU: `job_resources`).
    The directory is the job's from its start (another run in it stops the job, and a
    sweep); Ctrl-C and SIGTERM end it in one line that says how to continue.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf.errors import MissingMandatoryValue

    from sanity_cli.pipeline import run as run_pipeline
    from sanity_cli.rundir import lock_run_dir
    from sanity_cli.sharding import clear_job_error, job_resources, record_job_error

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_log = f"{hydra_cfg.job.name}.log"
    fresh = {p.name for p in run_dir.iterdir()} <= {job_log}  # Hydra made it for this run
    failure = None
    try:
        lock = lock_run_dir(run_dir)
    except SanityError as error:
        sys.exit(fail(str(error)))
    lock.when_accepted(_hydra_record(run_dir, cfg))
    if multirun:
        lock.when_accepted(lambda: clear_job_error(run_dir))
    try:
        with job_resources(cfg):
            result = run_pipeline(cfg, run_dir)
    except (SanityError, MissingMandatoryValue) as error:
        message = (f"{error.full_key} is not set; give it on the command line: {error.full_key}=VALUE"
                   if isinstance(error, MissingMandatoryValue) else str(error))
        if not multirun:
            failure = message
            return
        print(f"sanity: job {hydra_cfg.job.num} failed: {message}", file=sys.stderr)
        record_job_error(run_dir, message)
        return
    except (KeyboardInterrupt, Terminated) as stop:
        print(f"sanity: {interrupted(run_dir, list(hydra_cfg.overrides.task))}", file=sys.stderr)
        sys.exit(143 if isinstance(stop, Terminated) else 130)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        fix = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make the directory writable"
        sys.exit(fail(f"cannot write {error.filename or run_dir} ({error.strerror}); {fix}, then "
                      f"continue with: {continue_command(run_dir, list(hydra_cfg.overrides.task))}"))
    finally:
        lock.release()
        if failure is not None:
            if fresh:
                discard_unused(run_dir, job_log)
            sys.exit(fail(failure))
    print(f"results: {run_dir / 'results.csv'}")
    print(f"summary: {run_dir / 'summary.csv'}")
    for name in ("verdict.csv", "report.html"):  # written at the end of the run
        if (run_dir / name).is_file():
            print(f"{name.split('.')[0] + ':':9}{run_dir / name}")
    for figure in result.figures:
        print(f"figure:  {figure}")


if __name__ == "__main__":
    sys.exit(main())
