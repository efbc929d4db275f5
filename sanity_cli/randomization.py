"""Model parameter randomization: blocks in forward order, re-initialization, and the
model states of the cascading and independent tests.

Blocks (granularity "block") follow the architecture. A module is split into its
children that hold parameters when it is the model itself, a container of repeated
blocks (an nn.Sequential or nn.ModuleList whose children all have one type), or a
stage (a module with such a container of composite modules among its children);
every other module that holds parameters is one block. So timm's ViT and DeiT give
patch_embed, blocks.0 .. blocks.11, norm, head; ConvNeXt stem, stages.N.downsample,
stages.N.blocks.M, head; Swin patch_embed, layers.N.downsample, layers.N.blocks.M,
norm, head; ResNet (timm or torchvision) conv1, bn1, layer1.0 .. layer4.1, fc;
EfficientNet conv_stem, bn1, blocks.N.M, conv_head, bn2, classifier; and Inception v3
keeps the paper's 17 blocks (Conv2d_1a_3x3 .. Mixed_7c, fc), as do the paper's CNN
(conv1, conv2, fc1, fc2) and MLP (fc1 .. fc4). Modules that the forward pass never
calls in eval mode (an auxiliary head) are no block.

Every parameter belongs to one block: to the innermost block that holds its module.
A parameter held by a module outside every block (a ViT's pos_embed and cls_token,
held by the model itself) goes with the first block, in forward order, inside that
module: for a ViT, the patch embedding at the bottom. Parameters of modules that the
forward never calls and no block holds are not counted (they cannot change a map).

The trained weights are kept once (`TrainedWeights`); every state is derived from
them by re-initializing blocks of the working model in place, and the working model
is restored to the trained weights when the iteration ends, also on error. Each
state carries a receipt: the fraction of the counted parameters (by element count)
that are re-initialized in it, and how many parameter tensors still hold trained
values.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sanity_cli.errors import SanityError
from sanity_cli.hooks import forward_census

log = logging.getLogger(__name__)

ORIGINAL = "original"  # the block label of step 0: the trained model compared with itself
INIT_POLICIES = ("paper", "default")
ORDERS = ("top_down", "bottom_up")
TABLE_STD = 0.02  # position embeddings, tokens, embedding tables: timm's normal std
# A layer-scale gamma whose module does not record its init value (timm's ConvNeXt
# block holds `gamma` itself) gets 1.0: the random branch at full strength, as in a
# block without layer scale. Its init value (1e-6 for ConvNeXt) would turn the
# randomized block into an identity and hide that it was randomized.
LAYER_SCALE_FALLBACK = 1.0
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
_NORM_NAME = re.compile(r"Norm(Act)?\d*d?$")


@dataclass(frozen=True)
class State:
    """One model state of a randomization test.

    step: 0 for the trained model, k for the k-th block in the test's order.
    block: the block re-initialized at this step (ORIGINAL at step 0).
    randomized: every block that is random in this state.
    params_randomized: the fraction of the model's counted parameters, by element
        count, re-initialized in this state (None where no randomization applies).
    tensors_left_trained: the number of counted parameter tensors that still hold
        trained values in this state (None where no randomization applies).
    """

    step: int
    block: str
    randomized: tuple[str, ...]
    params_randomized: float | None = None
    tensors_left_trained: int | None = None


@dataclass(frozen=True)
class Blocks(Sequence[str]):
    """The model's blocks in forward order, and the parameters each re-initializes.

    A sequence of block names, so it goes wherever a list of names goes.
    parameters: block -> names of the parameters it re-initializes (from
        model.named_parameters()), its own first, then those attached from above.
    modules: block -> names of the modules it holds (for batch-norm statistics).
    counted: parameter name -> element count, for every parameter the receipt counts.
    """

    names: tuple[str, ...]
    parameters: Mapping[str, tuple[str, ...]]
    modules: Mapping[str, tuple[str, ...]]
    counted: Mapping[str, int]

    def __getitem__(self, index):  # type: ignore[override]
        return self.names[index]

    def __len__(self) -> int:
        return len(self.names)

    def left_trained(self, randomized: Iterable[str]) -> list[str]:
        """Counted parameters that no block of `randomized` re-initializes."""
        done = {name for block in randomized for name in self.parameters[block]}
        return [name for name in self.counted if name not in done]

    def state(self, step: int, block: str, randomized: tuple[str, ...]) -> State:
        """A State with its receipt (params_randomized, tensors_left_trained)."""
        left = self.left_trained(randomized)
        total = sum(self.counted.values())
        done = total - sum(self.counted[name] for name in left)
        return State(step, block, randomized, done / total if total else 1.0, len(left))


def _within(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(f"{ancestor}.")


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_repeated(module: nn.Module) -> bool:
    """An nn.Sequential or nn.ModuleList whose children all have one type."""
    children = list(module.children())
    return isinstance(module, nn.Sequential | nn.ModuleList) and len({type(c) for c in children}) == 1


def _is_stage(module: nn.Module) -> bool:
    """A module holding a container of repeated composite modules (timm's stages)."""
    return any(_is_repeated(child) and any(True for _ in next(child.children()).children())
               for child in module.children())


def _architecture_blocks(model: nn.Module) -> list[str]:
    """Candidate block names by the architecture rule (module docstring), in
    registration order; forward order and unused modules are settled by a forward."""

    def split(module: nn.Module, prefix: str) -> list[str]:
        names: list[str] = []
        for name, child in module.named_children():
            if not _has_parameters(child):
                continue
            if _is_repeated(child) or _is_stage(child):
                names += split(child, f"{prefix}{name}.")
            else:
                names.append(f"{prefix}{name}")
        return names

    return split(model, "")


def _candidates(model: nn.Module, granularity: str | Sequence[str]) -> tuple[list[str], bool]:
    """(candidate block names, whether they are the user's own list)."""
    modules = dict(model.named_modules())
    if isinstance(granularity, str) and granularity == "block":
        return _architecture_blocks(model), False
    if isinstance(granularity, str) and granularity == "layer":
        return [name for name, m in modules.items() if name and any(True for _ in m.parameters(recurse=False))], False
    if isinstance(granularity, str):
        raise SanityError(f"unknown granularity '{granularity}'; choose block, layer, or a list of module names")
    names = list(granularity)
    unknown = [name for name in names if name not in modules or not name]
    if unknown:
        raise SanityError(f"no module named {', '.join(map(repr, unknown))} in the model; "
                          "list names from model.named_modules()")
    empty = [name for name in names if not _has_parameters(modules[name])]
    if empty:
        raise SanityError(f"module {', '.join(map(repr, empty))} holds no parameters, so randomizing it would "
                          "change nothing; list modules that hold weights")
    return names, True


def _call_order(model: nn.Module, example: Tensor) -> dict[str, int]:
    """Module name -> position of its first call in one eval-mode forward of `example`."""
    return forward_census(model, example, eval_mode=True).order


@torch.no_grad()
def plan_blocks(model: nn.Module, example: Tensor, granularity: str | Sequence[str] = "block") -> Blocks:
    """The model's blocks in forward order, each with the parameters it re-initializes.

    granularity: "block" (the architecture rule of the module docstring), "layer"
    (every module that holds parameters of its own), or an explicit list of module
    names. With "block" and "layer", parameters held outside every block are attached
    to a block (module docstring); an explicit list re-initializes what it names and
    nothing else, and refuses a name that holds no parameters or that the forward
    never calls. `example` is one input batch (1, C, H, W) on the model's device.
    """
    candidates, explicit = _candidates(model, granularity)
    calls = _call_order(model, example)
    if explicit:
        idle = [name for name in candidates if name not in calls]
        if idle:
            raise SanityError(f"module {', '.join(map(repr, idle))} is never called by the forward pass in eval "
                              "mode, so randomizing it would change nothing; list modules that the model uses")
    names = sorted(dict.fromkeys(name for name in candidates if name in calls), key=calls.__getitem__)
    if not names:
        raise SanityError("the model has no blocks with parameters to randomize")
    return _assign(model, names, attach=not explicit, called=set(calls))


def find_blocks(model: nn.Module, example: Tensor, granularity: str | Sequence[str] = "block") -> list[str]:
    """Names of the model's blocks in forward order (see :func:`plan_blocks`)."""
    return list(plan_blocks(model, example, granularity).names)


def _assign(model: nn.Module, names: Sequence[str], attach: bool = True, called: set[str] | None = None) -> Blocks:
    """The Blocks of `names` (in forward order): each parameter and module goes to the
    innermost block holding it; with `attach`, a parameter outside every block goes
    with the first block inside the module that holds it. `called`: the modules a
    forward calls, when known; parameters of other modules that no block holds are
    not counted."""
    modules = [name for name, _ in model.named_modules()]
    innermost = {name: max((b for b in names if _within(name, b)), key=len, default=None) for name in modules}
    parameters: dict[str, list[str]] = {block: [] for block in names}
    counted: dict[str, int] = {}
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        block = innermost[owner]
        if block is None and attach:
            block = next((b for b in names if _within(b, owner)), None)
        if block is not None:
            parameters[block].append(name)
        if block is not None or called is None or owner in called:
            counted[name] = param.numel()
    held = {block: tuple(m for m in modules if innermost[m] == block) for block in names}
    # A block's own parameters first, in registration order; attached ones after.
    ordered = {block: tuple(sorted(ps, key=lambda p, b=block: innermost[p.rpartition(".")[0]] != b))
               for block, ps in parameters.items()}
    return Blocks(tuple(names), ordered, held, counted)


def block_seed(run_seed: int, block: str) -> int:
    """A seed derived from the run seed and the block's name, so a block gets the same
    random weights in every test (cascading, independent) of a run with that seed."""
    digest = hashlib.sha256(f"{run_seed}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise SanityError(f"unknown {what} '{value}'; choose one of: {', '.join(valid)}")


@torch.no_grad()
def reinitialize(module: nn.Module, seed: int, init: str = "paper", reset_bn_stats: bool = False) -> None:
    """Re-initialize every parameter inside `module`, in place, reproducibly from `seed`.

    init="paper" re-initializes by kind of parameter (:func:`parameter_kind`): He-normal
    (std sqrt(2 / fan_in)) conv and linear weights and fused attention in-projections,
    zero biases, normalization scale 1 and shift 0, layer-scale gammas back to the
    value their module records (else LAYER_SCALE_FALLBACK), and a normal of std 0.02
    for embeddings, position tables, tokens and any other parameter.
    init="default": each module's own reset_parameters(), for modules whose children
    hold no parameters; the paper rule for other parameters.
    Batch-norm running statistics are kept unless `reset_bn_stats` (what Quantus does).
    Random numbers are drawn on the CPU so the weights do not depend on the device.
    """
    _check_choice("init", init, INIT_POLICIES)
    names = [name for name, _ in module.named_parameters()]
    _reinitialize(module, names, [name for name, _ in module.named_modules()], seed, init, reset_bn_stats)


@torch.no_grad()
def _reinitialize(root: nn.Module, parameters: Sequence[str], modules: Sequence[str], seed: int, init: str,
                  reset_bn_stats: bool) -> None:
    """Re-initialize `parameters` (names under `root`); batch-norm statistics of `modules`."""
    generator = torch.Generator().manual_seed(seed)
    by_owner: dict[str, list[str]] = defaultdict(list)
    for name in parameters:
        owner, _, local = name.rpartition(".")
        by_owner[owner].append(local)
    stats = {name: _running_stats(root.get_submodule(name)) for name in modules}
    for owner_name, local_names in by_owner.items():
        owner = root.get_submodule(owner_name)
        if init == "default" and _resets_itself(owner, local_names):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                owner.reset_parameters()
            continue
        for local in local_names:
            param = getattr(owner, local)
            param.copy_(_initial_value(owner, local, param, generator).to(param.dtype))
    for name, kept in stats.items():
        if kept is None:
            continue
        module = root.get_submodule(name)
        if reset_bn_stats:
            module.reset_running_stats()
        else:  # reset_parameters() of batch norm also resets the statistics: put them back
            for stat, value in kept.items():
                getattr(module, stat).copy_(value)


def _resets_itself(module: nn.Module, local_names: list[str]) -> bool:
    """Whether reset_parameters() re-initializes exactly these parameters of `module`."""
    own = [name for name, _ in module.named_parameters(recurse=False)]
    return (hasattr(module, "reset_parameters") and sorted(own) == sorted(local_names)
            and not any(_has_parameters(child) for child in module.children()))


def _running_stats(module: nn.Module) -> dict[str, Tensor] | None:
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        return {"running_mean": module.running_mean.clone(), "running_var": module.running_var.clone()}
    return None


def _is_norm(module: nn.Module) -> bool:
    # timm's own norms (LayerNorm2d, BatchNormAct2d...) mostly subclass torch's; the
    # class name catches the rest (RmsNorm, FrozenBatchNorm2d, LayerNormAct2d).
    return isinstance(module, _NORMS) or _NORM_NAME.search(type(module).__name__) is not None


def parameter_kind(module: nn.Module, name: str, param: Tensor) -> str:
    """How the paper policy re-initializes parameter `name` of `module`: "weight"
    (He-normal), "bias" (0), "norm_scale" (1), "norm_shift" (0), "layer_scale"
    (recorded init value) or "table" (normal, std 0.02)."""
    if _is_norm(module) and name in ("weight", "bias"):
        return "norm_scale" if name == "weight" else "norm_shift"
    if name == "bias" or name.endswith("_bias"):
        return "bias"
    if param.dim() >= 2 and ((name == "weight" and isinstance(module, _WEIGHTED)) or name.endswith("proj_weight")):
        return "weight"  # proj_weight: nn.MultiheadAttention's fused in_proj_weight and q/k/v_proj_weight
    if name.startswith("gamma") and param.dim() == 1:
        return "layer_scale"
    return "table"


def _initial_value(module: nn.Module, name: str, param: Tensor, generator: torch.Generator) -> Tensor:
    """A fresh value for parameter `name` of `module`, by :func:`parameter_kind`, on the CPU."""
    kind = parameter_kind(module, name, param)
    if kind == "weight":
        return torch.randn(param.shape, generator=generator) * math.sqrt(2.0 / param[0].numel())
    if kind in ("bias", "norm_shift"):
        return torch.zeros(param.shape)
    if kind == "norm_scale":
        return torch.ones(param.shape)
    if kind == "layer_scale":
        recorded = getattr(module, "init_values", None)  # timm's LayerScale records it
        value = recorded if isinstance(recorded, int | float) else LAYER_SCALE_FALLBACK
        return torch.full(param.shape, float(value))
    return torch.randn(param.shape, generator=generator) * TABLE_STD


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
            # the array's own buffer: the same bytes as tobytes(), without a copy
            digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    @torch.no_grad()
    def restore(self, model: nn.Module, names: Sequence[str] | None = None) -> None:
        """Copy the trained values back into `model`; when `names` are given, only into
        those modules (with everything inside them) and parameters."""
        for key, value in model.state_dict(keep_vars=True).items():
            if names is None or any(_within(key, name) for name in names):
                value.data.copy_(self.state[key])

    def check(self, model: nn.Module) -> None:
        """Raise if the kept weights changed, or if `model` does not hold them."""
        if self.fingerprint(self.state) != self._fingerprint:
            raise RuntimeError("the kept trained weights changed during the run")
        if self.fingerprint(model.state_dict()) != self._fingerprint:
            raise RuntimeError("the model was not restored to its trained weights")


def _plan(model: nn.Module, blocks: Sequence[str]) -> Blocks:
    # A plain list of names (from find_blocks) attaches outside parameters as
    # granularity=block does; plan_blocks() also knows the explicit lists and unused modules.
    return blocks if isinstance(blocks, Blocks) else _assign(model, list(blocks))


def _in_order(blocks: Sequence[str], order: str) -> list[str]:
    """Blocks in the order they are randomized: from the logits down, or from the input up."""
    _check_choice("order", order, ORDERS)
    return list(reversed(blocks)) if order == "top_down" else list(blocks)


def _randomize(model: nn.Module, plan: Blocks, block: str, seed: int, init: str, reset_bn_stats: bool) -> None:
    _reinitialize(model, plan.parameters[block], plan.modules[block], block_seed(seed, block), init,
                  reset_bn_stats)


def cascading_states(model: nn.Module, blocks: Sequence[str], trained: TrainedWeights, seed: int,
                     init: str = "paper", reset_bn_stats: bool = False, order: str = "top_down") -> Iterator[State]:
    """Step 0 is the trained model; step k has the first k blocks of `order` random (cumulative).

    `blocks` are in forward order (a Blocks from plan_blocks, or names); order
    "top_down" randomizes from the last (logits) down, "bottom_up" from the input up
    (Binder et al. 2023). The last state warns, naming them, if parameters are left
    trained. The model is restored to its trained weights when the iteration ends or fails.
    """
    _check_choice("init", init, INIT_POLICIES)
    plan, sequence = _plan(model, blocks), _in_order(blocks, order)
    try:
        yield plan.state(0, ORIGINAL, ())
        for k, name in enumerate(sequence, start=1):
            _randomize(model, plan, name, seed, init, reset_bn_stats)
            state = plan.state(k, name, tuple(sequence[:k]))
            if k == len(sequence) and state.tensors_left_trained:
                _warn_left_trained(plan.left_trained(sequence))
            yield state
    finally:
        trained.restore(model)


def _warn_left_trained(names: list[str]) -> None:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    log.warning("the fully randomized model still holds %d trained parameter tensor(s): %s; they are in no block "
                "(use test.granularity=block or list their modules)", len(names), shown)


def independent_states(model: nn.Module, blocks: Sequence[str], trained: TrainedWeights, seed: int,
                       init: str = "paper", reset_bn_stats: bool = False, order: str = "top_down") -> Iterator[State]:
    """Step 0 is the trained model; step k has only the k-th block of `order` random."""
    _check_choice("init", init, INIT_POLICIES)
    plan, sequence = _plan(model, blocks), _in_order(blocks, order)
    try:
        yield plan.state(0, ORIGINAL, ())
        for k, name in enumerate(sequence, start=1):
            _randomize(model, plan, name, seed, init, reset_bn_stats)
            yield plan.state(k, name, (name,))
            trained.restore(model, [*plan.modules[name], *plan.parameters[name]])
    finally:
        trained.restore(model)
