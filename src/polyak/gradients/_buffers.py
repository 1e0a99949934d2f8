"""Grouping helpers shared by the optimizer and the transforms."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["dense_groups", "flat_like"]


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
        if copy:
            buf = torch.cat([tensors[i].reshape(-1) for i in idx])
        else:
            buf = torch.empty(sum(tensors[i].numel() for i in idx), device=device, dtype=dtype)
        for i, piece in zip(idx, buf.split([tensors[i].numel() for i in idx])):
            out[i] = piece.view(tensors[i].shape)
    return out
