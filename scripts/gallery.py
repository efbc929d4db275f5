"""Copy the paper reruns' figures into docs/ as small PNGs for the README gallery.

    python scripts/gallery.py outputs/paper docs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

FIGURES = {  # docs name: figure of a `sanity paper` run
    "fig1_methods_and_edge.png": "fig1_edge_fashion_cnn/figures/methods.png",
    "fig2_cascade_grid.png": "fig3_cascade_fashion_cnn/figures/cascade_grid_abs_0.png",
    "fig2_cascade_grid_diverging.png": "fig3_cascade_fashion_cnn/figures/cascade_grid_diverging_0.png",
    "fig3_cascade_curves.png": "fig3_cascade_fashion_cnn/figures/cascade_curves.png",
    "fig4_independent_curves.png": "fig4_independent_fashion_cnn/figures/independent_curves.png",
    "fig6_data_maps.png": "fig6_data_fashion_cnn/figures/data_maps_0.png",
    "fig6_data_similarity.png": "fig6_data_fashion_cnn/figures/data_similarity.png",
}
MAX_WIDTH = 1100


def shrink(source: Path, target: Path) -> None:
    """At most MAX_WIDTH pixels wide, 256-colour palette: a tenth of the size, still sharp."""
    with Image.open(source) as image:
        image = image.convert("RGB")
        if image.width > MAX_WIDTH:
            image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.LANCZOS)
        image.quantize(colors=256, dither=Image.Dither.NONE).save(target, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the --out directory of `sanity paper`")
    parser.add_argument("docs", type=Path)
    args = parser.parse_args()
    args.docs.mkdir(parents=True, exist_ok=True)
    for name, figure in FIGURES.items():
        if (args.runs / figure).is_file():
            shrink(args.runs / figure, args.docs / name)
            print(args.docs / name)


if __name__ == "__main__":
    main()
