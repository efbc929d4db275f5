"""sanity_cli.hooks: hooks removed whatever happens, and the one forward census,
checked on a model whose calls are known by construction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sanity_cli.hooks import Hooks, forward_census


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Known(nn.Module):
    """stem (conv, 8x8 out), body called twice, F.relu in the model's forward, pool to
    1x1, head; records the mode each forward ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.body = nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2, 3)
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append(self.training)
        x = self.act(self.stem(x))
        x = F.relu(self.body(self.body(x)))
        return self.head(self.pool(x).flatten(1))


def test_the_census_counts_orders_and_finds_spatial_outputs() -> None:
    model = Known().eval()
    census = forward_census(model, torch.randn(1, 1, 8, 8))
    assert census.calls == {"": 1, "stem": 1, "act": 1, "body": 2, "pool": 1, "head": 1}
    assert list(census.order) == ["", "stem", "act", "body", "pool", "head"]
    assert census.order == {"": 0, "stem": 1, "act": 2, "body": 3, "pool": 4, "head": 5}
    # in the order calls finish; pool's 1x1 and head's (1, 3) are not spatial
    assert census.spatial == ["stem", "act", "body", "body"]
    assert census.last_spatial_once() == "act"  # body runs twice
    assert census.functional_relus == []  # only noted when asked
    assert hook_count(model) == 0


def test_the_census_notes_relu_called_as_a_function_and_where() -> None:
    model = Known().eval()
    census = forward_census(model, torch.randn(1, 1, 8, 8), relu_functions=True)
    assert census.functional_relus == ["the model's forward"]  # act is an nn.ReLU: not noted

    class Inner(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(x)

    wrapped = nn.Sequential(nn.Linear(2, 2), Inner(), nn.ReLU()).eval()
    census = forward_census(wrapped, torch.randn(1, 2), relu_functions=True)
    assert census.functional_relus == ["module '1' (Inner)"]


def test_the_census_runs_in_eval_mode_when_asked_and_restores_the_mode() -> None:
    model = Known().train()
    forward_census(model, torch.randn(1, 1, 8, 8), eval_mode=True)
    forward_census(model, torch.randn(1, 1, 8, 8))
    assert model.modes == [False, True] and model.training
    assert all(m.training for m in model.modules())


def test_the_census_takes_the_callers_forward() -> None:
    seen = []
    census = forward_census(Known().eval(), torch.randn(1, 1, 8, 8),
                            forward=lambda model, x: seen.append(model(x).shape))
    assert seen == [(1, 3)] and census.calls["body"] == 2


def test_hooks_are_removed_after_an_error_in_the_forward() -> None:
    model = Known().eval()

    def fail(*_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), Hooks() as hooks:
        hooks.add(model.head.register_forward_hook(fail))
        hooks.add(model.register_forward_pre_hook(lambda *_: None))
        model(torch.randn(1, 1, 8, 8))
    assert hook_count(model) == 0
    model.head.register_forward_pre_hook(fail)  # a hook of the caller's ...
    with pytest.raises(RuntimeError, match="boom"):
        forward_census(model, torch.randn(1, 1, 8, 8), eval_mode=True)
    assert hook_count(model) == 1  # ... stays, the census's are gone


def test_hooks_can_be_removed_early_and_again() -> None:
    model = Known().eval()
    with Hooks() as hooks:
        hooks.add(model.stem.register_forward_hook(lambda *_: None))
        hooks.remove()
        assert hook_count(model) == 0
        hooks.add(model.stem.register_forward_hook(lambda *_: None))
    assert hook_count(model) == 0
