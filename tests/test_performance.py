"""Changes made for speed and memory leave every map and score as it was."""

from __future__ import annotations

import torch

from sanity_cli.methods import explain_all
from sanity_cli.methods.noise import _Moments
from sanity_cli.metrics import rankdata
from sanity_cli.models import PaperCNN


def test_smoothgrad_keeps_no_sum_of_squares_and_its_mean_is_unchanged():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 1, 5, 5, generator=generator)
    image, sample = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    lean, full = _Moments(3, 2, second=False), _Moments(3, 2, second=True)
    for moments in (lean, full):
        moments.add(maps, image, sample)
    assert lean.sum_squares is None and full.sum_squares is not None
    assert torch.equal(lean.mean(), full.mean())
    assert torch.allclose(full.mean(), (maps[:3] + maps[3:]) / 2, atol=1e-6)


def test_smoothgrad_alone_equals_smoothgrad_beside_vargrad():
    torch.manual_seed(0)
    model = PaperCNN().eval()
    x = torch.rand(3, 1, 28, 28)
    alone = explain_all(model, x, "predicted", {"smoothgrad": {"samples": 4}})["smoothgrad"]
    both = explain_all(model, x, "predicted", {"smoothgrad": {"samples": 4}, "vargrad": {"samples": 4}})
    assert torch.equal(alone, both["smoothgrad"])
    assert both["vargrad"].abs().sum() > 0  # the shared moments did keep the second moment


def test_rankdata_of_many_ties_is_the_mean_position_of_each_group():
    values = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[5.0, 1.5, 5.0, 3.0, 1.5, 5.0], [3.5, 3.5, 3.5, 3.5, 3.5, 3.5]], dtype=torch.float64)
    assert torch.equal(rankdata(values), expected)
