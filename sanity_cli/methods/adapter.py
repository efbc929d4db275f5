"""What the adapters of plugged methods share: the plan of one method, and seeding.

An adapter (:mod:`~sanity_cli.methods.captum_adapter`,
:mod:`~sanity_cli.methods.zennit_adapter`, the callable of
:mod:`~sanity_cli.methods.external`) turns a method's options into a :class:`Plan`:
how it explains a chunk of the batch, and what it is known to get wrong on some
models, which the preflight then looks for.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Plan:
    """How one plugged method explains a chunk: (b, C, H, W), (b,) -> maps."""

    describe: str                                  # e.g. "captum DeepLift", for messages
    explain: Callable[[Tensor, Tensor], Tensor]
    inputs_per_image: int = 1                      # inputs one image becomes in a forward
    functional_relu_fails: bool = False            # a ReLU called as a function is mishandled
    reuse_breaks: Callable[[nn.Module], bool] | None = None  # leaf modules that must run once per forward
    needs_relu_module: bool = False
    without_rule: list[str] = field(default_factory=list)  # Captum LRP: leaf modules it has no rule for


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's (CPU and the device's), NumPy's and Python's generators seeded, and
    restored after: the same draws in every model state, nothing changed for the caller."""
    devices = [device] if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
