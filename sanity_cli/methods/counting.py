"""Counting the forward and backward passes that the methods make.

Every model call and every ``torch.autograd.grad`` call made by this package goes
through :func:`record_forward` / :func:`record_backward`, so a benchmark or a test
can compare the shared plan of :func:`~sanity_cli.methods.explain_all` with the
methods run one by one::

    with count_passes() as passes:
        explain_all(model, x, "predicted", {"gradient": {}, "gradcam": {}})
    passes.forward_calls, passes.backward_calls   # 1, 1

Passes are counted twice over: in batched calls (one ``model(inputs)`` is one
forward call, one ``autograd.grad`` is one backward call) and in samples (the batch
size of that call), because a noisy or interpolated batch chunked by ``max_batch``
makes several calls for the same number of samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Counters of the ``count_passes`` blocks now open (nested blocks all count).
_ACTIVE: list[PassCount] = []


@dataclass
class PassCount:
    """Passes made inside one ``count_passes()`` block."""

    forward_calls: int = 0
    forward_samples: int = 0
    backward_calls: int = 0
    backward_samples: int = 0

    def __add__(self, other: PassCount) -> PassCount:
        return PassCount(
            self.forward_calls + other.forward_calls,
            self.forward_samples + other.forward_samples,
            self.backward_calls + other.backward_calls,
            self.backward_samples + other.backward_samples,
        )


@contextmanager
def count_passes() -> Iterator[PassCount]:
    """Count the forward and backward passes made while the block runs."""
    count = PassCount()
    _ACTIVE.append(count)
    try:
        yield count
    finally:
        _ACTIVE.remove(count)


def record_forward(samples: int) -> None:
    """Note one batched forward call over ``samples`` inputs."""
    for count in _ACTIVE:
        count.forward_calls += 1
        count.forward_samples += samples


def record_backward(samples: int) -> None:
    """Note one batched backward call (one ``autograd.grad``) over ``samples`` inputs."""
    for count in _ACTIVE:
        count.backward_calls += 1
        count.backward_samples += samples
