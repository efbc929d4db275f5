"""Controls that use no model: an edge detector and a random map (paper Fig. 1).

Neither makes a forward pass. The edge map is computed on the channel mean of the
input (a grey image) and repeated over the C channels: one edge image per input,
whatever C, so that "sum over channels" normalizations see just that image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sanity_cli.methods.noise import draw_noise, image_generators

# Sobel derivative along x (columns): smoothing [1, 2, 1] / 4 across, [1, 0, -1] along,
# as scikit-image's sobel_v; its transpose is the derivative along y.
_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4


def sobel_magnitude(gray: Tensor) -> Tensor:
    """Sobel gradient magnitude of gray images (B, 1, H, W); (B, 1, H, W).

    Matches ``skimage.filters.sobel``: sqrt((gx^2 + gy^2) / 2), edges padded by
    repeating the border pixel (scipy's "reflect" for a 3x3 kernel).
    """
    kernel_x = _SOBEL_X.to(dtype=gray.dtype, device=gray.device)
    kernels = torch.stack([kernel_x, kernel_x.T])[:, None]  # (2, 1, 3, 3)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    derivatives = F.conv2d(padded, kernels)  # (B, 2, H, W)
    return torch.sqrt((derivatives**2).sum(dim=1, keepdim=True) / 2)


def canny_edges(gray: Tensor, sigma: float) -> Tensor:
    """Canny edges (0 or 1) of gray images (B, 1, H, W), by ``skimage.feature.canny``
    on the CPU with its default thresholds; (B, 1, H, W)."""
    from skimage.feature import canny  # optional, only the canny detector needs it

    images = gray[:, 0].detach().cpu().double().numpy()
    edges = np.stack([canny(image, sigma=sigma) for image in images])
    return torch.as_tensor(edges, dtype=gray.dtype, device=gray.device)[:, None]


def edge_map(x: Tensor, detector: str, sigma: float) -> Tensor:
    """Edge map of x (B, C, H, W) with ``detector`` "sobel" or "canny" (``sigma`` is
    Canny's Gaussian width), of the channel mean, repeated over C; (B, C, H, W)."""
    gray = x.detach().mean(dim=1, keepdim=True)
    edges = sobel_magnitude(gray) if detector == "sobel" else canny_edges(gray, sigma)
    return edges.expand_as(x).contiguous()


def random_map(x: Tensor, seed: int, ids: Tensor | None = None) -> Tensor:
    """Standard normal noise of x's shape (B, C, H, W), dtype and device, from a
    generator per image seeded with ``seed`` and the image's id (``ids`` (B,), else its
    position): the same map for any model, and for an image whatever its batch."""
    return draw_noise(image_generators(len(x), seed, x.device, ids), x.shape[1:], x.dtype, x.device)
