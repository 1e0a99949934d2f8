"""Grouping helpers shared by the optimizer and the transforms."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from polyak.flat import runs, span

__all__ = ["RunCache", "dense_groups", "flat_copy", "flat_like"]

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_nbytes = operator.attrgetter("nbytes")


def dense_groups(
    tensors: Sequence[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the dense tensors, grouped by (device, dtype), in order."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if not t.is_sparse:
            out.setdefault((t.device, t.dtype), []).append(i)
    return out


def flat_like(tensors: Sequence[torch.Tensor], *, copy: bool) -> list[torch.Tensor]:
    """New tensors shaped like the dense ``tensors`` (their values with ``copy``, else
    uninitialised), as views of one buffer per (device, dtype) so that they coalesce into one
    kernel per buffer. Sparse entries are passed through as they are."""
    out = list(tensors)
    for (device, dtype), idx in dense_groups(tensors).items():
        members = [tensors[i] for i in idx]
        if copy:
            buf = torch.cat([t.reshape(-1) for t in members])
        else:
            buf = torch.empty(sum(t.numel() for t in members), device=device, dtype=dtype)
        for i, view in zip(idx, _shaped_views(buf, members)):
            out[i] = view
    return out


def _shaped_views(buf: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of ``buf`` shaped like ``tensors``."""
    return [p.view(t.shape) for p, t in zip(buf.split([t.numel() for t in tensors]), tensors)]


def flat_copy(
    tensors: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """``flat_like(tensors, copy=True)``, and the merged runs of the copies when they are a
    single buffer (else ``None``: let ``coalesce`` find them)."""
    groups = dense_groups(tensors)
    out = list(tensors)
    buffers: list[torch.Tensor | None] = []
    with torch.no_grad():
        for idx in groups.values():
            members = [tensors[i] for i in idx]
            if len(members) > 1 and all(t.numel() for t in members):
                buf = torch.cat([t.reshape(-1) for t in members])
                views = _shaped_views(buf, members)
            else:  # one tensor or empty ones: no run to hand out
                buf, views = None, flat_like(members, copy=True)
            for i, v in zip(idx, views):
                out[i] = v
            buffers.append(buf)
    if len(buffers) == 1 and buffers[0] is not None:
        return out, [buffers[0]]
    return out, None


class RunCache:
    """:func:`polyak.flat.coalesce` of a list of dense tensors, remembered while their data
    pointers stay the same (one pointer read per tensor instead of the full layout check).

    Merged runs are views that keep their storage alive, so a later list at the same addresses
    lies in that same storage: the cached views still cover exactly its tensors. When nothing
    merged, only the decision is kept (the tensors themselves are returned, never old ones).
    """

    __slots__ = ("_ptrs", "_template")

    def __init__(self) -> None:
        self._ptrs: list[int] | None = None
        # None: nothing merged; else per run, a merged view or the index of a lone tensor.
        self._template: list[torch.Tensor | int] | None = None

    def layout(
        self, dense: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[int], list[torch.Tensor]]:
        """``(runs, lone, merged)`` for the dense tensors ``dense``: the runs cover exactly
        their memory, in order; ``lone`` indexes the tensors in no merged run and ``merged``
        holds the merged runs."""
        ptrs = list(map(_data_ptr, dense))
        if ptrs != self._ptrs:
            self._ptrs = ptrs
            self._template = _template(dense)
        template = self._template
        if template is None:
            return list(dense), list(range(len(dense))), []
        if not all(map(_is_contiguous, dense)):  # same addresses, other layout: look again
            self._ptrs = None
            return self.layout(dense)
        runs = [dense[r] if isinstance(r, int) else r for r in template]
        lone = [r for r in template if isinstance(r, int)]
        return runs, lone, [r for r in template if not isinstance(r, int)]


def _template(dense: Sequence[torch.Tensor]) -> list[torch.Tensor | int] | None:
    """As :func:`polyak.flat.coalesce`: a view per merged run, the index of each lone tensor."""
    ptrs = list(map(_data_ptr, dense))
    ends = map(operator.add, ptrs, map(_nbytes, dense))
    if not any(map(operator.eq, ptrs[1:], ends)):
        return None  # no tensor starts where the previous one ends: nothing can merge
    bounds = runs(dense)
    if all(end - start == 1 for start, end in bounds):
        return None
    return [start if end - start == 1 else span(dense, start, end) for start, end in bounds]
