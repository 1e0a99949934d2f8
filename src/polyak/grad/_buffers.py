"""Per-step buffers of the optimizer and the transforms: copies of gradients, and the merged
runs of a list of gradients remembered while their memory stays where it was."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from polyak.flat import pack_like, runs, span

__all__ = ["CopyBuffer", "RunCache"]

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_nbytes = operator.attrgetter("nbytes")


class CopyBuffer:
    """Copies of gradients in flat buffers (:func:`polyak.flat.pack_like`), reusing the last
    step's buffer while nothing else refers to it.

    A fresh buffer every step page-faults its memory in every step (docs/performance.md), so
    the copies of one step go into the memory of the previous one when the gradients have the
    same shapes, dtype and device and the last copies were dropped.
    """

    __slots__ = ("_buf", "_key", "_own", "_views")

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []
        self._key: tuple = ()
        self._own = 0  # references to the buffer's storage that are ours

    def copy(
        self, tensors: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Copies of ``tensors`` (sparse ones passed through as they are), and the copies'
        merged runs when the dense ones share one buffer (else ``None``: let
        :func:`polyak.flat.coalesce` find them)."""
        reused = self._reuse(tensors)
        if reused is not None:
            return reused
        out = pack_like(tensors)
        dense = [i for i, t in enumerate(tensors) if not t.is_sparse]
        copies = [out[i] for i in dense]
        _copy_each(copies, [tensors[i] for i in dense])
        if len(copies) < 2 or len(runs(copies)) != 1:
            return out, None
        whole = span(copies, 0, len(copies))
        own = _storage_use_count(whole)  # the returned copies are these same views
        if len(copies) == len(out) and own > 0:
            self._buf, self._views, self._key, self._own = whole, copies, _copy_key(copies), own
        return out, [whole]

    def _reuse(
        self, tensors: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        buf = self._buf
        if buf is None or len(tensors) != len(self._views) or _copy_key(tensors) != self._key:
            return None
        if _storage_use_count(buf) != self._own:
            self._buf, self._views = None, []  # someone kept the last step's gradients
            return None
        _copy_each(self._views, list(tensors))
        return list(self._views), [buf]


def _copy_each(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if not targets:
        return
    with torch.no_grad():
        torch._foreach_copy_(targets, sources)


def _copy_key(tensors: Sequence[torch.Tensor]) -> tuple:
    first = tensors[0]
    if any(t.is_sparse for t in tensors):
        return ()
    return (first.dtype, first.device, *(t.shape for t in tensors))


def _storage_use_count(t: torch.Tensor) -> int:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # not in this torch build: never reuse
        return -1
    return use_count(t.untyped_storage()._cdata)


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
