"""The `sanity` command.

`sanity run [overrides]` hands everything after `run` to Hydra, so `-m`, `--cfg job`,
`--help` and `hydra.run.dir=...` behave as Hydra users expect. The other verbs are
ordinary functions.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import logging
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.errors import HydraException

from sanity_cli.configs import GROUPS, available, config_dir
from sanity_cli.errors import SanityError

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
    verb, args = argv[0], argv[1:]
    if verb == "run":
        return run(args)
    if verb == "list":
        return list_configs()
    if verb == "figures":
        return redraw(args)
    if verb == "report":
        return report(args)
    if verb == "paper":
        return paper(args)
    if verb == "collect":
        return collect(args)
    if verb == "card":
        return card(args)
    return fail(f"unknown verb '{verb}'; use one of: run, list, figures, report, paper, collect, card "
                "(sanity --help)")


def list_configs() -> int:
    for group in (*GROUPS, "experiment"):
        print(f"{group + 's':12} {', '.join(available(group))}")
    return 0


def redraw(args: list[str]) -> int:
    """sanity figures RUN_DIR [verdict.KEY=VALUE ...]: figures, summary and verdicts again;
    the report too when the run has one, so that it never disagrees with verdict.csv."""
    if not args:
        return fail("figures takes the run directory: sanity figures RUN_DIR [verdict.KEY=VALUE ...]")
    run_dir = Path(args[0])
    if not (run_dir / "results.csv").is_file():
        return fail(f"'{run_dir}' has no results.csv; give the directory of a run")
    from sanity_cli.figures import draw_verdict_figure
    from sanity_cli.pipeline import finish
    from sanity_cli.report import interval_settings, write_report
    from sanity_cli.runfiles import check_maps, read_info
    from sanity_cli.verdict import parse_overrides, rejudged_name, write_verdicts

    log_to_stderr("%(levelname)s %(message)s")
    try:
        overrides = parse_overrides(args[1:])
        check_maps(run_dir)
        figures = finish(run_dir).figures
        # other verdict settings than the run's own: judged beside its own verdict.csv, which stays
        name = rejudged_name(read_info(run_dir).get("settings", {}), overrides)
        csv_name = f"verdict.{name}.csv" if name else "verdict.csv"
        verdicts = write_verdicts(run_dir, overrides, name=csv_name)
        figures.append(draw_verdict_figure(run_dir, verdicts, **interval_settings(verdicts),
                                           suffix=f".{name}" if name else ""))
        if (run_dir / "report.html").is_file():  # keep it in step with the verdicts
            figures.append(write_report(run_dir, verdicts, rejudged=name))
    except SanityError as error:
        return fail(str(error))
    except OSError as error:  # a read-only directory or file system, a full disk
        return fail(unwritable(run_dir, error, "figures"))
    for path in filter(None, figures):
        print(path)
    print(run_dir / csv_name)
    return 0


def report(args: list[str]) -> int:
    """sanity report RUN_DIR [verdict.KEY=VALUE ...]: verdict.csv and report.html from the run's files."""
    if not args:
        return fail("report takes the run directory: sanity report RUN_DIR [verdict.KEY=VALUE ...]")
    run_dir = Path(args[0])
    if not (run_dir / "results.csv").is_file():
        return fail(f"'{run_dir}' has no results.csv; give the directory of a run")
    from sanity_cli.report import verdict_lines, write_report
    from sanity_cli.runfiles import check_maps, read_info
    from sanity_cli.verdict import parse_overrides, rejudged_name, write_verdicts

    log_to_stderr("%(levelname)s %(message)s")
    try:
        check_maps(run_dir)
        overrides = parse_overrides(args[1:])
        # other verdict settings than the run's own: written beside its own files, which stay
        name = rejudged_name(read_info(run_dir).get("settings", {}), overrides)
        csv_name = f"verdict.{name}.csv" if name else "verdict.csv"
        verdicts = write_verdicts(run_dir, overrides, name=csv_name)
        path = write_report(run_dir, verdicts, rejudged=name)
    except SanityError as error:
        return fail(str(error))
    except OSError as error:  # a read-only directory or file system, a full disk
        return fail(unwritable(run_dir, error, "report"))
    for line in verdict_lines(verdicts):
        print(line)
    print(f"verdict: {run_dir / csv_name}")
    print(f"report:  {path}")
    return 0


