"""The names the pipeline imports from here, now at home in `runstore` (writing a run
directory), `runfiles` (reading it back) and `summary` (summary.csv)."""

from sanity_cli.runfiles import read_info, read_results
from sanity_cli.runstore import RunStore, settings_for_fingerprint, state_rows
from sanity_cli.summary import summarize

__all__ = ["RunStore", "read_info", "read_results", "settings_for_fingerprint", "state_rows", "summarize"]
