"""SmoothGrad and VarGrad: the mean and the variance of a base method's maps over
noisy copies x + N(0, sigma^2) of each input.

sigma = ``noise`` * (max - min) of each image (per image, as the authors' code).
Each image's noise comes from a ``torch.Generator`` of its own, seeded from ``seed``
and the image's id (its index in the dataset when the pipeline explains it, else its
position in the batch), drawn sample by sample. So a run repeats exactly, the noise
does not depend on ``max_batch`` nor on which other images share the batch (a shard
of the images draws what the whole run draws), and the first n samples of a longer
run are the n samples of a shorter one. It does depend on the device's generator
(CPU and CUDA draw different numbers).

Sharing: all smoothgrad / vargrad calls with the same ``noise`` and ``seed`` are one
group and see the same noisy inputs: the group draws max(samples) noisy copies, and
each noisy chunk goes once through the base methods that are still needed (several
one-pass bases share one forward there). So smoothgrad + vargrad of the same base
cost the passes of the longer of the two alone.

Statistics are over samples (population variance, as Captum's NoiseTunnel vargrad),
accumulated in float64 relative to each image's first noisy map: exact when all
samples are equal (noise 0 gives vargrad 0 and smoothgrad = the base map).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from sanity_cli.methods.gradients import accumulation_dtype
from sanity_cli.methods.registry import MethodCall

# (noisy inputs (N, C, H, W), their targets (N,), base calls) -> base maps (N, ...)
BaseMaps = Callable[[Tensor, Tensor, Sequence[MethodCall]], dict[MethodCall, Tensor]]


def noise_scale(x: Tensor, noise: float) -> Tensor:
    """Noise std per image of x (B, C, H, W): noise * (max - min); (B, 1, 1, 1)."""
    value_range = x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))
    return (noise * value_range).view(-1, 1, 1, 1)


def image_seed(seed: int, image: int) -> int:
    """The seed of one image's noise: derived from the run's ``seed`` and the image's id."""
    digest = hashlib.sha256(f"{seed}/image {image}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def image_generators(
    n: int, seed: int, device: torch.device, ids: Tensor | None = None
) -> list[torch.Generator]:
    """One generator per image, seeded by :func:`image_seed` from ``seed`` and the
    image's id (``ids`` (n,), or the positions 0..n-1 when None)."""
    keys = range(n) if ids is None else [int(i) for i in ids.tolist()]
    if len(keys) != n:
        raise ValueError(f"{len(keys)} image ids for {n} images")
    return [torch.Generator(device=device).manual_seed(image_seed(seed, k)) for k in keys]


def draw_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The next standard normal draw of each image's generator: (B, *shape)."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=g, dtype=dtype, device=device) for g in generators]
    )