def unwritable(run_dir: Path, error: OSError, verb: str) -> str:
    """One line for a run directory that `sanity figures` or `sanity report` cannot write into."""
    where = error.filename or run_dir
    fix = ("free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else
           "make the directory writable")
    return (f"cannot write {where} ({error.strerror or error}); {fix}, or copy the run (cp -r {run_dir} NEW_DIR) "
            f"and run: sanity {verb} NEW_DIR")


def take_out(args: list[str]) -> tuple[str | None, list[str]]:
    """The value of `--out DIR` and the arguments without it; SanityError when DIR is missing."""
    if "--out" not in args:
        return None, args
    at = args.index("--out")
    if at + 1 >= len(args):
        raise SanityError("--out needs a directory: --out DIR")
    return args[at + 1], args[:at] + args[at + 2:]


def paper(args: list[str]) -> int:
    from sanity_cli.paper import rerun

    try:
        out, args = take_out(args)
    except SanityError as error:
        return fail(str(error))
    out = Path(out or "outputs/paper")
    if not args:
        return fail("name a figure: sanity paper fig3 (fig1 .. fig6, or all)")
    try:
        _, parsed = parse_overrides(args[1:])
    except HydraException as error:
        return fail(parse_failure(args, error))
    message = unknown_choice(parsed)
    if message:
        return fail(message)
    log_to_stderr("%(asctime)s %(levelname)s %(message)s")
    try:
        outcomes = rerun(args[0], args[1:], out)
    except SanityError as error:
        return fail(str(error))
    except HydraException as error:  # e.g. a misspelt key in the overrides
        return fail(one_line(error))
    for outcome in outcomes:
        took = f"{outcome.seconds:7.1f} s" if outcome.status == "done" else "       -"
        print(f"{outcome.experiment:32} {outcome.status:8} {took}  {outcome.detail}")
    return 0


def collect(args: list[str]) -> int:
    """sanity collect DIR [DIR ...] [--out DIR]: merge finished runs into one table."""
    from sanity_cli.collect import collect as collect_runs

    log_to_stderr("%(levelname)s %(message)s")
    try:
        out, dirs = take_out(args)
        options = [a for a in dirs if a.startswith("-")]
        if options:
            raise SanityError(f"unknown option '{options[0]}'; usage: sanity collect DIR [DIR ...] [--out DIR]")
        collected = collect_runs(dirs, out)
    except SanityError as error:
        return fail(str(error))
    except OSError as error:  # --out names a file, or a directory that cannot be written
        return fail(f"cannot write {error.filename or out} ({error.strerror or error}); choose another directory "
                    "with --out DIR")
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
    except SanityError as error:
        return fail(str(error))
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


