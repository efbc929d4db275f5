"""Paper-style figures of a run, drawn from its summary.csv and maps.npz alone.

Nothing here needs the model, so `sanity figures RUN_DIR` can redraw a finished run.
Curves and bars (paper Figs. 3, 4, 5 and 6, the quantitative panels) come from
summary.csv; the grids of maps (paper Figs. 2, 4, 5) from the example maps in maps.npz.

Both are read through `sanity_cli.runfiles` (maps.npz as `runfiles.Maps`: its "meta",
the example images (E, C, H, W) in [0, 1] and, per state and method,
f"{state_key}/{method}" (E, C_m, H, W)). A check's figures follow what the check says
of itself (`Check.axis_label`, `pair_label`, `unbounded_metrics`, `verdict_label`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sanity_cli.bootstrap import interval_table
from sanity_cli.errors import SanityError
from sanity_cli.methods import CONTROLS
from sanity_cli.rundir import plain_name
from sanity_cli.runfiles import Maps, open_maps, read_info, read_meta, read_results, read_run_file

if TYPE_CHECKING:
    from sanity_cli.checks.base import Check

# Figures are built as matplotlib Figure objects, never through pyplot: drawing them
# neither needs nor changes the caller's backend (a notebook keeps its own).

METRIC_TITLES = {
    "spearman_abs": "Rank correlation (absolute value)",
    "spearman": "Rank correlation (no absolute value)",
    "ssim": "SSIM",
    "hog": "HOG similarity",
}
GRID_IMAGES = 3  # example images drawn per run: more adds pages, not insight
GRID_FONT = 10
METHOD_ROWS = 4  # example images in the Fig. 1 style panel
TILE_PIXELS = 128  # a thumbnail of at most 1.3 inches at dpi 100; keeps the PDFs small
CONTROL_STYLES = (("0.3", "--"), ("0.55", ":"), ("0.45", "-."))


@dataclasses.dataclass(frozen=True)
class Run:
    """What every figure of one run shares."""

    test: str
    title: str  # model, dataset, test and seed(s)
    methods: list[str]  # display order, controls included
    controls: list[str]
    xlabel: str = "model state"  # the check's, for the order the states were made in

    @property
    def explainers(self) -> list[str]:
        """The methods that are not controls: these get curves and bars."""
        return [m for m in self.methods if m not in self.controls]

    @property
    def check(self) -> Check:
        """The run's check, asked how its figures look; the defaults of `Check` for a
        check this installation lacks."""
        return check_of(self.test)

    @property
    def pair(self) -> bool:
        """A check that compares two maps once (two models, or two target classes): bars, not curves."""
        return self.check.pair_label is not None


# ---------------------------------------------------------------- entry points


def draw_all(run_dir: Path) -> list[Path]:
    """Draw every figure the run's files support under run_dir/"figures"; return the PNG paths.

    Each PNG has a PDF twin of the same stem. Without maps.npz only the summary
    figures are drawn; without summary.csv only the grids; with neither, nothing.
    """
    run_dir = Path(run_dir)
    summary, out = read_run_file(run_dir / "summary.csv"), run_dir / "figures"
    # the archive stays open and each array is decompressed when drawn: a full Inception
    # run holds hundreds of MB of maps, never all needed at once
    with open_maps(run_dir) as maps:
        if summary is None and maps is None:
            return []
        run = describe_run(summary, maps.meta if maps is not None else None, run_order(run_dir))
        paths = summary_figures(summary, run, out) if summary is not None else []
        paths += (map_figures(maps, run, out) + [methods_figure(maps, run, out)]
                  if maps is not None and maps.meta.get("states") else [])  # no states: every map was lost
    return paths


def describe_run(summary: pd.DataFrame | None, meta: dict | None, order: str = "top_down") -> Run:
    """Test, title, method order, controls and x-axis label: from maps.npz's meta when present,
    else summary.csv; `order` is the run's test.order."""
    if meta is not None:
        controls = list(meta.get("controls", []))
        methods = list(dict.fromkeys([*meta["methods"], *controls]))
        test, title = meta["test"], meta["title"]
    else:
        first = summary.iloc[0]
        methods = list(dict.fromkeys(summary["method"]))
        controls = [m for m in CONTROLS if m in methods]
        test, title = str(first["test"]), f"{first['test']}: {first['model']} on {first['dataset']}"
    if summary is not None:
        methods += [m for m in dict.fromkeys(summary["method"]) if m not in methods]
    seeds = summary["seed"] if summary is not None else [s["seed"] for s in meta["states"]]
    plain_name(test, "test")  # it names the figures' files, and comes from the run's files
    return Run(test, with_seeds(title, sorted(set(int(s) for s in seeds))), methods, controls,
               axis_label(test, order))


