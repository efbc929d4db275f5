"""The manifold findings table: each method's share in the tangent space (test=manifold's
verdict.csv), beside the cascade verdict of the same methods on the same model when a
cascade run is given.

    python scripts/manifold_findings.py MANIFOLD_RUN [CASCADE_RUN]

Prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def table(manifold_run: Path, cascade_run: Path | None = None) -> str:
    shares = pd.read_csv(manifold_run / "verdict.csv")
    shares = shares[shares["decides"].astype(bool)].set_index("method")
    cascade = None
    if cascade_run is not None:
        cascade = pd.read_csv(cascade_run / "verdict.csv")
        cascade = cascade[cascade["decides"].astype(bool)].set_index("method")
    head = "| method | share in the tangent space | 95% interval | verdict |"
    rule = "|---|---|---|---|"
    if cascade is not None:
        head += " cascade: Spearman (abs) at full randomization | cascade verdict |"
        rule += "---|---|"
    lines = [head, rule]
    for method, row in shares.iterrows():
        name = f"{method} (control)" if bool(row["is_control"]) else method
        line = f"| {name} | {row['mean']:.3f} | [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | {row['verdict']} |"
        if cascade is not None and method in cascade.index:
            other = cascade.loc[method]
            line += f" {other['mean']:.2f} [{other['ci_low']:.2f}, {other['ci_high']:.2f}] | {other['verdict']} |"
        elif cascade is not None:
            line += " – | – |"
        lines.append(line)
    chance = pd.read_csv(manifold_run / "results.csv")
    chance = chance.loc[chance["metric"] == "chance_fraction", "value"].mean()
    lines.append("")
    lines.append(f"sqrt(k/d) = {chance:.3f}; aligned above {shares['threshold'].iloc[0]:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    runs = [Path(arg) for arg in sys.argv[1:]]
    if not 1 <= len(runs) <= 2:
        sys.exit("usage: python scripts/manifold_findings.py MANIFOLD_RUN [CASCADE_RUN]")
    print(table(*runs))
