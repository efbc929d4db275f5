"""Model parameter randomization: blocks in forward order, re-initialization, and the
model states of the cascading and independent tests.

The trained weights are kept once (`TrainedWeights`); every state is derived from
them by re-initializing blocks of the working model in place, and the working model
is restored to the trained weights when the iteration ends, also on error.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sanity_cli.errors import SanityError

ORIGINAL = "original"  # the block label of step 0: the trained model compared with itself
INIT_POLICIES = ("paper", "default")


@dataclass(frozen=True)
class State:
    """One model state of a randomization test.

    step: 0 for the trained model, k for the k-th block from the top.
    block: the block re-initialized at this step (ORIGINAL at step 0).
    randomized: every block that is random in this state.
    """

    step: int
    block: str
    randomized: tuple[str, ...]


@torch.no_grad()
def find_blocks(model: nn.Module, example: Tensor, granularity: str | Sequence[str] = "block") -> list[str]:
    """Names of the model's blocks in forward (execution) order.

    granularity: "block" for the top-level children that hold parameters, "layer" for
    every module that holds parameters of its own, or an explicit list of module names.
    Modules that the forward pass never calls in eval mode (an auxiliary head) are left out.
    `example` is one input batch (1, C, H, W) on the model's device.
    """
    modules = dict(model.named_modules())
    if isinstance(granularity, str) and granularity == "block":
        candidates = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    elif isinstance(granularity, str) and granularity == "layer":
        candidates = [name for name, m in modules.items() if name and any(True for _ in m.parameters(recurse=False))]
    elif isinstance(granularity, str):
        raise SanityError(f"unknown granularity '{granularity}'; choose block, layer, or a list of module names")
    else:
        candidates = list(granularity)
        unknown = [name for name in candidates if name not in modules or not name]
        if unknown:
            raise SanityError(f"no module named {', '.join(map(repr, unknown))} in the model; "
                              "list names from model.named_modules()")
    order: list[str] = []
    hooks = [modules[name].register_forward_pre_hook(lambda *_, name=name: order.append(name))
             for name in candidates]
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    seen = list(dict.fromkeys(order))  # first call of each module, in order
    if not seen:
        raise SanityError("the model has no blocks with parameters to randomize")
    return seen


def block_seed(run_seed: int, block: str) -> int:
    """A seed derived from the run seed and the block's name, so a block gets the same
    random weights in every test (cascading, independent) of a run with that seed."""
    digest = hashlib.sha256(f"{run_seed}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def reinitialize(module: nn.Module, seed: int, init: str = "paper", reset_bn_stats: bool = False) -> None:
    """Re-initialize every parameter inside `module`, in place, reproducibly from `seed`.

    init="paper": He-normal (std sqrt(2 / fan_in)) conv and linear weights, zero biases,
    normalization layers back to scale 1 and shift 0 (the authors' code). Other
    parameters are redrawn from a normal with their trained standard deviation.
    init="default": each module's own reset_parameters().
    Batch-norm running statistics are kept unless `reset_bn_stats` (what Quantus does).
    Random numbers are drawn on the CPU so the weights do not depend on the device.
    """
    if init not in INIT_POLICIES:
        raise SanityError(f"unknown init '{init}'; choose one of: {', '.join(INIT_POLICIES)}")
    generator = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        own = dict(sub.named_parameters(recurse=False))
        stats = _running_stats(sub)
        if own and init == "default" and hasattr(sub, "reset_parameters"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                sub.reset_parameters()
        elif own:
            _paper_init(sub, own, generator)
        if stats is not None:
            if reset_bn_stats:
                sub.reset_running_stats()
            else:  # reset_parameters() of batch norm also resets the statistics: put them back
                for name, value in stats.items():
                    getattr(sub, name).copy_(value)


def _running_stats(module: nn.Module) -> dict[str, Tensor] | None:
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        return {"running_mean": module.running_mean.clone(), "running_var": module.running_var.clone()}
    return None


def _paper_init(module: nn.Module, params: dict[str, nn.Parameter], generator: torch.Generator) -> None:
    is_weighted = isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
    is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
    for name, param in params.items():
        if is_weighted and name == "weight":
            fan_in = param[0].numel()
            value = torch.randn(param.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif (is_weighted or is_norm) and name == "bias":
            value = torch.zeros(param.shape)
        elif is_norm and name == "weight":
            value = torch.ones(param.shape)
        else:
            scale = param.float().std().item() if param.numel() > 1 else 0.02
            value = torch.randn(param.shape, generator=generator) * (scale if math.isfinite(scale) else 0.02)
        param.copy_(value.to(param.dtype))


class TrainedWeights:
    """The trained model's parameters and buffers, kept once for the whole run."""

    def __init__(self, model: nn.Module):
        self.state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        self._fingerprint = self.fingerprint(self.state)

    @staticmethod
    def fingerprint(state: dict[str, Tensor]) -> str:
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def restore(self, model: nn.Module, blocks: Sequence[str] | None = None) -> None:
        """Copy the trained values back into `model`, for `blocks` only when given."""
        prefixes = None if blocks is None else tuple(f"{b}." for b in blocks)
        for name, value in model.state_dict(keep_vars=True).items():
            if prefixes is None or name.startswith(prefixes):
                value.data.copy_(self.state[name])

    def check(self, model: nn.Module) -> None:
        """Raise if the kept weights changed, or if `model` does not hold them."""
        if self.fingerprint(self.state) != self._fingerprint:
            raise RuntimeError("the kept trained weights changed during the run")
        if self.fingerprint(model.state_dict()) != self._fingerprint:
            raise RuntimeError("the model was not restored to its trained weights")


def cascading_states(model: nn.Module, blocks: Sequence[str], trained: TrainedWeights, seed: int,
                     init: str = "paper", reset_bn_stats: bool = False) -> Iterator[State]:
    """Step 0 is the trained model; step k has the top k blocks random (cumulative).

    `blocks` are in forward order; randomization goes from the last (logits) down.
    The model is restored to its trained weights when the iteration ends or fails.
    """
    top_down = list(reversed(blocks))
    try:
        yield State(0, ORIGINAL, ())
        for k, name in enumerate(top_down, start=1):
            reinitialize(model.get_submodule(name), block_seed(seed, name), init, reset_bn_stats)
            yield State(k, name, tuple(top_down[:k]))
    finally:
        trained.restore(model)


def independent_states(model: nn.Module, blocks: Sequence[str], trained: TrainedWeights, seed: int,
                       init: str = "paper", reset_bn_stats: bool = False) -> Iterator[State]:
    """Step 0 is the trained model; step k has only the k-th block from the top random."""
    top_down = list(reversed(blocks))
    try:
        yield State(0, ORIGINAL, ())
        for k, name in enumerate(top_down, start=1):
            reinitialize(model.get_submodule(name), block_seed(seed, name), init, reset_bn_stats)
            yield State(k, name, (name,))
            trained.restore(model, [name])
    finally:
        trained.restore(model)