def run_order(run_dir: Path) -> str:
    """The run's test.order (run.json), top_down when it has none."""
    try:
        settings = read_info(run_dir).get("settings", {})
    except SanityError:  # a damaged run.json: its own reader says so where it matters
        return "top_down"
    return (settings.get("test") or {}).get("order") or "top_down"


def axis_label(test: str, order: str) -> str:
    """The check's x-axis label for the order its states were made in."""
    from sanity_cli import checks

    if test not in checks.CHECKS:  # a run of a check this installation lacks: a neutral label
        return "model state"
    return checks.get(test).axis_label(order)


def check_of(test: str) -> Check:
    """The check named `test`, or a `Check` with the defaults when this installation lacks it."""
    from sanity_cli import checks
    from sanity_cli.checks.base import Check

    return checks.CHECKS.get(test) or Check()


def with_seeds(title: str, seeds: Sequence[int]) -> str:
    """Append the seed(s) unless the title already names them (the pipeline's titles do)."""
    if "seed" in title.lower() or not seeds:
        return title
    return f"{title}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def save(fig: Figure, png: Path, dpi: int = 120) -> Path:
    """Write `fig` as `png` and its PDF twin, return `png` (a pyplot-free figure needs no closing)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=dpi)
    fig.savefig(png.with_suffix(".pdf"))
    return png


# ---------------------------------------------------------------- summary figures


def summary_figures(summary: pd.DataFrame, run: Run, out: Path) -> list[Path]:
    """Bars for the pair tests (data, random_logit); curves for the stepwise ones."""
    metrics = metrics_present(summary)
    if not metrics:
        return []
    if run.pair:
        return [save(bars_figure(summary, run), out / f"{run.test}_similarity.png")]
    # one figure of every metric: the paper's Fig. 3 panels (the two rank correlations) are its first two
    return [save(curves_figure(summary, run), out / f"{run.test}_curves.png")]


def metrics_present(table: pd.DataFrame) -> list[str]:
    """Metrics with at least one finite mean, the paper's first; all-NaN ones (HOG on 28x28) are skipped."""
    finite = table[np.isfinite(table["mean"].astype(float))]
    found = list(dict.fromkeys(finite["metric"]))
    return [m for m in METRIC_TITLES if m in found] + [m for m in found if m not in METRIC_TITLES]


def mean_over_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, step, metric) with columns block, mean, std.

    Several seeds repeat the randomization. Kept simple on purpose: the mean and the
    std are the averages of the per-seed means and stds over images (not a std
    pooled over all images and seeds).
    """
    return summary.groupby(["method", "step", "metric"], as_index=False, sort=False).agg(
        block=("block", "first"), mean=("mean", "mean"), std=("std", "mean"))


# One colour and marker per method, the same in every run and figure: the paper's methods
# and the controls have their own; any other method takes the first free one, by name.
# None is red or black, the colours of the threshold line.
METHOD_STYLES = {
    "gradient": ("#1f77b4", "o"), "input_x_gradient": ("#ff7f0e", "s"), "integrated_gradients": ("#2ca02c", "^"),
    "guided_backprop": ("#9467bd", "D"), "gradcam": ("#8c564b", "v"), "guided_gradcam": ("#e377c2", "P"),
    "smoothgrad": ("#17becf", "X"), "vargrad": ("#bcbd22", "*"), "edge": ("#4d4d4d", "h"), "random": ("#999999", "p"),
}
EXTRA_STYLES = [("#393b79", "<"), ("#637939", ">"), ("#8c6d31", "d"), ("#7b4173", "H"), ("#3182bd", "8"),
                ("#31a354", "1"), ("#756bb1", "2"), ("#636363", "3"), ("#e6550d", "4"), ("#6baed6", "+")]
THRESHOLD_COLOR = "#d62728"  # red: no method's colour


def method_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method: fixed for the known ones, else from a hash of its name."""
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    return EXTRA_STYLES[sum(map(ord, method)) % len(EXTRA_STYLES)]


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method, the same in every figure and every run."""
    return {m: method_style(m)[0] for m in methods}


def y_limits(metric: str, lows: Iterable[float]) -> tuple[float, float]:
    """Similarities are at most 1; the floor is 0 unless the data go lower (a signed rank
    correlation reaches down only as far as its values do, not to -1 regardless)."""
    lows = np.asarray(list(lows), dtype=float)
    lowest = np.nanmin(lows) - 0.05 if np.isfinite(lows).any() else -0.05
    return max(-1.05, min(-0.05, lowest)), 1.05


def limit_y(ax: Axes, metric: str, lows: Iterable[float], run: Run) -> None:
    """Similarities on their scale (at most 1); the check's scores that are not bounded so
    (`Check.unbounded_metrics`: entropies and their rise): matplotlib's limits."""
    if metric not in run.check.unbounded_metrics:
        ax.set_ylim(*y_limits(metric, lows))


