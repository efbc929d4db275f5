"""Manifold alignment (Bordt, Upadhyay, Akata, von Luxburg, CVPR-W 2023): does each
method's map of the trained model lie in the tangent space of the data manifold?

Step 0 holds each map scaled to unit length; step 1 the same maps (not explained again)
projected onto the tangent space at the image (sanity_cli.manifold), so that the score,
the length of what a step holds, is 1 at step 0 and ||P_T a|| / ||a|| at step 1. Step 1 also records each image's
reconstruction R^2 through the manifold and sqrt(k/d), the fraction a random direction
keeps. The verdict per method: `aligned` when its interval lies above the reference
(the random control's interval, else sqrt(k/d)) by `test.margin`, `not aligned` when it
lies below that, `inconclusive` when it contains it; `not valid` for every method when
the manifold reconstructs the explained images worse than `test.min_reconstruction`
or the model is near chance on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import Tensor

from sanity_cli import manifold as geometry
from sanity_cli.checks.base import Check, Compare, Condition, Subject
from sanity_cli.errors import SanityError
from sanity_cli.methods.registry import kind_of
from sanity_cli.randomization import State
from sanity_cli.training import TrainedModel

MAP, TANGENT = "unit map", "tangent space"
FRACTION, RECONSTRUCTION, CHANCE = "tangent_fraction", "reconstruction_r2", "chance_fraction"
OUTCOMES = {"pass": "aligned", "fail": "not aligned", "inconclusive": "inconclusive", "undefined": "undefined"}


class ManifoldAlignment(Check):
    name = "manifold"
    verdict_metric = FRACTION
    higher_means_change = True
    compares_maps = False

    def conditions(self, subject: Subject, seed: int) -> Iterator[Condition]:
        model, data = subject.models["trained"], subject.models["manifold"]
        yield Condition(State(0, MAP, ()), model, transform=lambda maps, images, ids: (unit_maps(maps), {}))
        yield Condition(State(1, TANGENT, ()), model, explain=False,  # step 0's maps, projected
                        transform=lambda maps, images, ids: tangent_parts(data, maps, images))

    def check_fit(self, subject: Subject) -> None:
        if "manifold" not in subject.models:
            raise SanityError("test=manifold needs the data manifold, which `sanity run test=manifold` trains on the "
                              "dataset (or builds from test.decoder); check() from Python does not make one")

    def score(self, reference: Tensor, maps: Tensor, compare: Compare, settings: Mapping) -> dict[str, Tensor]:
        """The length of each map as the state holds it: 1 (unit maps), then ||P_T a|| / ||a||."""
        length = maps.flatten(1).double().norm(dim=1)
        zero = reference.flatten(1).abs().amax(dim=1) == 0
        return {FRACTION: length.masked_fill(zero.to(length.device), float("nan"))}

    def decisive(self, results: pd.DataFrame) -> pd.DataFrame:
        return results[results["step"] == 1]

    def extra_models(self, settings, dataset, spec, device) -> dict[str, TrainedModel]:
        test = settings.test
        pixels = spec.channels * spec.size * spec.size
        if test.get("decoder") and test.decoder.get("_target_"):
            module = geometry.user_autoencoder(test.decoder, spec.channels)
            return {"manifold": TrainedModel(geometry.Manifold(module, spec.mean, spec.std).to(device).eval(),
                                             None, None, "checkpoint" if test.decoder.get("checkpoint") else "given")}
        if test.latent_dim >= pixels:
            raise SanityError(f"test.latent_dim={test.latent_dim} must be below the number of pixels d={pixels} "
                              f"({spec.channels}x{spec.size}x{spec.size}): a tangent space of every direction holds "
                              "every map; e.g. test.latent_dim=10")
        if dataset.train_x is None:
            raise SanityError(f"test=manifold trains a VAE on the training split, but "
                              f"dataset={settings.dataset.name} has none; give test.decoder._target_ (your own "
                              "decoder) or a dataset with a training split")
        from sanity_cli.data import adapt_images

        dataset_settings = OmegaConf.to_container(settings.dataset.group, resolve=True)
        dataset_settings.pop("system_dir", None)  # where a copy lies does not change the weights
        trained = geometry.train_or_load_vae(adapt_images(dataset.train_x, spec.channels, spec.size),
                                             adapt_images(dataset.test_x, spec.channels, spec.size), test.latent_dim,
                                             test.vae_epochs, test.vae_lr, {"dataset": dataset_settings}, settings.seed,
                                             settings.cache_dir, device)
        trained.model = geometry.Manifold(trained.model, spec.mean, spec.std).to(device).eval()
        return {"manifold": trained}

    def judge(self, decisive: pd.DataFrame, settings, seed: int, run_settings: Mapping) -> list[dict]:
        from sanity_cli.bootstrap import summarize_scores
        from sanity_cli.judging import judged_summary, seeds_agree

        test = {**defaults(), **(run_settings.get("test") or {})}
        controls = set(run_settings.get("controls") or ())
        chance = float(decisive.loc[decisive["metric"] == CHANCE, "value"].mean())
        reason = not_valid_reason(decisive, test, run_settings.get("target", "predicted"))
        parts = dict(list(decisive[decisive["metric"] == FRACTION].groupby(
            ["test", "model", "dataset", "method", "block"], sort=False)))
        summaries = {key: summarize_scores(part, level=settings.level, resamples=settings.resamples, seed=seed)
                     for key, part in parts.items()}
        random = [s for key, s in summaries.items() if key[3] in controls and _is_random(key[3], run_settings)]
        if random and math.isfinite(random[0]["ci_high"]):
            reference = random[0]["ci_high"]
            against = (f"random control {random[0]['mean']:.3f} [{random[0]['ci_low']:.3f}, "
                       f"{random[0]['ci_high']:.3f}]")
        else:
            reference, against = chance, "no random control: sqrt(k/d)"
        threshold = reference + float(test["margin"])
        rows = []
        for (name, model, dataset, method, block), part in parts.items():
            # the verdict's own interval, with the Monte Carlo error of its ends and the draws' agreement
            summary, raw, borderline = judged_summary(part, threshold, True, settings, seed)
            outcome = OUTCOMES[raw]
            note = f"aligned above {against} + margin {float(test['margin']):g}; sqrt(k/d) = {chance:.3f}"
            if method in controls:
                note = f"control: {note}"
            rows.append({"test": name, "model": model, "dataset": dataset, "method": method, "step": 1,
                         "block": block, "metric": FRACTION, "decides": True, **summary, "level": settings.level,
                         "threshold": threshold, "change": "above", "outcome": outcome, "borderline": borderline,
                         "seeds_agree": seeds_agree(part, raw, threshold, True, settings, seed),
                         "verdict": "not valid" if reason else outcome,
                         "note": f"not valid: {reason}; {note}" if reason else note})
        return rows

    meanings = {"aligned": "pass", "not aligned": "fail"}

    passes_mean = ("the map lies along the data: more of it falls in the tangent space of a generative model of "
                   "the images than a random map's does")
    fails_mean = ("the map lies no more along the data (the tangent space of a generative model of the images) "
                  "than a random map does")

    def figures(self, run_dir: Path, verdicts: pd.DataFrame) -> list[Path]:
        from sanity_cli.manifold_figures import draw_manifold

        return draw_manifold(run_dir, verdicts)


def unit_maps(maps: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each map (B, C, H, W) divided by its length (a zero map stays zero)."""
    out = {}
    for name, value in maps.items():
        length = value.flatten(1).norm(dim=1).view(-1, *([1] * (value.dim() - 1)))
        out[name] = torch.where(length > 0, value / length.clamp_min(1e-30), value)
    return out


