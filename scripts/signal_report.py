"""The signal check of a trained model's maps (sanity_cli.signal), as a Markdown table.

Trains (or loads from the model cache) the model that `sanity run OVERRIDES` would use,
explains its test images with the selected methods (the paper's set by default) and
prints, per method, how much its maps follow the image and how coherent they are,
next to a random map's figures:

    python scripts/signal_report.py                                   # digits, cnn
    python scripts/signal_report.py model.init=paper
    python scripts/signal_report.py dataset=fashion_mnist train.epochs=3
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir

from sanity_cli.cli import config_dir
from sanity_cli.methods import explain_all, is_control
from sanity_cli.pipeline import method_options, prepare, run_device, selected_methods
from sanity_cli.settings import Settings
from sanity_cli.signal import FIGURES, signal_table


def report(overrides: list[str]) -> str:
    """The Markdown table of the trained model's signal figures for `overrides`."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    settings = Settings.from_config(cfg)
    torch.manual_seed(settings.seed)
    prepared = prepare(settings, run_device(settings))
    trained = prepared.models["trained"]
    options = method_options(selected_methods(settings), settings.seed, settings.model.gradcam_layer, settings.seed)
    maps = explain_all(trained.model, prepared.images, "predicted", options, max_batch=settings.max_batch)
    controls = [name for name in maps if is_control(name, cfg.method[name])]
    table = signal_table(maps, prepared.display.to(prepared.images.device), controls=controls, seed=cfg.seed)
    header = (f"{cfg.model.name} (init {cfg.model.get('init', '-')}) on {cfg.dataset.name}, "
              f"{len(prepared.images)} images, test accuracy {trained.test_accuracy}")
    lines = [header, "", "| method | " + " | ".join(FIGURES) + " | excess | informative |",
             "|---" * (len(FIGURES) + 3) + "|"]
    for row in table.itertuples():
        figures = " | ".join(f"{getattr(row, f):.2f} ± {getattr(row, f + '_std'):.2f}" for f in FIGURES)
        lines.append(f"| {row.method} | {figures} | {row.excess:.2f} | {'yes' if row.informative else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1:]))
