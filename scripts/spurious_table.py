"""Print the README's table of spurious-signal findings from runs of `sanity run test=spurious`.

    python scripts/spurious_table.py RUN_DIR [RUN_DIR ...]

Per run: its artifact, dataset and spurious score (both models, with intervals), then per
method K-SSD, the K-SSD gain with its verdict, CCM, FAM with its verdict (by the verdict's
metric, mean [interval]) and the mask mass ratio of both models; and the run's wall time.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from sanity_cli.checks import spurious
from sanity_cli.runfiles import read_info


def interval(row) -> str:
    if row is None or math.isnan(row["mean"]):
        return "–"
    return f"{row['mean']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"


def table(run_dir: Path) -> str:
    info = read_info(run_dir)
    settings = info["settings"]
    test = settings["test"]
    verdicts = pd.read_csv(run_dir / "verdict.csv")
    results = pd.read_csv(run_dir / "results.csv")
    score = spurious.spurious_score_table(results[results["step"] > 0], int(test["aligned_class"]),
                                          float(test["reliance_margin"])).iloc[0]
    metric = (settings.get("verdict") or {}).get("metric", "spearman_abs")
    artifact = test["artifact"]
    lines = [(f"**{artifact}** on {settings['dataset']['name']} (aligned class {test['aligned_class']}): spurious "
             f"score {score['spurious_mean']:.2f} [{score['spurious_ci_low']:.2f}, {score['spurious_ci_high']:.2f}], "
             f"normal model {score['normal_mean']:.2f} [{score['normal_ci_low']:.2f}, {score['normal_ci_high']:.2f}], "
             f"{score['n']} images; {'valid' if score['valid'] else 'not valid'}; "
             f"{info.get('timing_s', {}).get('total', float('nan')) / 60:.1f} min"), "",
             "| method | K-SSD | K-SSD gain | verdict | CCM | FAM | verdict | mask mass spurious / normal |",
             "|---|---|---|---|---|---|---|---|"]
    for method, part in verdicts.groupby("method", sort=False):
        def row(block, name=metric, part=part):
            found = part[(part["block"] == block) & (part["metric"] == name)]
            return found.iloc[0] if len(found) else None

        gain, fam = row(spurious.KSSD_GAIN), row(spurious.FAM)
        masses = [row(block, spurious.MASS) for block in (spurious.KSSD, spurious.KSSD_NORMAL)]
        mass = " / ".join(f"{m['mean']:.1f}" for m in masses if m is not None) or "–"
        lines.append(f"| {method} | {interval(row(spurious.KSSD))} | {interval(gain)} | "
                     f"{gain['verdict'] if gain is not None and isinstance(gain['verdict'], str) else '–'} | "
                     f"{interval(row(spurious.CCM))} | {interval(fam)} | {fam['verdict'] if fam is not None else '–'} "
                     f"| {mass} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    for run_dir in parser.parse_args().runs:
        print(table(run_dir), end="\n\n")


if __name__ == "__main__":
    main()
