"""Non-finite values stopped where they appear, in one line that names their source.

A NaN in the images, in a model's logits or in a method's maps would otherwise run
through every state and end as "undefined" verdicts with no word on why. Each check
here names what gave the values (the images, the model, the method) and the state,
and says what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from sanity_cli.errors import SanityError


def bad_rows(values: Tensor) -> tuple[int, str]:
    """How many of the (B, ...) rows hold a value that is not finite, and which kind
    ("NaN", "infinite", or "NaN and infinite"); (0, "") when all are finite."""
    flat = values.detach().reshape(len(values), -1)
    finite = torch.isfinite(flat)
    bad = int((~finite.all(dim=1)).sum())
    if not bad:
        return 0, ""
    nan, inf = bool(torch.isnan(flat).any()), bool(torch.isinf(flat).any())
    return bad, " and ".join(kind for kind, found in (("NaN", nan), ("infinite", inf)) if found)


def check_images(images: Tensor, dataset: str, split: str) -> None:
    """SanityError when any of the (N, C, H, W) images of `split` is not finite."""
    bad, kind = bad_rows(images)
    if bad:
        raise SanityError(f"{bad} of the {len(images)} {split} images of dataset={dataset} hold {kind} values; "
                          "fix the dataset (every pixel must be a number in [0, 1])")


def check_logits(logits: Tensor, model: str, state: str) -> None:
    """SanityError when the (B, K) logits of the model in `state` are not finite for some image."""
    bad, kind = bad_rows(logits)
    if bad:
        raise SanityError(f"model={model} gives {kind} logits for {bad} of {len(logits)} images ({state}), so no "
                          "map of it means anything; check the model (its weights, its normalization) on these "
                          "inputs")


def check_maps(maps: Mapping[str, Tensor], state: str) -> None:
    """SanityError naming the first method whose (B, C, H, W) maps in `state` are not finite."""
    for method, values in maps.items():
        bad, kind = bad_rows(values)
        if bad:
            raise SanityError(f"method {method} gave {kind} maps for {bad} of {len(values)} images ({state}), which "
                              "no similarity can score; fix the method, or leave it out of method=")
