"""sMPRT's memory does not grow with its number of noisy samples: the copies are drawn,
explained and summed one at a time. Measured as the growth of the peak resident memory of
a fresh process for a few samples and for many. glibc's malloc is told to map every block
over 128 KiB on its own (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the resident
memory at once and the peak counts exactly the tensors alive together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES, SIZE = 32, 128
COPY_MB = IMAGES * 3 * SIZE * SIZE * 4 / 2**20  # one float32 noisy copy of the images: 6 MiB

PROBE = r"""
import json, resource, sys
import torch
from torch import nn
from sanity_cli.checks.smooth_cascade import CHECK
from sanity_cli.methods import explain_all

torch.manual_seed(0)
images, size, samples = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(2, 3)).eval()
x = torch.rand(images, 3, size, size)
targets = torch.zeros(images, dtype=torch.long)
explain = lambda model, inputs, targets: explain_all(model, inputs, targets, {"gradient": {}}, max_batch=images)
ids = torch.arange(images)
run = lambda n: CHECK.maps(explain, model, x, targets, 0, {"samples": n, "noise": 0.1}, ids)
run(2)  # the working set of one sample, allocator pools included
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
maps = run(samples)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024, "mean": float(maps["gradient"].abs().mean())}))
"""


def peak_growth_mb(samples: int) -> float:
    """Growth of the peak resident memory (MiB) of sMPRT with `samples` noisy copies,
    after a run with 2 has set up the working set; in a fresh single-threaded process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(IMAGES), str(SIZE), str(samples)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["growth_mb"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_smooth_cascade_peak_memory_does_not_grow_with_the_samples():
    few, many = peak_growth_mb(3), peak_growth_mb(24)
    # Holding the 24 copies (or their 24 maps) at once would add about 24 x 6 MiB (145 MiB
    # measured); one at a time adds nothing once the first run has set up the working set.
    bound = COPY_MB
    assert few < bound, (few, bound)
    assert many < bound, (many, bound)
