"""Integrated Gradients: (x - baseline) times the path integral of the gradient.

Rules for the integral over alpha in [0, 1] (``rule`` option), as (alphas, weights):

* ``paper`` (default): the authors' code: alphas = linspace(0, 1, steps), the mean
  of the gradients (weights 1 / steps), i.e. a Riemann sum that counts both ends.
* ``riemann_left`` / ``riemann_right`` / ``riemann_middle``: Captum's definitions:
  alphas = linspace(0, 1 - 1/n, n) / linspace(1/n, 1, n) / linspace(1/2n, 1 - 1/2n,
  n), weights 1 / n.
* ``riemann_trapezoid``: alphas = linspace(0, 1, n), weights 1 / n halved at both
  ends (Captum's, whose weights sum to 1 - 1/n).
* ``gausslegendre``: Gauss-Legendre nodes and weights mapped from [-1, 1] to [0, 1]
  (Captum's default rule).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from sanity_cli.methods.gradients import accumulation_dtype, input_gradient


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights), each of length ``steps``, for ``rule`` (module docstring)."""
    n = steps
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    weights = np.full(n, 1.0 / n)
    if rule in ("paper", "riemann_trapezoid"):
        alphas = np.linspace(0.0, 1.0, n)
        if rule == "riemann_trapezoid":
            weights[[0, -1]] /= 2
        return alphas, weights
    start, stop = {
        "riemann_left": (0.0, 1.0 - 1.0 / n),
        "riemann_right": (1.0 / n, 1.0),
        "riemann_middle": (0.5 / n, 1.0 - 0.5 / n),
    }[rule]
    return np.linspace(start, stop, n), weights


def _path_chunks(batch: int, steps: int, max_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(step, image) index pairs of the step-major sequence of interpolated inputs,
    ``max_batch`` at a time: the chunks do not depend on how many fit in one."""
    flat = torch.arange(batch * steps)
    for chunk in flat.split(max_batch):
        yield chunk // batch, chunk % batch


def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    steps: int,
    baseline: str | float,
    rule: str,
    max_batch: int,
) -> Tensor:
    """Integrated Gradients of x (B, C, H, W) for the (B,) target classes; (B, C, H, W).

    ``baseline`` is "zero" or a constant. The B * steps interpolated inputs
    baseline + alpha * (x - baseline) go through the model ``max_batch`` at a time,
    one forward and one backward per chunk.
    """
    base = torch.zeros_like(x) if baseline == "zero" else torch.full_like(x, float(baseline))
    alphas, weights = quadrature(rule, steps)
    alphas_t = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
    # A wide accumulator keeps the sum of many small terms accurate.
    wide = accumulation_dtype(x)
    weights_t = torch.as_tensor(weights, dtype=wide, device=x.device)
    path_sum = torch.zeros(x.shape, dtype=wide, device=x.device)
    for step, image in _path_chunks(len(x), steps, max_batch):
        step, image = step.to(x.device), image.to(x.device)
        alpha = alphas_t[step].view(-1, 1, 1, 1)
        inputs = base[image] + alpha * (x[image] - base[image])
        gradient = input_gradient(model, inputs, target[image])
        path_sum.index_add_(0, image, gradient.to(wide) * weights_t[step].view(-1, 1, 1, 1))
    return (path_sum * (x - base).to(wide)).to(x.dtype)