def tangent_parts(data: geometry.Manifold, maps: dict[str, Tensor], images: Tensor
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each unit map's part in the tangent space at its image, and the state's per-image
    scores: the manifold's reconstruction R^2 and sqrt(k/d)."""
    basis = data.basis(images)
    d, k = basis.shape[1], basis.shape[2]
    parts = {name: geometry.projected_maps(basis, value, data.channels) for name, value in unit_maps(maps).items()}
    chance = torch.full((len(images),), geometry.random_fraction(k, d), dtype=torch.float64)
    return parts, {RECONSTRUCTION: data.reconstruction(images), CHANCE: chance}


def not_valid_reason(decisive: pd.DataFrame, test: Mapping, target: str) -> str:
    """Why the measure means nothing on this run ('' when it does): the manifold does not
    reconstruct the explained images, or the model is near chance on them (both when both)."""
    from sanity_cli.training import near_chance

    reasons = []
    r2 = decisive.loc[decisive["metric"] == RECONSTRUCTION].drop_duplicates("image")["value"]
    if len(r2) and r2.mean() < float(test["min_reconstruction"]):
        reasons.append(f"the manifold reconstructs the explained images with R^2 {r2.mean():.2f} < "
                       f"test.min_reconstruction={float(test['min_reconstruction']):g}, so its tangent spaces are "
                       "not the data's (raise test.vae_epochs or test.latent_dim)")
    rows = decisive[decisive["metric"] == FRACTION].drop_duplicates("image")
    labelled = rows[rows["label"] >= 0]
    if target != "label" and len(labelled):  # explaining the labels hides what the model predicts
        accuracy = float((labelled["label"] == labelled["target"]).mean())
        if near_chance(accuracy, torch.tensor(labelled["label"].to_numpy().copy())):
            reasons.append(f"the model's accuracy on the explained images is {accuracy:.2f}, near chance: "
                           "it learned nothing to explain")
    return " and ".join(reasons)


def _is_random(method: str, run_settings: Mapping) -> bool:
    return kind_of(method, (run_settings.get("method") or {}).get(method) or {}) == "random"


def defaults() -> dict:
    """conf/test/manifold.yaml: the settings a table judged without its run's falls back on."""
    from sanity_cli.configs import config_dir

    return OmegaConf.to_container(OmegaConf.load(config_dir() / "test" / "manifold.yaml"), resolve=True)


CHECK = ManifoldAlignment()