def noisy_chunks(
    x: Tensor, sigma: Tensor, samples: int, seed: int, max_batch: int, ids: Tensor | None = None
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Noisy copies of x (B, C, H, W) in sample-major order, ``max_batch`` at a time.

    ``ids`` (B,) name the images for their noise (see the module's docstring).
    Yields (inputs (N, C, H, W), image index (N,), sample index (N,)).
    """
    generators = image_generators(len(x), seed, x.device, ids)
    images = torch.arange(len(x), device=x.device)
    pending: list[tuple[Tensor, Tensor, Tensor]] = []
    pending_size = 0
    for sample in range(samples):
        noise = draw_noise(generators, x.shape[1:], x.dtype, x.device)
        noisy = x + sigma * noise
        start = 0
        while start < len(x):
            take = min(max_batch - pending_size, len(x) - start)
            rows = slice(start, start + take)
            pending.append((noisy[rows], images[rows], torch.full_like(images[rows], sample)))
            pending_size += take
            start += take
            if pending_size == max_batch:
                yield _concat(pending)
                pending, pending_size = [], 0
    if pending:
        yield _concat(pending)


def _concat(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    inputs, images, samples = zip(*parts, strict=True)
    return torch.cat(inputs), torch.cat(images), torch.cat(samples)


class _Moments:
    """Mean and variance over the first ``samples`` noisy maps of each of B images.

    Sums are of the difference to the image's first map (sample 0, which comes
    first in sample-major order), in a wide dtype, to avoid cancellation. The sum
    of squares is kept only if ``second`` (a variance or mean square is asked for):
    it is a third (B, ...) array in the wide dtype.
    """

    def __init__(self, batch: int, samples: int, second: bool = True) -> None:
        self.batch = batch
        self.samples = samples
        self.second = second
        self.shift: Tensor | None = None
        self.sum: Tensor | None = None
        self.sum_squares: Tensor | None = None

    def add(self, maps: Tensor, image: Tensor, sample: Tensor) -> None:
        keep = sample < self.samples
        maps, image, sample = maps[keep], image[keep], sample[keep]
        if self.shift is None:
            shape = (self.batch, *maps.shape[1:])
            wide = accumulation_dtype(maps)
            self.shift = maps.new_zeros(shape)
            self.sum = maps.new_zeros(shape, dtype=wide)
            self.sum_squares = maps.new_zeros(shape, dtype=wide) if self.second else None
        first = sample == 0
        self.shift[image[first]] = maps[first]
        difference = maps.to(self.sum.dtype) - self.shift[image].to(self.sum.dtype)
        self.sum.index_add_(0, image, difference)
        if self.second:
            self.sum_squares.index_add_(0, image, difference * difference)

    def mean(self) -> Tensor:
        return (self.shift.to(self.sum.dtype) + self.sum / self.samples).to(self.shift.dtype)

    def variance(self) -> Tensor:
        mean_difference = self.sum / self.samples
        variance = (self.sum_squares / self.samples - mean_difference**2).clamp(min=0)
        return variance.to(self.shift.dtype)

    def mean_square(self) -> Tensor:
        mean = self.shift.to(self.sum.dtype) + self.sum / self.samples
        return (self.variance().to(self.sum.dtype) + mean**2).to(self.shift.dtype)


def _statistic(call: MethodCall, moments: _Moments) -> Tensor:
    if call.method == "vargrad":
        return moments.variance()
    return moments.mean_square() if call.option("square") else moments.mean()


def noise_maps(
    x: Tensor,
    target: Tensor,
    calls: Sequence[MethodCall],
    base_maps: BaseMaps,
    max_batch: int,
    ids: Tensor | None = None,
) -> dict[MethodCall, Tensor]:
    """smoothgrad / vargrad ``calls`` on x (B, C, H, W) for the (B,) targets.

    ``base_maps`` computes base methods on a chunk of at most ``max_batch`` noisy
    inputs (the planner passes itself, so bases share passes there). ``ids`` (B,)
    name the images for their noise. Returns maps of the base method's shape.
    """
    groups: dict[tuple[float, int], list[MethodCall]] = defaultdict(list)
    for call in calls:
        groups[(float(call.option("noise")), call.option("seed"))].append(call)
    maps: dict[MethodCall, Tensor] = {}
    for (noise, seed), group in groups.items():
        maps.update(_noise_group(x, target, group, noise, seed, base_maps, max_batch, ids))
    return maps


def _noise_group(
    x: Tensor,
    target: Tensor,
    calls: list[MethodCall],
    noise: float,
    seed: int,
    base_maps: BaseMaps,
    max_batch: int,
    ids: Tensor | None,
) -> dict[MethodCall, Tensor]:
    """One set of noisy passes for calls that share ``noise`` and ``seed``."""
    second: dict[tuple[MethodCall, int], bool] = defaultdict(bool)
    for call in calls:
        needs = call.method == "vargrad" or bool(call.option("square"))
        second[(call.option("base"), call.option("samples"))] |= needs
    moments = {key: _Moments(len(x), key[1], needs) for key, needs in second.items()}
    most_samples = max(samples for _, samples in moments)
    sigma = noise_scale(x, noise)
    for inputs, image, sample in noisy_chunks(x, sigma, most_samples, seed, max_batch, ids):
        # A base only wanted by shorter runs is not computed once they are complete.
        first_sample = int(sample.min())
        needed = list(dict.fromkeys(base for base, n in moments if first_sample < n))
        maps = base_maps(inputs, target[image], needed)
        for (base, n), moment in moments.items():
            if first_sample < n:
                moment.add(maps[base], image, sample)
    return {
        call: _statistic(call, moments[(call.option("base"), call.option("samples"))])
        for call in calls
    }
