"""Gradient clipping with TensorFlow's formulas: ``tf.clip_by_value``, ``tf.clip_by_norm``,
``tf.global_norm`` and ``tf.clip_by_global_norm``.

Everything stays on the device: norms are tensors, a non-finite norm turns into NaN outputs
arithmetically (never by a host-side ``if``), and lists are processed with ``torch._foreach_*``
kernels, merged over contiguous memory by :func:`polyak.flat.coalesce`.

Sparse gradients (``nn.Embedding(sparse=True)``) are coalesced first, so duplicate indices are
summed before any norm or clipping: the results are those of the dense gradient, and stay
sparse. (TF's ``IndexedSlices`` skip that summing, so with repeated indices TF reports the norm
of the unsummed rows; ours is the norm of the actual gradient.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from polyak import _torch_compat as torch_compat
from polyak._checks import check_real
from polyak.flat import coalesce

__all__ = ["clip_by_global_norm", "clip_by_norm", "clip_by_value", "global_norm"]

Number = float | int
Bound = Number | torch.Tensor


def clip_by_value(t: torch.Tensor, clip_value_min: Bound, clip_value_max: Bound) -> torch.Tensor:
    """``min(max(t, lo), hi)`` elementwise, computed as TF: ``maximum(minimum(t, hi), lo)``.

    The order matters only when ``lo > hi`` (every entry then becomes ``lo``, as in TF; torch's
    ``clamp`` would give ``hi``). NaN stays NaN. Bounds may be numbers or broadcastable tensors.
    A sparse ``t`` is coalesced and its values clipped (implicit zeros stay zero, as in TF's
    ``IndexedSlices``).
    """
    _check_tensor(t, "clip_by_value", "t")
    lo = _check_bound(clip_value_min, "clip_value_min", "clip_by_value")
    hi = _check_bound(clip_value_max, "clip_value_max", "clip_by_value")
    return map_values(t, lambda v: torch.clamp_min(torch.clamp_max(v, hi), lo))


def clip_by_norm(
    t: torch.Tensor, clip_norm: Bound, axes: int | Sequence[int] | None = None
) -> torch.Tensor:
    """``t * clip_norm / max(||t||_2, clip_norm)``, as ``tf.clip_by_norm``.

    The L2 norm is taken over ``axes`` (all of them by default) and broadcast back. As in TF
    the norm is computed as ``sqrt(sum(t*t))`` with a zero-norm guard (so a zero ``t`` stays
    zero and the gradient of this function is finite), and the product ``t * clip_norm`` is
    taken before the division. A sparse ``t`` is coalesced and clipped by the norm of its values.
    """
    _check_tensor(t, "clip_by_norm", "t")
    clip_norm = _check_clip(clip_norm, "clip_by_norm")
    dims = _check_axes(axes, t)

    def clip(v: torch.Tensor) -> torch.Tensor:
        l2sum = (v * v).sum(dim=dims, keepdim=True)
        positive = l2sum > 0
        # TF's two-tap where: sqrt only sees positive inputs, zero norms pass through as zero.
        safe = torch.where(positive, l2sum, torch.ones_like(l2sum))
        l2norm = torch.where(positive, safe.sqrt(), l2sum)
        return v * clip_norm / torch.clamp_min(l2norm, _like(clip_norm, l2norm))

    return map_values(t, clip)


def global_norm(t_list: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``sqrt(sum_i ||t_i||_2^2)``, as ``tf.global_norm``; ``None`` entries are ignored.

    The result is a 0-dim tensor on the first tensor's device, in the promoted dtype of the
    inputs. One ``_foreach_norm`` kernel per contiguous run of memory; no host sync.
    """
    if isinstance(t_list, torch.Tensor) or not isinstance(t_list, Sequence):
        raise TypeError(
            "global_norm: t_list must be a sequence of tensors (wrap a single tensor in a "
            f"list), got {type(t_list).__name__}"
        )
    tensors = _tensor_list(t_list, "global_norm")
    if not tensors:
        raise ValueError("global_norm: t_list holds no tensor (all entries are None)")
    return norms_squared_sum(tensors).sqrt()


