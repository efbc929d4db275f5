"""Rerun the paper's figures: one entry of conf/experiment/ per figure and model.

`sanity paper FIG [overrides]` runs every experiment of a figure (or of all of them)
into OUT/EXPERIMENT/, skipping, with a message that names what is missing and how to
supply it, those whose pretrained weights, images or dataset files are not here. Any
other problem, a bad override above all, stops the rerun before the first experiment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sanity_cli.configs import config_dir
from sanity_cli.data import DatasetUnavailable
from sanity_cli.errors import SanityError
from sanity_cli.metrics import compare
from sanity_cli.runfiles import open_maps
from sanity_cli.settings import Settings

log = logging.getLogger(__name__)

FIGURES: dict[str, list[str]] = {
    "fig1": ["fig1_edge_fashion_cnn", "fig1_edge_inception"],
    "fig2": ["fig3_cascade_inception"],  # the cascade run draws the Fig. 2 grids
    "fig3": ["fig3_cascade_fashion_cnn", "fig3_cascade_mnist_mlp", "fig3_cascade_inception"],
    "fig4": ["fig4_independent_fashion_cnn", "fig4_independent_inception"],
    "fig5": ["fig5_data_mnist_cnn"],
    "fig6": ["fig6_data_fashion_cnn"],
}


@dataclass
class Outcome:
    experiment: str
    status: str          # "done" or "skipped"
    detail: str          # the run directory, or why it was skipped
    seconds: float = 0.0


def experiments(figure: str) -> list[str]:
    """The experiments of one figure, or of every figure for "all"."""
    if figure == "all":
        return list(dict.fromkeys(name for names in FIGURES.values() for name in names))
    if figure not in FIGURES:
        raise SanityError(f"unknown figure '{figure}'; choose one of: {', '.join(FIGURES)}, all")
    return FIGURES[figure]


def compose_experiment(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={name}", *overrides])


def missing_inputs(cfg: DictConfig) -> str | None:
    """What a run needs that is not on this machine (pretrained weights, an image folder), or None."""
    from omegaconf import OmegaConf

    model = cfg.model
    if model.kind == "timm" and model.get("checkpoint") and not Path(model.checkpoint).expanduser().is_file():
        return f"checkpoint {model.checkpoint} does not exist; pass model.checkpoint=PATH to the weights file"
    if model.kind == "timm" and model.pretrained and not model.get("checkpoint") and not _weights_cached(model.name):
        return (f"pretrained weights of {model.name} are not in timm's cache; run once with network access, "
                "or pass model.checkpoint=PATH to a local weights file")
    if cfg.dataset.name == "imagefolder":
        path = cfg.dataset.path if not OmegaConf.is_missing(cfg.dataset, "path") else None
        if not path or not Path(path).expanduser().is_dir():
            return "ImageNet validation images are missing; pass dataset.path=PATH to a folder of class sub-folders"
    return None


def _weights_cached(name: str) -> bool:
    """Whether timm can load `name`'s pretrained weights without the network."""
    from sanity_cli.models import pretrained_weights_cached

    return pretrained_weights_cached(name)


def rerun(figure: str, overrides: list[str], out: Path) -> list[Outcome]:
    """Run the experiments of `figure` into `out`; a finished experiment is not rerun.
    Every experiment's settings are checked first: SanityError for a bad one."""
    from sanity_cli.pipeline import run

    configs = {name: compose_experiment(name, overrides) for name in experiments(figure)}
    for name, cfg in configs.items():
        cfg.resume = (out / name / "results.csv").exists()  # continue, or skip what is finished
    settings = {name: Settings.from_config(cfg) for name, cfg in configs.items()}  # all checked here, once
    outcomes = []
    for name, cfg in configs.items():
        missing = missing_inputs(cfg)
        if missing:
            outcomes.append(Outcome(name, "skipped", missing))
            log.warning("%s skipped: %s", name, missing)
            continue
        run_dir = out / name
        started = time.perf_counter()
        try:
            run(settings[name], run_dir)
        except DatasetUnavailable as error:  # e.g. MNIST neither present nor downloadable
            outcomes.append(Outcome(name, "skipped", str(error)))
            log.warning("%s skipped: %s", name, error)
            continue
        if name.startswith("fig1"):
            edge_similarity(run_dir).to_csv(run_dir / "edge_similarity.csv", index=False)
        outcomes.append(Outcome(name, "done", str(run_dir), time.perf_counter() - started))
    return outcomes


def edge_similarity(run_dir: Path, edge: str = "edge") -> pd.DataFrame:
    """Paper Fig. 1 in numbers: how much each method's map of the trained model
    resembles the edge detector's map of the same image (mean and std over the
    images whose maps the run kept, in their own units: the stored maps times their scales)."""
    with open_maps(run_dir) as kept:
        if kept is None:
            raise SanityError(f"{run_dir} has no maps.npz: the run kept no maps to compare with the edge detector's")
        first = kept.meta["states"][0]["key"]
        reference = torch.from_numpy(kept.maps(f"{first}/{edge}"))
        rows = []
        for method in kept.meta["methods"]:
            if method == edge or f"{first}/{method}" not in kept:
                continue
            maps = torch.from_numpy(kept.maps(f"{first}/{method}"))
            if maps.shape[1] != reference.shape[1]:  # GradCAM's one channel against the input's
                maps = maps.expand_as(reference)
            for metric, values in compare(reference, maps, ["spearman_abs", "ssim"]).items():
                rows.append({"method": method, "metric": metric, "mean": values.nanmean().item(),
                             "std": values[~values.isnan()].std().item(), "n": int((~values.isnan()).sum())})
    return pd.DataFrame(rows)
