"""Sparse gradients as TF1's ``IndexedSlices``: rows of the variable, duplicates summed.

A sparse COO ``.grad`` (``nn.Embedding(sparse=True)`` gives one, uncoalesced, with an index per
looked-up id) with ``k`` sparse dimensions names rows of the variable seen as
``(prod(shape[:k]), *shape[k:])``; for ``k = 1`` those are the variable's own rows, as TF's
``IndexedSlices`` of a ``tf.gather``.
"""

from __future__ import annotations

import torch

__all__ = ["as_rows", "slices", "sum_duplicates"]


def as_rows(t: torch.Tensor, sparse_dim: int) -> torch.Tensor:
    """``t`` as ``(rows, *t.shape[sparse_dim:])``, a view (``t`` must be contiguous)."""
    return t.view(-1, *t.shape[sparse_dim:])


def slices(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, values)`` of a sparse COO gradient as stored: uncoalesced, so repeated rows
    and their order are kept (``_indices``/``_values`` are torch's documented accessors for
    uncoalesced tensors)."""
    indices, values = grad._indices(), grad._values()
    k = grad.sparse_dim()
    if k == 1:
        return indices[0], values
    strides = [1] * k
    for d in range(k - 2, -1, -1):
        strides[d] = strides[d + 1] * grad.shape[d + 1]
    scale = torch.tensor(strides, dtype=indices.dtype, device=indices.device)
    return (indices * scale[:, None]).sum(0), values


def sum_duplicates(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TF's ``_deduplicate_indexed_slices``: each row once, with its values summed in the
    order they come (``unsorted_segment_sum``: ``0 + v1 + v2 + ...``; on the CPU
    ``index_add_`` adds in that order too). On an accelerator the number of distinct rows is
    read back to the host (one sync), as any sparse update must."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    summed = values.new_zeros((unique.numel(), *values.shape[1:]))
    return unique, summed.index_add_(0, inverse, values)