def curves_figure(summary: pd.DataFrame, run: Run, metrics: list[str] | None = None) -> Figure:
    """Similarity to the trained model's maps against the block reached (paper Figs. 3 and 4).

    One panel per metric; one line per method with a band of one std over images;
    controls as dashed horizontal reference lines at their mean over the randomized steps.
    """
    table = mean_over_seeds(summary)
    metrics = metrics or metrics_present(table)
    blocks = table.drop_duplicates("step").sort_values("step")
    fig, axes = panels(len(metrics), (max(3.8, 0.3 * len(blocks) + 1.4), 4.8),
                       "similarity to the trained model's map")
    colors = method_colors(run.methods)
    for ax, metric in zip(axes, metrics):
        rows = table[table["metric"] == metric]
        draw_curves(ax, rows, run.explainers, colors)
        draw_controls(ax, rows[rows["step"] >= 1], run.controls)
        ax.set_xticks(blocks["step"], blocks["block"].astype(str), rotation=60, ha="right", rotation_mode="anchor",
                      fontsize=9)
        limit_y(ax, metric, rows["mean"] - rows["std"].fillna(0), run)
        style_panel(ax, metric)
    fig.supxlabel(run.xlabel, fontsize=10)
    fig.suptitle(f"{run.title}\nbands: one standard deviation over images", fontsize=12)
    figure_legend(fig, axes)
    return fig


