"""How the verdicts of a run with several randomization seeds (`test.seeds=[...]`) move
between the draws: each seed judged alone, by the interval alone (`firm`) and with the
Monte Carlo margin (`verdict`), the pooled verdict over all seeds (seeds resampled, then
images), and how many seeds alone agree with it; then the pooled verdict of the first k
seeds, for choosing how many seeds a run needs.

    python scripts/seed_draws.py RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from sanity_cli import checks
from sanity_cli.bootstrap import summarize_scores
from sanity_cli.judging import judge, judged_summary
from sanity_cli.runfiles import read_info
from sanity_cli.verdict import settings_of


def seed_table(run_dir: Path) -> pd.DataFrame:
    results = pd.read_csv(run_dir / "results.csv")
    settings = settings_of(read_info(run_dir).get("settings", {}))
    metric, threshold = settings.metric, settings.threshold
    test = str(results["test"].iloc[0])
    decisive = checks.get(test).decisive(results)
    decisive = decisive[(decisive["metric"] == metric) & (decisive["step"] > 0)]
    seeds = sorted(decisive["seed"].unique())
    rows = []
    for (method, block), part in decisive.groupby(["method", "block"], sort=False):
        row = {"method": method, "block": block}
        for seed in seeds:
            alone = part[part["seed"] == seed]
            summary = summarize_scores(alone, level=settings.level, resamples=settings.resamples, seed=0)
            firm = judge(summary["ci_low"], summary["ci_high"], threshold, False, summary["n"])
            _, verdict, _ = judged_summary(alone, threshold, False, settings, 0)
            row[f"seed {seed}"] = f"{summary['mean']:.3f} {firm}/{verdict}"
        for k in range(2, len(seeds) + 1):
            first = part[part["seed"].isin(seeds[:k])]
            summary, verdict, borderline = judged_summary(first, threshold, False, settings, 0)
            row[f"pooled {k}"] = f"{verdict}{' (borderline)' if borderline else ''} [{summary['ci_low']:.3f}, " \
                                 f"{summary['ci_high']:.3f}]"
        rows.append(row)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    pd.set_option("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60)
    print(seed_table(Path(sys.argv[1])).to_string(index=False))
