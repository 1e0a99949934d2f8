"""Shadows meeting modules: writing them into a model, swapping them in for a block, and a
module whose parameters are the shadows.

- :func:`copy_into`: ``ema.copy_to(target)``, the shadows written into a module, a mapping by
  name, or the tracked tensors themselves (TF's ``variables_to_restore`` then a restore);
- :func:`swapped_in`: ``with ema.average_parameters(model):`` evaluates with the averages and
  restores the model's own weights on exit, also when the block raises;
- :func:`average_module`: ``ema.average_module(model)``, a copy of the model whose tracked
  parameters and buffers *are* the shadows (no second copy: each step updates it), the
  ``target`` network of DQN, DDPG and TD3.

Copies go span by span (:func:`polyak.averaging.plan.copy_spans`), so a flattened model
takes a few kernels.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from polyak.averaging.entries import Registry, VarList, tensor_list
from polyak.averaging.names import canonical_name, module_tensors
from polyak.averaging.plan import copy_spans

__all__ = ["average_module", "copy_into", "swapped_in", "target_pairs"]


def copy_into(registry: Registry, target: VarList) -> None:
    """Write the shadows into ``target``; every tracked variable must find its place."""
    pairs = target_pairs(registry, target, "copy_to")
    with torch.no_grad():
        copy_spans([t for t, _ in pairs], [s for _, s in pairs])


@contextlib.contextmanager
def swapped_in(registry: Registry, model: VarList) -> Iterator[VarList]:
    """Swap the shadows into ``model`` for the ``with`` block, restore it on exit."""
    pairs = target_pairs(registry, model, "average_parameters")
    targets = [t for t, _ in pairs]
    with torch.no_grad():
        backup = [t.detach().clone() for t in targets]
        copy_spans(targets, [s for _, s in pairs])
    try:
        yield model
    finally:
        with torch.no_grad():
            copy_spans(targets, backup)


def average_module(registry: Registry, model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tracked parameters and buffers are the shadows, in eval
    mode (see :meth:`polyak.ExponentialMovingAverage.average_module`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"average_module expects an nn.Module, got {type(model).__name__}")
    memo: dict[int, Any] = {}
    for name, tensor, _ in module_tensors(model, "copy"):
        entry = registry.entries.get(name)
        if entry is None or entry.is_value:
            continue
        if entry.shadow.shape != tensor.shape:
            raise ValueError(
                f"average_module: '{name}' has shape {tuple(tensor.shape)} in the model but "
                f"{tuple(entry.shadow.shape)} in the average"
            )
        if isinstance(tensor, nn.Parameter):
            memo[id(tensor)] = nn.Parameter(entry.shadow, requires_grad=False)
        else:
            memo[id(tensor)] = entry.shadow
    averaged = copy.deepcopy(model, memo).eval()
    shadows = {id(e.shadow) for e in registry.entries.values()}
    for prefix, sub in averaged.named_modules():
        held = frozenset(id(b) for b in sub.buffers(recurse=False) if id(b) in shadows)
        if held:
            sub.register_forward_pre_hook(functools.partial(_refuse_training, prefix, held))
    return averaged


def _refuse_training(name: str, shadows: frozenset[int], module: nn.Module, args: Any) -> None:
    """Forward pre-hook of an averaged submodule holding the shadows ``shadows`` (ids) as
    buffers (a deep copy of the module holds copies: it may train)."""
    if module.training and any(id(b) in shadows for b in module.buffers(recurse=False)):
        raise RuntimeError(
            f"average_module: '{name or type(module).__name__}' of the averaged module is in "
            "training mode, and its forward pass would write batch statistics into the "
            "average's shadows of its buffers. Call .eval() on the averaged module (it is "
            "returned in eval mode); to train a copy, copy.deepcopy(model) instead."
        )


def target_pairs(
    registry: Registry, target: VarList, caller: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target tensor, shadow) for every tracked variable, located in ``target``: by name in
    a module or mapping, by identity in a list of tensors."""
    variables = registry.variables()
    if isinstance(target, (nn.Module, Mapping)):
        named = (
            {n: t for n, t, _ in module_tensors(target, "copy")}
            if isinstance(target, nn.Module)
            else {canonical_name(str(k)): t for k, t in target.items()}
        )
        missing = [e.name for e in variables if e.name not in named]
        if missing:
            raise ValueError(
                f"{caller}: the target has no place for {len(missing)} tracked "
                f"variable(s): {missing[:10]}{' ...' if len(missing) > 10 else ''}"
            )
        pairs = [(named[e.name], e.shadow) for e in variables]
        for name, t in named.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{caller}: '{name}' is a {type(t).__name__}, not a tensor")
    else:
        tensors = tensor_list(target, caller, "the target")
        pairs = []
        for i, tensor in enumerate(tensors):
            entry = registry.by_id.get(id(tensor))
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{caller}: entry {i} is a {type(tensor).__name__}")
            if entry is None:
                raise ValueError(
                    f"{caller}: tensor {i} (shape {tuple(tensor.shape)}) is not tracked; "
                    "pass the module or a {name: tensor} mapping to match by name"
                )
            pairs.append((tensor, entry.shadow))
    for tensor, shadow in pairs:
        if tensor.shape != shadow.shape:
            raise ValueError(
                f"{caller}: shape {tuple(tensor.shape)} in the target does not match the "
                f"average's {tuple(shadow.shape)}"
            )
    return pairs