def panels(n: int, size: tuple[float, float], ylabel: str) -> tuple[Figure, list[Axes]]:
    """n panels of `size` inches, as many a row as fit in about 16 inches, with room for the legend."""
    per_row = max(1, min(n, int(16 // size[0])))
    n_rows = -(-n // per_row)
    fig = Figure(figsize=(size[0] * per_row + 2.4, size[1] * n_rows + 0.6), layout="constrained")
    grid = fig.subplots(n_rows, per_row, squeeze=False)
    for ax in grid.flat[n:]:
        ax.remove()
    for row in grid:
        row[0].set_ylabel(ylabel)
    return fig, list(grid.flat[:n])


def draw_curves(ax: Axes, rows: pd.DataFrame, methods: Sequence[str], colors: dict[str, tuple]) -> None:
    """One line per method over the steps, with a band of one std."""
    for method in methods:
        line = rows[rows["method"] == method].sort_values("step")
        if line.empty:
            continue
        std = line["std"].fillna(0)  # one image: no spread to draw
        ax.plot(line["step"], line["mean"], marker=method_style(method)[1], markersize=4, color=colors[method],
                label=method)
        ax.fill_between(line["step"], line["mean"] - std, line["mean"] + std, color=colors[method],
                        alpha=0.15, linewidth=0)


def draw_controls(ax: Axes, randomized: pd.DataFrame, controls: Sequence[str]) -> None:
    """Controls use neither model nor data: a flat line at their mean is their whole story."""
    for (color, dash), control in zip(itertools.cycle(CONTROL_STYLES), controls):
        level = randomized.loc[randomized["method"] == control, "mean"].mean()
        if np.isfinite(level):
            ax.axhline(level, color=color, linestyle=dash, linewidth=1.5, label=f"{control} (control)")


def style_panel(ax: Axes, metric: str) -> None:
    """Title, a faint zero line (similarity of unrelated maps) and a light grid."""
    ax.axhline(0, color="0.8", linewidth=0.8, zorder=0)
    ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=11)
    ax.grid(alpha=0.3)


def figure_legend(fig: Figure, axes: Iterable[Axes]) -> None:
    """One legend for all panels, outside them so it never hides a curve."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside right upper", fontsize=9)


def bars_figure(summary: pd.DataFrame, run: Run) -> Figure:
    """Similarity between the two compared maps, one bar per method per metric (paper Figs. 5 and 6).

    Step 0 compares a model with itself and is left out; the bars average steps >= 1.
    """
    compared = mean_over_seeds(summary[summary["step"] >= 1])
    table = compared.groupby(["method", "metric"], as_index=False, sort=False)[["mean", "std"]].mean()
    metrics = metrics_present(table)
    methods = [m for m in run.explainers if m in set(table["method"])]
    fig, axes = panels(len(metrics), (max(3.3, 0.5 * len(methods) + 1.2), 4.4),
                       run.check.pair_label or "similarity")
    colors = method_colors(run.methods)
    for ax, metric in zip(axes, metrics):
        rows = table[table["metric"] == metric].set_index("method").reindex(methods)
        ax.bar(range(len(methods)), rows["mean"], width=0.65, yerr=rows["std"].fillna(0), capsize=3,
               color=[colors[m] for m in methods], error_kw={"elinewidth": 1})
        draw_controls(ax, table[table["metric"] == metric], run.controls)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
        limit_y(ax, metric, rows["mean"] - rows["std"].fillna(0), run)
        style_panel(ax, metric)
    fig.suptitle(run.title, fontsize=12)
    figure_legend(fig, axes)
    return fig


# ---------------------------------------------------------------- map grids


def normalize_abs(saliency: np.ndarray) -> np.ndarray:
    """(C, H, W) map -> (H, W) in [0, 1], black = low: the authors' grayscale.

    Sum of |map| over channels, (v - min) / (p99 - min), clipped: the top 1% saturate
    so that a few extreme pixels do not turn the rest black.
    """
    v = np.nan_to_num(np.abs(saliency).sum(axis=0))
    low = v.min()
    return np.clip((v - low) / _positive(np.percentile(v, 99) - low, v.max() - low), 0, 1)


def normalize_signed(saliency: np.ndarray) -> np.ndarray:
    """(C, H, W) map -> (H, W) in [-1, 1]: signed sum over channels over the 99th percentile of |v|."""
    v = np.nan_to_num(saliency.sum(axis=0))
    return np.clip(v / _positive(np.percentile(np.abs(v), 99), np.abs(v).max()), -1, 1)


def _positive(scale: float, fallback: float) -> float:
    """A sparse map can have p99 = 0: fall back to its max; an all-zero map stays all zero."""
    return scale if scale > 0 else (fallback if fallback > 0 else 1.0)


def map_figures(maps: Maps, run: Run, out: Path) -> list[Path]:
    """Grids for up to GRID_IMAGES example images: abs and diverging for the stepwise tests
    (paper Figs. 2 and 4), abs for the pair tests (paper Fig. 5)."""
    meta = maps.meta
    first_seed = meta["states"][0]["seed"]
    states = [s for s in meta["states"] if s["seed"] == first_seed]  # one randomization, as in the paper
    methods = [m for m in run.methods if f"{states[0]['key']}/{m}" in maps]
    names = {False: "maps"} if run.pair else {False: "grid_abs", True: "grid_diverging"}
    mosaics = build_mosaics(maps, [[f"{s['key']}/{m}" for s in states] for m in methods],
                            maps.images[:GRID_IMAGES], tuple(names))
    rows = [f"{m}\n(control)" if m in run.controls else m for m in methods]
    columns = ["input", *[s["block"] for s in states]]
    paths = []
    for (image, signed), mosaic in mosaics.items():
        title = f"{run.title}\n{image_caption(meta, image, signed)}"
        fig = map_grid_figure(mosaic, rows, columns, title)
        paths.append(save(fig, out / f"{run.test}_{names[signed]}_{image}.png", dpi=100))
    return paths


def methods_figure(maps: Maps, run: Run, out: Path) -> Path:
    """Paper Fig. 1: the reference model's map of every method, controls (the edge
    detector) included, for each example image (rows), in absolute-value grayscale."""
    meta = maps.meta
    first = meta["states"][0]["key"]
    methods = [m for m in run.methods if f"{first}/{m}" in maps]
    images = maps.images[:METHOD_ROWS]
    inputs = [image_tile(image) for image in images]
    columns = {m: maps.unit_maps(f"{first}/{m}") for m in methods}
    tiles = [[inputs[i], *[map_tile(columns[m][i], False, inputs[i].shape[:2]) for m in methods]]
             for i in range(len(images))]
    rows = [image_caption(meta, i, False).split(";")[0] or f"image {i}" for i in range(len(images))]
    labels = ["input", *[f"{m}\n(control)" if m in run.controls else m for m in methods]]
    title = f"{run.title}\n{meta['states'][0]['block']} model's maps; |map|, white = high"
    return save(map_grid_figure(assemble(tiles, 255), rows, labels, title), out / "methods.png", dpi=100)


def build_mosaics(maps: Maps, keys: list[list[str]], images: np.ndarray, signs: Sequence[bool]
                  ) -> dict[tuple[int, bool], np.ndarray]:
    """One RGB uint8 mosaic per (image, signed): methods down, the input then the states across.

    keys[r][c]: the key in maps.npz of method r at state c, holding (E, C_m, H, W) maps;
    images: (E, C, H, W) in [0, 1]. Each entry is decompressed once for all images and
    styles: decompression is the slow part of a full Inception run's grids.
    """
    inputs = [image_tile(image) for image in images]
    tiles = {(i, signed): [[inputs[i]] for _ in keys] for i in range(len(images)) for signed in signs}
    for r, row in enumerate(keys):
        for key in row:
            unit = maps.unit_maps(key)  # every tile is scaled on its own
            for (i, signed), grid in tiles.items():
                grid[r].append(map_tile(unit[i], signed, inputs[i].shape[:2]))
    # White is zero in the diverging colours, so there the gaps between tiles are grey.
    return {(i, signed): assemble(grid, 128 if signed else 255) for (i, signed), grid in tiles.items()}


def image_tile(image: np.ndarray) -> np.ndarray:
    """(C, H, W) input in [0, 1] -> (h, w, 3) uint8 thumbnail, at most TILE_PIXELS a side."""
    rgb = np.repeat(image[:1], 3, axis=0) if image.shape[0] == 1 else image[:3]
    factor = -(-max(image.shape[1:]) // TILE_PIXELS)
    shape = (image.shape[1] // factor, image.shape[2] // factor)
    return fit(np.clip(np.transpose(rgb, (1, 2, 0)), 0, 1), shape)


def map_tile(saliency: np.ndarray, signed: bool, shape: tuple[int, int]) -> np.ndarray:
    """(C_m, H, W) map -> (h, w, 3) uint8: grayscale of |map|, or the signed map in blue-white-red."""
    if signed:
        rgb = matplotlib.colormaps["bwr"]((normalize_signed(saliency) + 1) / 2)[..., :3]
    else:
        rgb = np.repeat(normalize_abs(saliency)[..., None], 3, axis=-1)
    return fit(rgb, shape)


def fit(rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> shape + (3,) uint8: block means first, so shrinking a
    noisy 299-pixel map does not alias, then nearest neighbour to the exact size."""
    factor = max(1, min(rgb.shape[0] // shape[0], rgb.shape[1] // shape[1]))
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    small = rgb[:h * factor, :w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
    rows, cols = np.arange(shape[0]) * h // shape[0], np.arange(shape[1]) * w // shape[1]
    return np.round(255 * small[np.ix_(rows, cols)]).astype(np.uint8)


def assemble(tiles: list[list[np.ndarray]], gap_level: int) -> np.ndarray:
    """Tiles (h, w, 3), all one size, into one (rows * h, cols * w, 3) image with thin gaps of grey level gap_level."""
    gap = max(1, tiles[0][0].shape[0] // 25)
    padded = [[np.pad(t, ((0, gap), (0, gap), (0, 0)), constant_values=gap_level) for t in row] for row in tiles]
    return np.concatenate([np.concatenate(row, axis=1) for row in padded], axis=0)[:-gap, :-gap]


def image_caption(meta: dict, image: int, signed: bool) -> str:
    """Which image and class, and how the maps are scaled."""
    parts = []
    if meta.get("image_ids"):
        parts.append(f"image {meta['image_ids'][image]}")
    if meta.get("labels"):
        label = meta["labels"][image]
        classes = meta.get("classes") or []
        parts.append(f"class {classes[label] if label < len(classes) else label}")
    scale = "signed, red > 0 > blue" if signed else "|map|, white = high"
    return "; ".join(filter(None, [", ".join(parts), f"{scale}, each map over its 99th percentile"]))


def map_grid_figure(mosaic: np.ndarray, row_labels: list[str], column_labels: list[str], title: str) -> Figure:
    """A mosaic of thumbnails (rows x columns of equal tiles, (H, W, 3)) with labelled rows and columns.

    One image on one axes rather than an axes per thumbnail: a 17-state by 10-method
    grid would otherwise spend seconds creating and drawing 190 axes.
    """
    figsize, rect, rotate = grid_layout(row_labels, column_labels, title)
    fig = Figure(figsize=figsize)
    ax = fig.add_axes(rect)
    ax.imshow(mosaic)
    height, width = mosaic.shape[:2]
    ax.set_xticks((np.arange(len(column_labels)) + 0.5) * width / len(column_labels), column_labels,
                  rotation=90 if rotate else 0, fontsize=GRID_FONT)
    ax.set_yticks((np.arange(len(row_labels)) + 0.5) * height / len(row_labels), row_labels, fontsize=GRID_FONT)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, pad=5)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=GRID_FONT + 1, y=1 - 0.1 / figsize[1], va="top")
    return fig


def grid_layout(row_labels: list[str], column_labels: list[str], title: str
                ) -> tuple[tuple[float, float], list[float], bool]:
    """Figure size (inches), the mosaic's axes rectangle (fractions) and whether column labels turn upright.

    Cells are at most 1.3 inches and the figure stays within about 24 x 16 inches,
    so a 17-state by 10-method Inception grid fits at dpi 100. The width grows, grid
    centred, when the title is wider than the grid.
    """
    n_rows, n_cols = len(row_labels), len(column_labels)
    char = 0.6 * GRID_FONT / 72  # inches per character, roughly
    left = 0.25 + char * max(len(line) for label in row_labels for line in label.split("\n"))
    cell = min(1.3, (23.5 - left) / n_cols)
    header = char * max(map(len, column_labels))
    rotate = header > 0.8 * cell  # labels closer than that run into each other
    top = 0.2 + 0.22 * (title.count("\n") + 1) + (header + 0.1 if rotate else 0.3)
    cell = min(cell, (15.8 - top) / n_rows)
    grid_width, grid_height = n_cols * cell, n_rows * cell
    width = max(left + grid_width + 0.15, 1.1 * char * max(map(len, title.split("\n"))) + 0.4)
    height = top + grid_height + 0.1
    pad = (width - left - grid_width - 0.15) / 2
    return (width, height), [(left + pad) / width, 0.1 / height, grid_width / width, grid_height / height], rotate


# ---------------------------------------------------------------- verdict figure

CHANGE_WORDS = {"below": "pass below", "above": "pass above"}


def draw_verdict_figure(run_dir: Path, verdicts: pd.DataFrame, *, level: float = 0.95, resamples: int = 1000,
                        seed: int = 0, suffix: str = "") -> Path | None:
    """The deciding metric of `verdicts` at every state, with its bootstrap interval and the
    threshold: run_dir/figures/{test}_verdict{suffix}.png (and .pdf). None when nothing decides."""
    deciding = verdicts[verdicts["decides"].astype(bool)]
    if deciding.empty:
        return None
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    first = deciding.iloc[0]
    intervals = interval_table(results, str(first["metric"]), level=level, resamples=resamples, seed=seed)
    run = describe_run(results, read_meta(run_dir), run_order(run_dir))
    fig = verdict_figure(intervals, deciding, run, level)
    return save(fig, run_dir / "figures" / f"{run.test}_verdict{suffix}.png")


def verdict_figure(intervals: pd.DataFrame, deciding: pd.DataFrame, run: Run, level: float) -> Figure:
    """Mean and interval per method (curves over the states, or bars for the pair tests),
    the threshold as a red line; each method's verdict in the legend when it has one verdict.

    intervals: interval_table's rows (method, step, block, mean, ci_low, ci_high);
    deciding: the verdict rows that decide (threshold, change, verdict per method and block).
    """
    metric, threshold, change = deciding.iloc[0][["metric", "threshold", "change"]]
    verdict_of = (deciding.groupby("method")["verdict"].agg(lambda v: v.iloc[0] if len(v) == 1 else None)
                  .to_dict())
    methods = [m for m in [*run.explainers, *run.controls] if m in set(intervals["method"])]
    colors = method_colors(run.methods)
    label = {m: f"{m}{' (control)' if m in run.controls else ''}"
                f"{': ' + verdict_of[m] if verdict_of.get(m) else ''}" for m in methods}
    pair = run.pair
    steps = intervals.drop_duplicates("step").sort_values("step")
    width = max(5.5, 0.55 * len(methods) + 1.5) if pair else max(6.0, 0.35 * len(steps) + 1.6)
    fig, (ax,) = panels(1, (width, 5.0), run.check.verdict_label)
    rows = intervals[intervals["step"] >= 1] if pair else intervals
    if pair:
        draw_interval_bars(ax, rows, methods, colors, run.controls)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    else:
        for method in methods:
            draw_interval_curve(ax, rows[rows["method"] == method].sort_values("step"), colors[method],
                                method in run.controls, label[method], method_style(method)[1])
        ax.set_xticks(steps["step"], steps["block"].astype(str), rotation=60, ha="right", rotation_mode="anchor",
                      fontsize=9)
        fig.supxlabel(run.xlabel, fontsize=10)
    ax.axhline(threshold, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.5,
               label=f"threshold {threshold:g} ({CHANGE_WORDS.get(change, change)})")
    limit_y(ax, metric, [*rows["ci_low"], threshold], run)
    style_panel(ax, metric)
    draws = "images and draws" if deciding["n_seeds"].max() > 1 else "images"
    ax.set_title(f"{METRIC_TITLES.get(metric, metric)}\nmean; {'bars' if pair else 'bands'}: {level:.0%} "
                 f"bootstrap interval over {draws}", fontsize=10)
    fig.suptitle(run.title, fontsize=12)
    if pair:
        handles = [Rectangle((0, 0), 1, 1, color=colors[m]) for m in methods]
        fig.legend([*handles, *ax.get_legend_handles_labels()[0]], [*(label[m] for m in methods),
                   *ax.get_legend_handles_labels()[1]], loc="outside right upper", fontsize=9)
    else:
        figure_legend(fig, [ax])
    return fig


def draw_interval_curve(ax: Axes, line: pd.DataFrame, color, is_control: bool, label: str,
                        marker: str = "o") -> None:
    """A method's mean over the states with its interval as a band; controls dashed and grey-banded."""
    if line.empty:
        return
    ax.plot(line["step"], line["mean"], marker=marker, markersize=4, color=color, label=label,
            linestyle="--" if is_control else "-", linewidth=1.2 if is_control else 1.6)
    ax.fill_between(line["step"], line["ci_low"], line["ci_high"], color=color, alpha=0.1 if is_control else 0.2,
                    linewidth=0)


def draw_interval_bars(ax: Axes, rows: pd.DataFrame, methods: Sequence[str], colors: dict, controls: Sequence[str]
                       ) -> None:
    """One bar per method at its mean, the interval as an error bar; controls hatched."""
    table = rows.groupby("method")[["mean", "ci_low", "ci_high"]].mean().reindex(methods)
    errors = np.vstack([table["mean"] - table["ci_low"], table["ci_high"] - table["mean"]])
    bars = ax.bar(range(len(methods)), table["mean"], width=0.65, color=[colors[m] for m in methods],
                  yerr=np.nan_to_num(errors), capsize=3, error_kw={"elinewidth": 1})
    for bar, method in zip(bars, methods):
        if method in controls:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
