"""Reusing the forward activations of the blocks that a state leaves trained.

In a top-down cascade the lower blocks keep their trained weights until late, and the
inputs a method feeds the model (the images, Integrated Gradients' interpolations,
SmoothGrad's noisy copies) do not depend on the state. The output of every block
below the first randomized one is then the same in every state. `ActivationReuse`
keeps, from the trained model's passes, each block's output together with the
autograd graph that produced it; a later state runs only the blocks above, starting
from the kept outputs, and its backward pass continues through the kept graph to the
input. The maps are those of a plain pass: the same operations on the same values
(gradients that reach a tensor by several paths, as in a skip connection, may be summed
in another order: float rounding, about 1e-7 of their size).

What is reused, and when:

* Only plain passes of the project's own methods: the gradient with respect to the
  input of a forward that has no hooks (module or global) and runs under no torch
  function mode. GradCAM's layer hooks and guided backprop's ReLU mode make a pass
  plain, as does a forward without gradients (the predicted classes); methods from
  outside (Captum, zennit, a function of the user's) run inside ``paused()``. A
  second-order gradient through a reused pass raises an error.
* Only blocks that are provably unchanged: a state reuses blocks b_1..b_p (forward
  order) when every parameter and buffer that differs from the trained model lies
  inside a block after b_p, and that block cannot reach b_1..b_p. The first recorded
  pass learns what a block reaches: a part of it called before it (through its call),
  or a parameter of it used directly (through the graph of each kept output). A
  changed tensor outside every block (one attached to a block from its parent) turns
  reuse off for that state. A block that changes its own input in place is never
  answered (the change would be skipped), nor is any block after it.
* Only the same inputs: the k-th eligible forward of an image chunk in a state is
  matched with the k-th of the trained state and reused only if its input is equal.
* Only within a bound: kept graphs are counted by their saved tensors' storage; once
  ``max_bytes`` are held, further passes are not kept (and run plainly in every state).
* The model must call each block once per forward, in the planned order, and each must
  return one tensor; otherwise reuse turns itself off for the run (with a log line).

Not seen, and not supported with reuse: writes through ``.data`` (they bypass the version
counters) and parameter gradients (``.backward()`` leaves ``.grad`` of answered blocks
empty; the methods here take input gradients only).

Block outputs changed in place: the kept value is always the one the block returned.
The recording pass finds, by the tensor's version counter, an output that the model
changes after the block returns it (a ReLU with ``inplace=True`` on it, say); it records
once more, handing the model a copy of that output from then on. In a later state a
kept output is handed out as a view that autograd forbids changing in place; a refused
change makes that output a copy, and the pass runs again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

from sanity_cli.hooks import Hooks

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Ends a recording forward once the last block has run."""


class _Unsupported(Exception):
    """The model does not call its blocks as reuse needs."""


@dataclass
class _Kept:
    """One recorded pass: its input (the leaf of the kept graph) and each block's output."""

    leaf: Tensor
    outputs: list[Tensor]
    nbytes: int
    versions: list[int]  # each output's version when its block returned it


