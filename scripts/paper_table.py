"""Print the README's table of paper findings from the runs of `sanity paper`.

    python scripts/paper_table.py outputs/paper

Per method: the mean Spearman rank correlation with absolute value (± std over
images) at full cascading randomization, for the last block randomized alone, and
between the true- and shuffled-label models; and the similarity of the trained
model's map to the edge detector's. Then each experiment's wall time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from sanity_cli.runfiles import INFO, read_info

METRIC = "spearman_abs"


def final_scores(run_dir: Path) -> pd.Series | None:
    """'mean ± std' per method at the run's last step, or None when the run is absent."""
    path = run_dir / "summary.csv"
    if not path.is_file():
        return None
    summary = pd.read_csv(path)
    rows = summary[(summary["metric"] == METRIC) & (summary["step"] == summary["step"].max())]
    return rows.set_index("method").apply(lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}", axis=1)


def edge_scores(run_dir: Path) -> pd.Series | None:
    path = run_dir / "edge_similarity.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    rows = table[table["metric"] == METRIC].set_index("method")
    return rows.apply(lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}", axis=1)


def markdown(table: pd.DataFrame) -> str:
    header = ["method", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(index), *map(str, row)]) + " |" for index, row in table.iterrows()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the --out directory of `sanity paper`")
    args = parser.parse_args()
    columns = {
        "cascade, all blocks random": final_scores(args.out / "fig3_cascade_fashion_cnn"),
        "independent, conv1 alone": final_scores(args.out / "fig4_independent_fashion_cnn"),
        "shuffled vs true labels": final_scores(args.out / "fig6_data_fashion_cnn"),
        "similarity to edge map": edge_scores(args.out / "fig1_edge_fashion_cnn"),
    }
    table = pd.DataFrame({name: column for name, column in columns.items() if column is not None}).fillna("-")
    print(f"Mean {METRIC} (± std over images):\n")
    print(markdown(table))
    print("\nWall time per experiment:\n")
    for info in sorted(args.out.glob(f"*/{INFO}")):
        seconds = read_info(info.parent).get("timing_s", {}).get("total")
        if seconds is not None:
            print(f"- {info.parent.name}: {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