def parse_overrides(args: list[str]):
    """Hydra's own parsing of `sanity run` arguments: (flags namespace, [Override])."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    flags = get_args_parser().parse_args(args)  # separates Hydra's flags (--cfg job) from overrides
    return flags, OverridesParser.create().parse_overrides(flags.overrides)


def unknown_choice(parsed) -> str | None:
    """A one-line message when an override names a config that does not exist."""
    for override in parsed:
        if override.key_or_group not in (*GROUPS, "experiment") or override.is_delete():
            continue
        for name in _choices(override):
            if name not in available(override.key_or_group):
                return (f"unknown {override.key_or_group} '{name}'; choose one of: "
                        f"{', '.join(available(override.key_or_group))}")
    return None


# Launchers that come with an extra of this package: name -> (extra, plugin module).
LAUNCHER_EXTRAS = {"submitit_slurm": ("slurm", "hydra_plugins.hydra_submitit_launcher"),
                   "submitit_local": ("slurm", "hydra_plugins.hydra_submitit_launcher"),
                   "joblib": ("joblib", "hydra_plugins.hydra_joblib_launcher")}


def missing_launcher(parsed) -> str | None:
    """A one-line message when hydra/launcher names a launcher whose plugin is not installed."""
    import importlib.util

    for override in parsed:
        if override.key_or_group != "hydra/launcher":
            continue
        for name in _choices(override):
            extra, module = LAUNCHER_EXTRAS.get(name, (None, None))
            if extra and importlib.util.find_spec(module) is None:
                return f"hydra/launcher={name} needs its plugin: pip install 'sanity-cli[{extra}]'"
    return None


def bad_shard(parsed) -> str | None:
    """A one-line message when a value of `shard` (each one, in a sweep) is not K/N."""
    from sanity_cli.sharding import parse_shard

    for override in parsed:
        if override.key_or_group == "shard" and not override.is_delete():
            for value in _choices(override):
                try:
                    parse_shard(None if value == "None" else value)
                except SanityError as error:
                    return str(error)
    return None


def unsafe_job_name(parsed) -> str | None:
    """A one-line message when hydra.job.name (the name of the job's log file) is not a plain name."""
    from sanity_cli.rundir import plain_name

    for override in parsed:
        if override.key_or_group == "hydra.job.name" and not override.is_delete():
            for value in _choices(override):
                try:
                    plain_name(value, "hydra.job.name")
                except SanityError as error:
                    return str(error)
    return None


def _choices(override) -> list[str]:
    try:
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception:  # noqa: BLE001 - glob() sweeps resolve only inside Hydra; it checks those itself
        return []
    flat: list[str] = []
    for value in values:
        flat += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return flat


def composition_error(parsed) -> str | None:
    """Compose the config as Hydra will (a sweep's first value standing for all of it),
    and turn any error, e.g. a misspelt key, into one line."""
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import OmegaConfBaseException

    overrides = []
    for override in parsed:
        try:
            first = next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else None
        except Exception:  # noqa: BLE001 - glob() sweeps: left to Hydra
            continue
        overrides.append(override.input_line if first is None else f"{override.get_key_element()}={first}")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        unknown = re.match(r"Could not override '([^']+)'", str(error))
        if unknown and unknown.group(1) not in (*GROUPS, "experiment"):  # a group is added with +: Hydra says so
            return unknown_setting(unknown.group(1), overrides)
        return one_line(error)
    return settings_error(cfg)


def unknown_setting(key: str, overrides: list[str]) -> str:
    """One line for an override of a key the config does not have, naming the known key it
    most resembles (Hydra's advice, to add it with +, leads to a key that is then refused)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig

    others = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            node = compose(config_name="config", overrides=others)
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

def settings_error(cfg) -> str | None:
    """The one-line message of a bad setting, found before Hydra makes any directory; a
    setting left unset (???) is named by the job, which knows where it is read."""
    from omegaconf.errors import OmegaConfBaseException

    from sanity_cli.validation import validate

    try:
        validate(cfg)
    except SanityError as error:
        return str(error)
    except OmegaConfBaseException:
        return None
    return None


def one_line(error: Exception) -> str:
    """The first sentences of a Hydra or OmegaConf message, without its indented details."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith(" ")]
    return " ".join(lines[:2]) or type(error).__name__


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


def output_dir_error(parsed, multirun: bool) -> str | None:
    """Create the run's (or sweep's) directory as Hydra is about to, and turn a failure into
    one line. Of the default directory (outputs/DATE/...) and of one given with ${...}, the
    part before the first interpolation is created; Hydra makes the rest."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o for o in parsed if o.key_or_group == key and not o.is_sweep_override() and not o.is_delete()]
    path = str(given[-1].value()) if given else ("multirun" if multirun else "outputs")
    made = Path(path.split("${")[0] or ".").expanduser()
    try:
        made.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return (f"{key}={path} cannot be created ({error.strerror}: {error.filename}); choose another directory "
                f"with {key}=PATH")
    if not os.access(made, os.W_OK):  # e.g. a read-only file system: Hydra's log would fail in a traceback
        return f"{key}={path} cannot be written ({made} is read-only); choose another directory with {key}=PATH"
    return None


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


def run(args: list[str]) -> int:
    try:
        flags, parsed = parse_overrides(args)
    except HydraException as error:
        return fail(parse_failure(args, error))
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps and not flags.multirun:
        return fail(f"{sweeps[0]} sweeps over several values; add -m to run one job per value")
    message = unknown_choice(parsed) or missing_launcher(parsed) or bad_shard(parsed) or unsafe_job_name(parsed) or (
        composition_error(parsed) if not (flags.help or flags.hydra_help) else None)
    if not (message or flags.cfg or flags.help or flags.hydra_help or flags.info):
        message = output_dir_error(parsed, flags.multirun)
    if message:
        return fail(message)
    from sanity_cli.sharding import SWEEP_FAILURES  # filled when a sweep ends, whichever launcher ran it

    sys.argv = ["sanity run", *args]
    SWEEP_FAILURES.clear()
    try:
        with _sigterm_raises():
            _hydra_entry()
    except (KeyboardInterrupt, Terminated) as stop:  # before a job started: nothing to continue
        print("sanity: interrupted before the run started", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    if SWEEP_FAILURES:
        return fail(f"{len(SWEEP_FAILURES)} of the sweep's jobs failed: {'; '.join(SWEEP_FAILURES)}")
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


def _hydra_entry() -> None:
    import hydra

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def task(cfg) -> None:
        run_task(cfg)

    task()


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
