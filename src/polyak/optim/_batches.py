"""A param group's dense tensors as foreach batches.

The update of one (device, dtype) is a sequence of multi-tensor (``foreach``) calls over parallel
lists (parameters, gradients, each slot). Two things make those calls few and fast:

- Runs that lie back to back in memory in *every* list (after :func:`polyak.flatten_parameters_`,
  whose slots the optimizers allocate in the same order, see ``TFOptimizer``) are merged into
  one view each (:func:`polyak.flat.runs`). The layout is remembered while the data pointers
  stay the same, keeping the merged views alive so that those addresses cannot be taken by
  other storage meanwhile.
- On the CPU (float16 and bfloat16 tensors, or any without NumPy; float32 and float64 go
  through :mod:`polyak.optim._arrays`) the lists are cut into pieces of about
  :data:`CPU_PIECE_BYTES` per tensor, and the whole update runs piece by piece: TF's update
  rules are ten-odd elementwise passes, which stream from memory when each pass covers a whole
  model, and stay in cache over a piece (measured on the mlp48 benchmark: 22 ms per Adam step
  over whole lists, 7 ms over 1 MiB pieces). On accelerators one batch holds everything, each
  call one or a few launches.

Elementwise updates give the same bits however the tensors are merged or cut.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from polyak.flat import runs, span

__all__ = ["CPU_PIECE_BYTES", "Layout", "by_device_dtype", "pieces"]

CPU_PIECE_BYTES = 1 << 20

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_nbytes = operator.attrgetter("nbytes")

Lists = list[list[torch.Tensor]]


class Layout:
    """The merged form of parallel lists whose first list (the parameters) keeps its tensors."""

    __slots__ = ("_key", "_mergeable", "_param_ptrs", "_template")

    def __init__(self) -> None:
        self._param_ptrs: list[int] | None = None
        self._mergeable = False
        self._key: list[int] | None = None
        # Per run: a tuple of merged views (one per list) or the index of a lone entry.
        self._template: list[tuple[torch.Tensor, ...] | int] = []

    def merge(self, lists: Lists) -> Lists:
        """``lists`` with every run that is contiguous in all of them merged into one view."""
        params = lists[0]
        ptrs = list(map(_data_ptr, params))
        if ptrs != self._param_ptrs:
            self._param_ptrs = ptrs
            ends = map(operator.add, ptrs, map(_nbytes, params))
            self._mergeable = any(map(operator.eq, ptrs[1:], ends))
            self._key = None
        if not self._mergeable:
            return lists
        key = [p for ts in lists[1:] for p in map(_data_ptr, ts)]
        if key != self._key or not all(all(map(_is_contiguous, ts)) for ts in lists):
            bounds = runs(*lists)
            self._key = key
            self._template = [
                start if end - start == 1 else tuple(span(ts, start, end) for ts in lists)
                for start, end in bounds
            ]
        return [
            [ts[r] if isinstance(r, int) else r[j] for r in self._template]
            for j, ts in enumerate(lists)
        ]


def pieces(lists: Lists, device: torch.device) -> list[Lists]:
    """The batches to run the update on: all of ``lists`` at once off the CPU; on the CPU,
    consecutive pieces of about :data:`CPU_PIECE_BYTES` per tensor (a larger contiguous
    tensor is cut into views of that size)."""
    if device.type != "cpu" or not lists[0]:
        return [lists]
    limit = max(1, CPU_PIECE_BYTES // lists[0][0].element_size())
    out: list[Lists] = []
    current: Lists = [[] for _ in lists]
    size = 0
    for i, t in enumerate(lists[0]):
        n = t.numel()
        if n > limit and all(ts[i].is_contiguous() for ts in lists):
            if size:
                out.append(current)
                current, size = [[] for _ in lists], 0
            flats = [ts[i].view(-1) for ts in lists]
            out += [[[f[s : s + limit]] for f in flats] for s in range(0, n, limit)]
            continue
        if size and size + n > limit:
            out.append(current)
            current, size = [[] for _ in lists], 0
        for c, ts in zip(current, lists):
            c.append(ts[i])
        size += n
    if current[0]:
        out.append(current)
    return out


def by_device_dtype(
    tensors: Sequence[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in order."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out
