"""The planner: computes several methods on one batch, sharing passes.

Plan of :func:`explain_all` on a batch x (B, C, H, W):

1. The one-pass methods (gradient, input_x_gradient, gradcam, guided_backprop,
   guided_gradcam, any layers) share one forward per chunk of ``max_batch`` images,
   one ordinary backward and, for the guided ones, one guided backward (see
   :mod:`sanity_cli.methods.gradients`). target="predicted" is read off this
   forward's logits.
2. If target="predicted" and no one-pass method ran, one gradient-free forward finds
   the predicted classes (counted as a forward) for the methods that need a class.
3. Each distinct integrated_gradients setting: B * steps interpolated inputs,
   ``max_batch`` per forward/backward.
4. smoothgrad / vargrad with the same noise and seed share their noisy inputs; each
   noisy chunk goes through step 1 (and 3) for the base methods, so bases share
   passes there too (see :mod:`sanity_cli.methods.noise`).
5. attention_rollout: one gradient-free forward per ``max_batch`` images; chefer: one
   forward and one backward per ``max_batch`` images (see
   :mod:`sanity_cli.methods.transformers`).
6. Controls (edge, random): no pass.
7. Plugged methods (captum, lrp, callable): each on its own, by its adapter (see
   :mod:`sanity_cli.methods.external`), on the classes of the steps above (or of one
   gradient-free forward if none needed them).

Identical requests under different keys are computed once. The caller must put the
model in ``eval()`` mode (see :mod:`sanity_cli.methods.gradients`); hooks, ReLU mode and
gradients are undone or confined to each call, also on error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from sanity_cli.methods.controls import edge_map, random_map
from sanity_cli.methods.gradients import PREDICTED, Target, predict, shared_pass
from sanity_cli.methods.integrated import integrated_gradients
from sanity_cli.methods.noise import noise_maps
from sanity_cli.methods.registry import MethodCall, MethodError, is_plugged, kind_of, resolve_call
from sanity_cli.methods.transformers import attention_rollout, chefer


def explain(
    model: nn.Module,
    x: Tensor,
    target: Target,
    method: str,
    *,
    max_batch: int = 64,
    ids: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """The maps of one ``method`` (with ``options``) for x (B, C, H, W).

    ``target`` is a (B,) LongTensor of classes or "predicted" (the model's argmax on
    x, from the same forward). ``ids`` (B,) name the images for methods that draw
    noise (see :func:`explain_all`). Returns (B, C, H, W); gradcam and the attention
    methods return (B, 1, H, W).
    Raises ``ValueError`` (:class:`MethodError`) on an unknown method or option.
    """
    return explain_all(model, x, target, {method: options}, max_batch=max_batch, ids=ids)[method]


def explain_all(
    model: nn.Module,
    x: Tensor,
    target: Target,
    methods: Mapping[str, Mapping[str, Any] | None],
    *,
    max_batch: int = 64,
    ids: Tensor | None = None,
    apart: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, Tensor]:
    """Several methods on the same batch x (B, C, H, W), sharing passes.

    ``ids`` (B,) name the images for the methods that draw noise (smoothgrad,
    vargrad, the random control): each image's noise follows its id, not its place
    in the batch; None: the positions 0..B-1.

    ``methods`` maps a key to that method's options (a dict or a Hydra
    ``DictConfig``; None means defaults). The key is the method's name unless the
    options name one with ``method:``, e.g. ``{"smoothgrad_gbp": {"method":
    "smoothgrad", "base": "guided_backprop"}}``. No forward sees more than
    ``max_batch`` inputs. Returns {key: maps} in the order of ``methods``, each
    (B, C, H, W) or (B, 1, H, W) for gradcam and the attention methods (and for
    noise methods over them, and plugged methods that return one channel).

    Plugged methods (captum, lrp, callable) share no pass: each runs on its own,
    after the others, inside ``apart()`` (a run pauses its activation reuse there).
    """
    target = _checked(x, target, max_batch)
    x = x.detach()  # maps never carry a graph back to the caller's x
    plugged = {key: options or {} for key, options in methods.items() if is_plugged(key, options)}
    requests = {
        key: _request(key, options) for key, options in methods.items() if key not in plugged
    }
    distinct = list(dict.fromkeys(requests.values()))
    maps, target = compute_calls(model, x, target, distinct, max_batch, ids)
    results: dict[str, Tensor] = {}
    handed_out: set[MethodCall] = set()
    for key, call in requests.items():
        # A call asked for under two keys is computed once; each key gets its own
        # tensor so that editing one result in place cannot change another.
        results[key] = maps[call].clone() if call in handed_out else maps[call]
        handed_out.add(call)
    if plugged:
        from sanity_cli.methods.external import explain_external  # loads Hydra's plug-in machinery

        classes = predict(model, x, max_batch) if isinstance(target, str) else target
        for key, options in plugged.items():
            with apart():
                results[key] = explain_external(
                    model, x, classes, options, max_batch=max_batch, name=key
                )
    return {key: results[key] for key in methods}


def _request(key: str, options: Mapping[str, Any] | None) -> MethodCall:
    options = dict(options or {})
    kind = kind_of(key, options)
    options.pop("method", None)
    return resolve_call(kind, options)


def _checked(x: Tensor, target: Target, max_batch: int) -> Target:
    """Validated target, a (B,) long tensor on x's device, or "predicted"."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise MethodError(
            f"x must be a floating (B, C, H, W) tensor, got {getattr(x, 'shape', x)!r}"
        )
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise MethodError(f"max_batch={max_batch!r} must be a positive integer")
    if isinstance(target, str):
        if target != PREDICTED:
            raise MethodError(
                f"target must be a (B,) class tensor or {PREDICTED!r}, got {target!r}"
            )
        return target
    if not isinstance(target, Tensor) or target.shape != (len(x),) or target.is_floating_point():
        raise MethodError(
            f"target must be a (B,) = ({len(x)},) integer tensor or {PREDICTED!r}, "
            f"got {getattr(target, 'shape', target)!r}"
        )
    return target.to(device=x.device, dtype=torch.long)