class _FromKept(torch.autograd.Function):
    """A kept block output, attached to the current input: the backward carries the
    incoming gradient through the kept graph to the kept leaf, whose values equal the input."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, value: Tensor, kept: _Kept, index: int, copy: bool) -> Tensor:
        ctx.kept, ctx.index = kept, index
        return value.clone() if copy else value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        if torch.is_grad_enabled():  # create_graph: the gradient would not depend on the input
            raise RuntimeError("a second-order gradient cannot go through reused activations; "
                               "run with reuse_activations=0")
        kept: _Kept = ctx.kept
        output = kept.outputs[ctx.index]
        if not output.requires_grad:  # a block whose output does not depend on the input (a position table)
            return None, None, None, None, None
        (to_leaf,) = torch.autograd.grad(output, kept.leaf, grad, retain_graph=True, allow_unused=True)
        return to_leaf, None, None, None, None


def _pack(saved: list[Tensor], tensor: Tensor) -> Tensor:
    """Notes a tensor the graph saves (to count the kept bytes); a detached alias is kept,
    so that a saved output does not hold its own node."""
    alias = tensor.detach()
    saved.append(alias)
    return alias


def _unpack(tensor: Tensor) -> Tensor:
    return tensor


def _storage_bytes(tensors: Sequence[Tensor], seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _parameters_behind(output: Tensor, owners: Mapping[int, int | None]) -> set[int | None]:
    """The owners (block indices) of the parameters that `output`'s autograd graph reaches."""
    found: set[int | None] = set()
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf, a parameter if it is one
        if variable is not None and id(variable) in owners:
            found.add(owners[id(variable)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _function_mode() -> bool:
    """Whether a torch function mode (guided backprop's ReLUs, for one) is active."""
    return bool(torch.overrides._get_current_function_mode_stack())


def _has_hooks(model: nn.Module) -> bool:
    if (module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
            or module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in model.modules())


class ActivationReuse:
    """Keeps the trained blocks' activations of one model for the states of one run.

    blocks: the model's block names in forward order; trained: the trained values of
    its state_dict (``TrainedWeights.state``); max_bytes: the most kept at once.
    Use ``with reuse.state(model): ... with reuse.chunk(index): explain(...)``."""

    def __init__(self, model: nn.Module, blocks: Sequence[str], trained: Mapping[str, Tensor], max_bytes: int):
        self.model, self.names, self.trained, self.max_bytes = model, list(blocks), trained, max_bytes
        nested = [a for a in self.names for b in self.names if a != b and a.startswith(b + ".")]
        compiled = type(model).__name__ == "OptimizedModule"  # torch.compile: its forward is traced, not called
        self.enabled = bool(self.names) and max_bytes > 0 and not nested and not compiled \
            and not isinstance(model, torch.jit.ScriptModule)
        self.modules = [model.get_submodule(name) for name in self.names] if self.enabled else []
        # Learned from the first recorded pass: influence[m], how many leading blocks the
        # tensors of block m can change (m, unless the forward uses them before block m
        # runs); limit, the first block that changes its own input in place (answering it
        # would skip that change).
        self.influence = list(range(len(self.names)))
        self.limit = len(self.names)
        self._learned = False
        self.kept: dict[tuple[int, int], _Kept] = {}
        self.held = 0
        self.full = False
        self.copies: set[int] = set()  # blocks whose output the model changes in place: handed out as copies
        self._answered = -1
        self.prefix = 0
        self._chunk: int | None = None
        self._paused = False
        self._calls = 0
        self.stats = {"kept": 0, "reused": 0, "plain": 0}

    # -- which blocks a state leaves trained ---------------------------------------

    @torch.no_grad()
    def unchanged_prefix(self) -> int:
        """How many leading blocks (forward order) can be reused in the model's current
        state: those that no tensor differing from the trained model reaches (all of them
        when nothing differs)."""
        changed = [name for name, value in self.model.state_dict().items()
                   if name not in self.trained or not torch.equal(value, self.trained[name])]
        first = len(self.names)
        for name in changed:
            owner = self._owner(name)
            if owner is None:
                return 0  # a changed tensor outside every block: no telling where the forward uses it
            first = min(first, self.influence[owner])
        return first

    def _owner(self, name: str) -> int | None:
        """The index of the block holding the parameter, buffer or module `name`."""
        return next((i for i, block in enumerate(self.names) if name == block or name.startswith(block + ".")),
                    None)

    @contextmanager
    def state(self, model: nn.Module) -> Iterator[None]:
        """Reuse for the passes of `model` in its current state (nothing unless it is this
        run's model and reuse is on)."""
        if not self.enabled or model is not self.model:
            yield
            return
        self.prefix = self.unchanged_prefix()
        try:
            yield
        finally:
            self.prefix = 0

    @contextmanager
    def chunk(self, index: int) -> Iterator[None]:
        """The passes of one image chunk: matched by order with the trained state's."""
        if not self.enabled or (self.prefix < len(self.names) and min(self.prefix, self.limit) == 0):
            yield  # nothing to answer from, and no trained state to record
            return
        self._chunk, self._calls = index, 0
        original = self.model.__dict__.get("forward")
        self.model.forward = partial(self._forward, self.model.forward)  # the instance's own forward, if set
        try:
            yield
        finally:
            if original is None:
                del self.model.forward
            else:
                self.model.forward = original
            self._chunk = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Plain passes only: for methods from outside the project, which may differentiate
        twice or call the model in ways the order of passes cannot follow."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused

    def clear(self) -> None:
        self.kept.clear()
        self.held = 0

    # -- the forward -----------------------------------------------------------------

    def _forward(self, plain, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if (args or kwargs or not self.enabled or self._paused or not isinstance(x, Tensor)
                or not torch.is_grad_enabled() or not x.requires_grad or _function_mode() or _has_hooks(self.model)):
            self.stats["plain"] += 1
            return plain(x, *args, **kwargs)
        self._calls += 1
        key = (self._chunk, self._calls)
        kept = self.kept.get(key)
        if kept is not None and not (kept.leaf.shape == x.shape and kept.leaf.dtype == x.dtype
                                     and torch.equal(kept.leaf.detach(), x.detach())):
            kept = None
        recording = kept is None
        if recording:
            if self.prefix < len(self.names) or self.full:  # nothing kept for it, and none to keep
                self.stats["plain"] += 1
                return plain(x)
            kept = self._record(plain, x)
            if kept is None:
                return plain(x)
        for _ in range(len(self.names) + 1):  # again only after the model changed a kept output in place
            result = self._from_kept(plain, x, kept, min(self.prefix, self.limit))
            if result is not None:
                break
            if not kept.outputs:  # forgotten: changed where autograd did not see it
                if not recording:
                    break
                kept = self._record(plain, x)
                if kept is None:
                    return plain(x)
        if result is None:
            self.stats["plain"] += 1
            return plain(x)
        if not recording:
            self.stats["reused"] += 1
        elif self.held + kept.nbytes > self.max_bytes:
            self.full = True  # this pass used what it recorded; later ones are not kept
        else:
            self.kept[key] = kept
            self.held += kept.nbytes
            self.stats["kept"] += 1
        return result

    def _record(self, plain, x: Tensor) -> _Kept | None:
        """Run the blocks on a copy of x, keeping each block's output and the graph behind it;
        None (and reuse off for the run) when the model does not call its blocks as reuse needs."""
        try:
            for _ in range(len(self.names)):
                kept, changed = self._recorded(plain, x)
                if not changed:
                    return kept
                self.copies.update(changed)  # and again, those outputs handed to the model as copies
            raise _Unsupported("the model changes its blocks' outputs in place, even when given copies")
        except _Unsupported as why:
            log.info("activation reuse is off for this run: %s", why)
            self.enabled = False
            self.clear()
            return None

    def _recorded(self, plain, x: Tensor) -> tuple[_Kept, set[int]]:
        """The kept pass, and the blocks whose output the model changed in place after it was
        returned (their kept values are then not the blocks' outputs)."""
        leaf = x.detach().clone().requires_grad_(True)
        outputs: list[Tensor] = []
        versions: list[int] = []
        saved: list[Tensor] = []
        learning = not self._learned
        running: list[int] = []  # the block whose call is under way
        inputs: dict[int, list[tuple[Tensor, int]]] = {}  # its tensor arguments and their versions

        def enter(index: int, module: nn.Module, args: Any, kwargs: Any) -> None:
            running.append(index)
            inputs[index] = [(t, t._version) for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]

        def visit(owner: int, module: nn.Module, args: Any) -> None:
            if not running or running[-1] != owner:  # a part of block `owner` runs outside its block's call
                self.influence[owner] = min(self.influence[owner], len(outputs))

        def capture(index: int, module: nn.Module, args: Any, output: Any) -> Tensor | None:
            running.pop()
            if any(t._version != version for t, version in inputs.pop(index)):
                self.limit = min(self.limit, index)  # it changes its input in place: never answered
            if not isinstance(output, Tensor):
                raise _Unsupported(f"block {self.names[index]} returns a {type(output).__name__}, not a tensor")
            if index != len(outputs):
                raise _Unsupported(f"block {self.names[index]} is called out of the planned order")
            outputs.append(output)
            versions.append(output._version)
            if index == len(self.names) - 1:
                raise _Stop
            return output.clone() if index in self.copies else None

        with Hooks() as hooks:
            for i, module in enumerate(self.modules):
                hooks.add(module.register_forward_hook(partial(capture, i)))
            for i, module in enumerate(self.modules):
                hooks.add(module.register_forward_pre_hook(partial(enter, i), with_kwargs=True))
            if learning:
                for i, module in enumerate(self.modules):
                    for part in module.modules():
                        if part is not module:
                            hooks.add(part.register_forward_pre_hook(partial(visit, i)))
            try:
                with torch.autograd.graph.saved_tensors_hooks(partial(_pack, saved), _unpack):
                    plain(leaf)
            except _Stop:
                pass
        if len(outputs) < len(self.names):
            raise _Unsupported(f"the forward does not call block {self.names[len(outputs)]}")
        # The model's own parameters and buffers are saved too, but they are not extra memory.
        own = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        nbytes = _storage_bytes([leaf, *outputs, *saved], own)
        changed = {i for i, (output, version) in enumerate(zip(outputs, versions)) if output._version != version}
        if learning:
            self._learn_from_graph(outputs)
        return _Kept(leaf, outputs, nbytes, versions), changed

    def _learn_from_graph(self, outputs: list[Tensor]) -> None:
        """A parameter of block m in the graph of block j's output (j < m), used directly
        rather than through its module: block m's changes reach block j."""
        owners = {id(param): self._owner(name) for name, param in self.model.named_parameters()}
        for j, output in enumerate(outputs):
            for m in _parameters_behind(output, owners):
                if m is not None and m > j:
                    self.influence[m] = min(self.influence[m], j)
        self._learned = True

    def _from_kept(self, plain, x: Tensor, kept: _Kept, prefix: int) -> Any:
        """The forward from block `prefix` up, the blocks below answered from `kept`; None
        when the model changed a kept output in place (reuse then hands out copies)."""
        modules = self.modules[:prefix]
        own = [module.__dict__.get("forward") for module in modules]  # a forward set on the instance, if any
        for index, module in enumerate(modules):
            module.forward = partial(self._answer, x, kept, index)
        self._answered = -1
        try:
            result = plain(x)
        except RuntimeError as error:
            if "modified inplace" not in str(error) or len(self.copies) == len(self.names):
                raise
            result = None
        finally:
            for module, forward in zip(modules, own):
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward
        changed = [o._version for o in kept.outputs] != kept.versions
        if result is None or changed:
            # The model changes a kept output in place, most likely the last one handed out:
            # hand that one out as a copy from now on (every one, if it already was). Autograd
            # refuses the change before it happens; one it did not see (changed) means the
            # kept pass is forgotten. None: the caller runs the pass again.
            if self._answered < 0 or self._answered in self.copies:
                self.copies.update(range(len(self.names)))
            else:
                self.copies.add(self._answered)
            if changed:
                self.kept = {key: value for key, value in self.kept.items() if value is not kept}
                self.held = sum(value.nbytes for value in self.kept.values())
                kept.outputs.clear()
            return None
        return result

    def _answer(self, x: Tensor, kept: _Kept, index: int, *args: Any, **kwargs: Any) -> Tensor:
        self._answered = index
        return _FromKept.apply(x, kept.outputs[index].detach(), kept, index, index in self.copies)
