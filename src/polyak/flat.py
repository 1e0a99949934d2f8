"""Contiguous storage for parameters and gradients, and the merging of tensors that share it.

A model's parameters are usually hundreds of separate allocations, so any per-tensor update
(an EMA step, clipping, an optimizer step) costs hundreds of kernel launches. Once the
parameters sit back to back in one buffer per (device, dtype), the same update is one kernel
over the buffer: the memory roofline.

- :func:`flatten_parameters_` moves a module's parameters (and their gradients, as they arrive)
  into such buffers while keeping every ``Parameter`` object, so optimizers, hooks,
  ``state_dict``/``load_state_dict`` and ``deepcopy`` keep working.
- :func:`coalesce` takes parallel lists of tensors and merges every run that is contiguous in
  all of them into one 1-D view. It decides from the tensors themselves (pointers, sizes,
  strides), never from bookkeeping, so a parameter that was moved out of its buffer (``.to()``,
  ``param.data = ...``) or a gradient that ``zero_grad()`` replaced is simply not merged: the
  result is always correct, and fast when the memory allows.

There is no TensorFlow equivalent: TF variables are separate buffers too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "coalesce",
    "flatten_parameters_",
    "has_grad_slot",
    "landed_gradients",
    "pack",
    "pack_like",
    "runs",
    "span",
]

_HOOK_ATTR = "_polyak_flat_grad_hook"

# ids of the parameters with a gradient slot whose gradient hook ran since the set was last
# cleared (see landed_gradients).
_landed: set[int] = set()


def pack(
    specs: Sequence[tuple[torch.Size, torch.dtype, torch.device]], *, zeros: bool = False
) -> list[torch.Tensor]:
    """Allocate one contiguous buffer per (device, dtype) and return views shaped as ``specs``.

    Views of one (device, dtype) follow each other in the order of ``specs``, so
    :func:`coalesce` merges them back into one span. ``zeros=True`` zero-fills, otherwise the
    memory is uninitialised.
    """
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for shape, dtype, device in specs:
        key = (torch.device(device), dtype)
        sizes[key] = sizes.get(key, 0) + math.prod(shape)
    alloc = torch.zeros if zeros else torch.empty
    buffers = {key: alloc(n, dtype=key[1], device=key[0]) for key, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = []
    for shape, dtype, device in specs:
        key = (torch.device(device), dtype)
        start = offsets[key]
        offsets[key] = start + math.prod(shape)
        views.append(buffers[key][start : offsets[key]].view(shape))
    return views


def pack_like(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """New uninitialised tensors shaped, typed and placed like the dense ``tensors``: the views
    of :func:`pack`, so they coalesce into one span per buffer. Sparse entries are passed
    through as they are (a gradient list may hold both)."""
    dense = [i for i, t in enumerate(tensors) if not t.is_sparse]
    out = list(tensors)
    views = pack([(tensors[i].shape, tensors[i].dtype, tensors[i].device) for i in dense])
    for i, view in zip(dense, views):
        out[i] = view
    return out


def flatten_parameters_(module: nn.Module, *, grads: bool = True) -> nn.Module:
    """Move ``module``'s parameters into one contiguous buffer per (device, dtype), in place.

    Every ``Parameter`` object stays the same (only its ``.data`` becomes a view into the
    buffer), in the order of ``module.parameters()``. Trainable parameters get a matching
    gradient buffer: a post-accumulate-grad hook copies a freshly allocated gradient into its
    slot, so gradients land in the flat buffer even after ``optimizer.zero_grad()`` set them
    to ``None`` (with ``zero_grad(set_to_none=False)`` they accumulate there in place, at no
    extra cost). Parameters that never receive a gradient keep ``grad=None``, so optimizers
    skip them as before.

    ``grads=False`` flattens the weights only and leaves gradients where autograd puts them
    (removing the slots of an earlier call; ``.grad`` values are kept). That is the faster
    choice when the optimizer takes all tensors in one kernel anyway (``fused=True`` Adam):
    a flat gradient buffer must be zeroed and accumulated into on every backward, while
    autograd's own gradients are handed over without a copy (docs/performance.md, RL: the
    DQN's figures).

    Anything that later replaces a parameter's storage (``module.to(...)``, ``param.data = t``)
    takes that parameter out of the buffer; consumers notice through :func:`coalesce` and fall
    back to per-tensor kernels. Calling this function again re-flattens.

    Returns ``module`` for chaining.
    """
    if not isinstance(module, nn.Module):
        kind = type(module).__name__
        hint = (
            "; to flatten a list of parameters, put them in a module (nn.ParameterList(params))"
            if isinstance(module, (list, tuple))
            else ""
        )
        raise TypeError(f"flatten_parameters_: module must be an nn.Module, got {kind}{hint}")
    if not isinstance(grads, bool):
        raise TypeError(f"flatten_parameters_: grads must be True or False, got {grads!r}")
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    with torch.no_grad():
        for param, view in zip(params, pack([(p.shape, p.dtype, p.device) for p in params])):
            view.copy_(param)
            param.data = view
        if not grads:
            for param in params:  # frozen ones too: they may have a slot from an earlier call
                _detach_grad_slot(param)
            return module
        slots = pack([(p.shape, p.dtype, p.device) for p in trainable], zeros=True)
        for param, slot in zip(trainable, slots):
            _attach_grad_slot(param, slot)
    return module


def _detach_grad_slot(param: nn.Parameter) -> None:
    """Stop moving ``param``'s gradients into a slot (no-op if it has none)."""
    hook = getattr(param, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(param, _HOOK_ATTR)


def _attach_grad_slot(param: nn.Parameter, slot: torch.Tensor) -> None:
    """Make ``slot`` the home of ``param.grad`` now and after every backward."""
    _detach_grad_slot(param)
    if param.grad is not None and not param.grad.is_sparse:
        slot.copy_(param.grad)
        param.grad = slot

    def land_in_slot(p: torch.Tensor) -> None:
        _landed.add(id(p))
        grad = p.grad
        # Autograd allocates a new gradient when .grad was None (zero_grad's default) and
        # accumulates in place otherwise; only the first case needs moving.
        if grad is None or grad.is_sparse or grad.data_ptr() == slot.data_ptr():
            return
        if grad.requires_grad:
            return  # backward(create_graph=True): the gradient's graph must survive
        if grad.shape != slot.shape or grad.dtype != slot.dtype or grad.device != slot.device:
            return
        with torch.no_grad():
            slot.copy_(grad)
        p.grad = slot

    setattr(param, _HOOK_ATTR, param.register_post_accumulate_grad_hook(land_in_slot))


def has_grad_slot(param: torch.Tensor) -> bool:
    """Whether ``param``'s gradients are moved into a flat slot (:func:`flatten_parameters_`)."""
    return hasattr(param, _HOOK_ATTR)


def landed_gradients() -> set[int]:
    """The ids of the parameters with a gradient slot that received a gradient since this
    set was last cleared: the set itself, for its one consumer to clear before a backward
    pass and read after it.

    A slot zeroed in place before the backward (to be accumulated into) looks the same
    afterwards whether the loss reached the parameter or not; its hook runs only when a
    gradient arrived. ``polyak.Optimizer.minimize`` uses this to skip parameters the loss does
    not depend on, as it does for parameters whose ``.grad`` stays ``None``.
    """
    return _landed


def coalesce(*tensor_lists: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
    """Merge runs that are back to back in memory in *every* list into single 1-D views.

    ``tensor_lists`` are parallel sequences (entry ``i`` of each list belongs together, e.g. a
    shadow and its variable). Entries ``i..j`` become one view when, in each list, they are
    contiguous, of one dtype and device, and each starts where the previous one ends inside
    the same storage (see :func:`runs`). Other entries pass through unchanged. The returned
    lists stay parallel, cover exactly the same memory, and alias it (writing to a view
    writes the tensors).

    Cost: a few pointer reads per tensor on the host; no device work, no sync.
    """
    bounds = runs(*tensor_lists)
    return tuple([span(ts, start, end) for start, end in bounds] for ts in tensor_lists)


def runs(*tensor_lists: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """The ``(start, end)`` index ranges that :func:`coalesce` merges, in order, covering
    every entry; a range of length 1 is a tensor that merges with nothing."""
    count = len(tensor_lists[0])
    if any(len(ts) != count for ts in tensor_lists):
        raise ValueError(
            "coalesce: the lists must be parallel, got lengths "
            f"{[len(ts) for ts in tensor_lists]}"
        )
    breaks = [False] * count
    for ts in tensor_lists:
        _mark_breaks(ts, breaks)
    starts = [i for i in range(count) if breaks[i]]
    return list(zip(starts, [*starts[1:], count]))


def _mark_breaks(tensors: Sequence[torch.Tensor], breaks: list[bool]) -> None:
    """Set ``breaks[i]`` where entry ``i`` cannot extend the run that ends at ``i - 1``."""
    prev: torch.Tensor | None = None  # last tensor of the current run, if it can be extended
    prev_end = -1
    storage_end = -1  # end address of the storage of the run's first tensor, read lazily
    for i, t in enumerate(tensors):
        ptr = t.data_ptr()
        end = ptr + t.numel() * t.element_size()
        joins = (
            prev is not None
            and ptr == prev_end
            and t.is_contiguous()
            and t.dtype == prev.dtype
            and t.device == prev.device
        )
        if joins:
            if storage_end < 0:
                # Adjacent addresses can belong to two allocations (a caching allocator splits
                # blocks): only memory inside the run's first storage may be viewed through it.
                storage = tensors[i - 1].untyped_storage()
                storage_end = storage.data_ptr() + storage.nbytes()
            joins = end <= storage_end
        if not joins:
            breaks[i] = True
            storage_end = -1
        prev = t if (t.layout == torch.strided and t.is_contiguous()) else None
        prev_end = end


def span(tensors: Sequence[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """One tensor standing for ``tensors[start:end]``, which must lie back to back in one
    storage (a range from :func:`runs`): the tensor itself, or a 1-D view over the run."""
    if end - start == 1:
        return tensors[start]
    first = tensors[start]
    total = sum(t.numel() for t in tensors[start:end])
    return first.as_strided((total,), (1,), first.storage_offset())