def compute_calls(
    model: nn.Module,
    x: Tensor,
    target: Target,
    calls: Sequence[MethodCall],
    max_batch: int,
    ids: Tensor | None = None,
) -> tuple[dict[MethodCall, Tensor], Target]:
    """The maps of distinct ``calls`` on x (B, C, H, W), and the target used (the
    (B,) predicted classes if it was resolved, else ``target`` as given)."""
    by_family: dict[str, list[MethodCall]] = defaultdict(list)
    for call in calls:
        by_family[call.family].append(call)
    maps: dict[MethodCall, Tensor] = {}
    if by_family["pass"]:
        pass_maps, target = _chunked_shared_pass(model, x, target, by_family["pass"], max_batch)
        maps.update(pass_maps)
    needs_class = by_family["integrated"] or by_family["noise"] or any(
        call.method == "chefer" for call in by_family["attention"]
    )
    if needs_class and isinstance(target, str):
        target = predict(model, x, max_batch)
    for call in by_family["integrated"]:
        maps[call] = integrated_gradients(
            model, x, target, max_batch=max_batch, **dict(call.options)
        )
    if by_family["noise"]:

        def base_maps(inputs: Tensor, targets: Tensor, bases: Sequence[MethodCall]) -> dict:
            return compute_calls(model, inputs, targets, bases, max_batch)[0]

        maps.update(noise_maps(x, target, by_family["noise"], base_maps, max_batch, ids))
    for call in by_family["attention"]:
        maps[call] = _attention_map(model, x, target, call, max_batch)
    for call in by_family["control"]:
        maps[call] = _control_map(call, x, ids)
    return maps, target


def _chunked_shared_pass(
    model: nn.Module, x: Tensor, target: Target, calls: list[MethodCall], max_batch: int
) -> tuple[dict[MethodCall, Tensor], Tensor]:
    """:func:`shared_pass` on ``max_batch`` images at a time, results concatenated."""
    chunk_maps: dict[MethodCall, list[Tensor]] = defaultdict(list)
    chunk_targets: list[Tensor] = []
    for start in range(0, len(x), max_batch):
        rows = slice(start, start + max_batch)
        chunk_target = target if isinstance(target, str) else target[rows]
        maps, used_target = shared_pass(model, x[rows], chunk_target, calls)
        for call, chunk in maps.items():
            chunk_maps[call].append(chunk)
        chunk_targets.append(used_target)
    return {call: torch.cat(chunks) for call, chunks in chunk_maps.items()}, torch.cat(
        chunk_targets
    )


def _attention_map(
    model: nn.Module, x: Tensor, target: Target, call: MethodCall, max_batch: int
) -> Tensor:
    if call.method == "chefer":
        return chefer(model, x, target, max_batch=max_batch, **dict(call.options))
    return attention_rollout(model, x, max_batch=max_batch, **dict(call.options))


def _control_map(call: MethodCall, x: Tensor, ids: Tensor | None) -> Tensor:
    if call.method == "edge":
        return edge_map(x, call.option("detector"), call.option("sigma"))
    return random_map(x, call.option("seed"), ids)