def clip_by_global_norm(
    t_list: Sequence[torch.Tensor | None],
    clip_norm: Bound,
    use_norm: torch.Tensor | Number | None = None,
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Scale every tensor by ``clip_norm / max(global_norm, clip_norm)``, as TF.

    Returns ``(clipped, norm)`` where ``norm`` is the global norm *before* clipping (or
    ``use_norm`` when given, e.g. a norm computed earlier). TF's exact arithmetic is kept:
    ``scale = clip_norm * min(1 / norm, 1 / clip_norm) + (norm - norm)``, so a zero norm gives
    ``scale == clip_norm * (1 / clip_norm)`` and an infinite or NaN norm makes every output NaN
    (on the device, without a host check). ``None`` entries stay ``None``.
    """
    if isinstance(t_list, torch.Tensor) or not isinstance(t_list, Sequence):
        raise TypeError(
            "clip_by_global_norm: t_list must be a sequence of tensors (wrap a single tensor "
            f"in a list), got {type(t_list).__name__}"
        )
    clip_norm = _check_clip(clip_norm, "clip_by_global_norm")
    tensors = _tensor_list(t_list, "clip_by_global_norm")
    if use_norm is None:
        if not tensors:
            raise ValueError("clip_by_global_norm: t_list holds no tensor (all entries are None)")
        norm = norms_squared_sum(tensors).sqrt()
    elif isinstance(use_norm, torch.Tensor):
        norm = use_norm
    else:
        # A norm given as a number: >= 0; inf is kept (TF: every output NaN, as for a
        # computed infinite norm).
        use_norm = check_real(
            use_norm, "use_norm", "clip_by_global_norm", low=0.0, allow_infinite=True
        )
        norm = torch.tensor(use_norm)
    scale = global_scale(norm, clip_norm)
    dense = [t for t in tensors if not t.is_sparse]
    scaled = iter(torch_compat.foreach_mul(dense, as_dtype(scale, dense[0].dtype)) if dense else [])
    out: list[torch.Tensor | None] = []
    for t in t_list:
        if t is None:
            out.append(None)
        elif t.is_sparse:
            out.append(map_values(t, lambda v: v * scale.to(v.dtype)))
        else:
            out.append(next(scaled))
    return out, norm


# ---------------------------------------------------------------- shared with the transforms


def global_scale(norm: torch.Tensor, clip_norm: Bound) -> torch.Tensor:
    """TF's factor ``clip_norm * min(1/norm, 1/clip_norm) + (norm - norm)``, in norm's dtype."""
    if isinstance(clip_norm, torch.Tensor):
        c = clip_norm.to(dtype=norm.dtype, device=norm.device)
        return c * torch.minimum(norm.reciprocal(), c.reciprocal()) + (norm - norm)
    c, inv_c = _host_constants(float(clip_norm), norm.dtype)
    # ``x * c + z`` as one ``add(z, x, alpha=c)``: z is 0 or NaN, so adding it is exact and the
    # result is the same bits as the separate product and sum (fused or not).
    return torch.add(norm - norm, torch.clamp_max(norm.reciprocal(), inv_c), alpha=c)


@functools.lru_cache(maxsize=64)
def _host_constants(clip_norm: float, dtype: torch.dtype) -> tuple[float, float]:
    """``clip_norm`` and its reciprocal rounded to ``dtype`` on the host, as TF's graph does
    (computed once per value: building a tensor for them cost more than the clipping)."""
    c = torch.tensor(clip_norm, dtype=dtype)
    return c.item(), c.reciprocal().item()


def dense_and_sparse(
    tensors: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[int]]:
    """Dense entries merged over contiguous memory, and the indices of the sparse entries."""
    dense = [t for t in tensors if not t.is_sparse]
    sparse = [i for i, t in enumerate(tensors) if t.is_sparse]
    return (coalesce(dense)[0] if dense else []), sparse


def norms_squared_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i ||t_i||^2`` over dense and sparse tensors, as one 0-dim tensor.

    Norms are taken per tensor, never per merged run, as TF's ``global_norm`` does: the result
    does not depend on how the tensors are laid out in memory.
    """
    first = tensors[0]
    dtype, device = first.dtype, first.device
    if all(t.dtype is dtype and not t.is_sparse for t in tensors) and all(
        t.device == device for t in tensors
    ):
        # The common case (one dtype and device, all dense): no per-norm casts.
        return torch.stack(torch_compat.foreach_norm(tensors)).square().sum()
    dense = [t for t in tensors if not t.is_sparse]
    norms = list(torch_compat.foreach_norm(dense)) if dense else []
    norms += [t.coalesce().values().norm() for t in tensors if t.is_sparse]
    dtype = _promoted([t.dtype for t in tensors])
    return torch.stack([n.to(dtype=dtype, device=device) for n in norms]).square().sum()


def map_values(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(t)`` for a dense ``t``; for a sparse one ``fn`` of its coalesced values, kept sparse."""
    if not t.is_sparse:
        return fn(t)
    # Duplicate indices are summed first: clipping rows of an uncoalesced tensor would clip
    # the parts of an entry instead of the entry.
    c = t.coalesce()
    return torch.sparse_coo_tensor(
        c.indices(), fn(c.values()), c.shape, is_coalesced=True, check_invariants=False
    )


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call when ``t`` already has it (a per-step path)."""
    return t if t.dtype is dtype else t.to(dtype)


def _promoted(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _like(value: Bound, ref: torch.Tensor) -> torch.Tensor | Number:
    if isinstance(value, torch.Tensor):
        return value.to(dtype=ref.dtype, device=ref.device)
    return value


def _tensor_list(t_list: Sequence[torch.Tensor | None], caller: str) -> list[torch.Tensor]:
    out = []
    for i, t in enumerate(t_list):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{caller}: t_list[{i}] must be a torch.Tensor or None, got {type(t)}")
        out.append(t)
    return out


def _check_tensor(t: object, caller: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_clip(clip_norm: Bound, caller: str) -> Bound:
    """A number ``clip_norm`` must be finite and > 0: TF's formulas give NaN for an infinite
    one, and for a zero one wherever the norm is zero. A tensor is not checked (a sync)."""
    if isinstance(clip_norm, torch.Tensor):
        return clip_norm
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)):
        raise TypeError(f"{caller}: clip_norm must be a number or tensor, got {clip_norm!r}")
    return check_real(
        clip_norm,
        "clip_norm",
        caller,
        low=0.0,
        low_open=True,
        hint="for no clipping, do not clip (TF's inf clip_norm turns every output NaN)",
    )


def _check_bound(bound: Bound, name: str, caller: str) -> Bound:
    """A clip bound: a tensor (not checked: a sync) or a number that is not NaN (an
    infinite bound clips one side only)."""
    if isinstance(bound, torch.Tensor):
        return bound
    if isinstance(bound, bool) or not isinstance(bound, (int, float)):
        raise TypeError(f"{caller}: {name} must be a number or tensor, got {bound!r}")
    return check_real(bound, name, caller, allow_infinite=True)


def _check_axes(axes: int | Sequence[int] | None, t: torch.Tensor) -> tuple[int, ...] | None:
    if axes is None:
        return None
    dims = (axes,) if isinstance(axes, int) else axes
    if isinstance(dims, str) or not isinstance(dims, Sequence) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in dims
    ):
        raise TypeError(f"clip_by_norm: axes must be an int or a list of ints, got {axes!r}")
    ndim = max(t.ndim, 1)
    normal = [d % ndim for d in dims if -ndim <= d < ndim]
    if len(normal) != len(dims) or len(set(normal)) != len(normal):
        raise ValueError(
            f"clip_by_norm: axes {axes!r} must be distinct dims of a {t.ndim}-dim tensor "
            f"(in [{-ndim}, {ndim - 1}])"
        )
    return tuple(dims)
