"""The `sanity` command.

`sanity run [overrides]` hands everything after `run` to Hydra, so `-m`, `--cfg job`,
`--help` and `hydra.run.dir=...` behave as Hydra users expect. The other verbs are
ordinary functions.
"""

from __future__ import annotations

import sys
from pathlib import Path

GROUPS = ("model", "dataset", "method", "test")
USAGE = """usage: sanity VERB [ARGS]

verbs:
  run [OVERRIDES]   run an experiment (Hydra overrides, e.g. model=cnn test=cascade; -m sweeps)
  list              the models, datasets, methods and tests the configs offer
  figures RUN_DIR   redraw the figures and summary of a run from its results.csv
  paper FIG [OVERRIDES] [--out DIR]
                    rerun a figure of the paper (fig1 .. fig6, or all) into DIR (outputs/paper)

examples:
  sanity run
  sanity run model=mlp n_images=16
  sanity run -m method=gradient,guided_backprop seed=0,1
"""


def config_dir() -> Path:
    """The Hydra config tree: inside the package when installed from a wheel,
    the repository's top-level conf/ in a source checkout or editable install."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def available(group: str) -> list[str]:
    """The config names of one group, e.g. available("model") -> ["cnn", "inception_v3", ...]."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def fail(message: str) -> int:
    """Print a one-line error and return the exit code for bad input."""
    print(f"sanity: error: {message}", file=sys.stderr)
    return 2


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
    if verb == "paper":
        return paper(args)
    return fail(f"unknown verb '{verb}'; use one of: run, list, figures, paper (sanity --help)")


def list_configs() -> int:
    for group in (*GROUPS, "experiment"):
        print(f"{group + 's':12} {', '.join(available(group))}")
    return 0


def redraw(args: list[str]) -> int:
    if len(args) != 1:
        return fail("figures takes one argument, the run directory: sanity figures RUN_DIR")
    run_dir = Path(args[0])
    if not (run_dir / "results.csv").is_file():
        return fail(f"'{run_dir}' has no results.csv; give the directory of a run")
    import logging

    from sanity_cli.pipeline import finish

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for path in finish(run_dir).figures:
        print(path)
    return 0


def paper(args: list[str]) -> int:
    import logging

    from sanity_cli.errors import SanityError
    from sanity_cli.paper import rerun

    out = Path("outputs/paper")
    if "--out" in args:
        at = args.index("--out")
        if at + 1 >= len(args):
            return fail("--out needs a directory: sanity paper FIG --out DIR")
        out, args = Path(args[at + 1]), args[:at] + args[at + 2:]
    if not args:
        return fail("name a figure: sanity paper fig3 (fig1 .. fig6, or all)")
    message = unknown_choice(args[1:])
    if message:
        return fail(message)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        outcomes = rerun(args[0], args[1:], out)
    except SanityError as error:
        return fail(str(error))
    for outcome in outcomes:
        took = f"{outcome.seconds:7.1f} s" if outcome.status == "done" else "       -"
        print(f"{outcome.experiment:32} {outcome.status:8} {took}  {outcome.detail}")
    return 0


def unknown_choice(overrides: list[str]) -> str | None:
    """A one-line message when an override names a config that does not exist."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:  # Hydra's own argument parser separates its flags (--cfg job) from the overrides
        parsed = OverridesParser.create().parse_overrides(get_args_parser().parse_args(overrides).overrides)
    except HydraException as error:
        return f"cannot parse the overrides: {str(error).splitlines()[0]}"
    for override in parsed:
        if override.key_or_group not in (*GROUPS, "experiment") or override.is_delete():
            continue
        for name in _choices(override):
            if name not in available(override.key_or_group):
                return (f"unknown {override.key_or_group} '{name}'; choose one of: "
                        f"{', '.join(available(override.key_or_group))}")
    return None


def _choices(override) -> list[str]:
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    flat: list[str] = []
    for value in values:
        flat += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return flat


def run(args: list[str]) -> int:
    message = unknown_choice(args)
    if message:
        return fail(message)
    sys.argv = ["sanity run", *args]
    _hydra_entry()
    return 0


def _hydra_entry() -> None:
    import hydra

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
    def task(cfg) -> None:
        run_task(cfg)

    task()


def run_task(cfg) -> None:
    """One Hydra job: run the pipeline into Hydra's output directory."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import MissingMandatoryValue

    from sanity_cli.errors import SanityError
    from sanity_cli.pipeline import run as run_pipeline

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run_pipeline(cfg, run_dir)
    except SanityError as error:
        sys.exit(fail(str(error)))
    except MissingMandatoryValue as error:
        sys.exit(fail(f"{error.full_key} is not set; give it on the command line: {error.full_key}=VALUE"))
    print(f"results: {run_dir / 'results.csv'}")
    print(f"summary: {run_dir / 'summary.csv'}")
    for figure in result.figures:
        print(f"figure:  {figure}")


if __name__ == "__main__":
    sys.exit(main())
