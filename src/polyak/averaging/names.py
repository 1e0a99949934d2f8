"""Names of a module's tensors, independent of the wrappers around the module.

``DistributedDataParallel`` adds ``module.`` in front of every name, ``torch.compile`` adds
``_orig_mod.``, FSDP and activation checkpointing add their own segments. An average saved
from a wrapped model must load into the bare one and back, so every name is reduced to the
bare model's before it is used as a key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from polyak import _torch_compat as torch_compat

__all__ = ["BufferPolicy", "canonical_name", "module_tensors", "tensor_owners"]

BufferPolicy = Literal["average", "copy", "ignore"]

# Segments that wrappers insert anywhere in a path (they never name a user's own submodule).
_WRAPPER_SEGMENTS = frozenset(
    {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
)
# DDP/DataParallel's "module." is only a wrapper at the front: inside a model it can be a
# user's attribute name, which must be kept.
_LEADING_WRAPPER = "module"


def canonical_name(name: str) -> str:
    """``"module._orig_mod.fc.weight"`` -> ``"fc.weight"``."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] == _LEADING_WRAPPER:
        parts.pop(0)
    return ".".join(parts)


def module_tensors(
    module: nn.Module, buffers: BufferPolicy
) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """Yield ``(canonical name, tensor, average?)`` for a module's parameters and buffers.

    Parameters are averaged. Persistent buffers (those in ``state_dict``) follow ``buffers``:
    ``"average"`` averages floating ones and copies the rest (BatchNorm's
    ``num_batches_tracked``), ``"copy"`` copies all, ``"ignore"`` skips them. Non-persistent
    buffers are caches, not state, and are skipped. Shared tensors are yielded once.
    """
    if buffers not in ("average", "copy", "ignore"):
        raise ValueError(f"buffers must be 'average', 'copy' or 'ignore', got {buffers!r}")
    seen: set[int] = set()
    for name, param in module.named_parameters():
        seen.add(id(param))
        yield canonical_name(name), param, True
    if buffers == "ignore":
        return
    for prefix, sub in module.named_modules():
        for local, buf in torch_compat.persistent_buffers(sub):
            if id(buf) in seen:
                continue
            seen.add(id(buf))
            name = f"{prefix}.{local}" if prefix else local
            yield canonical_name(name), buf, buffers == "average" and buf.is_floating_point()


def tensor_owners(module: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``{id(tensor): [(submodule path, attribute), ...]}`` for every parameter and buffer of
    ``module``: where each one is held (a tied weight is held in several places). The path
    is the one ``module.get_submodule`` takes (``""`` for ``module`` itself)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        for attr, param in sub.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((path, attr))
        for attr, buf in sub.named_buffers(recurse=False, remove_duplicate=False):
            owners.setdefault(id(buf), []).append((path, attr))
    return owners
