"""Per-step buffers of the optimizer: copies of gradients in flat buffers, and the merged runs
of a list of gradients remembered while their memory stays where it was."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from polyak import _torch_compat as torch_compat
from polyak.flat import pack_like, runs, span

__all__ = ["RunCache", "flat_copy"]

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_nbytes = operator.attrgetter("nbytes")


def flat_copy(
    tensors: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Copies of ``tensors`` in new flat buffers (:func:`polyak.flat.pack_like`; sparse ones
    are passed through as they are), and the copies' merged runs when the dense ones share one
    buffer (else ``None``: let :func:`polyak.flat.coalesce` find them)."""
    out = pack_like(tensors)
    dense = [i for i, t in enumerate(tensors) if not t.is_sparse]
    copies = [out[i] for i in dense]
    if copies:
        with torch.no_grad():
            torch_compat.foreach_copy_(copies, [tensors[i] for i in dense])
    if len(copies) < 2 or len(runs(copies)) != 1:
        return out, None
    return out, [span(copies, 0, len(copies))]


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
