"""A param group's dense tensors as foreach batches.

The update of one (device, dtype) is a sequence of ``torch._foreach_*`` calls over parallel
lists (parameters, gradients, each slot). Two things make those calls few and fast:

- Runs that lie back to back in memory in *every* list (after :func:`polyak.flatten_parameters_`,
  whose slots the optimizers allocate in the same order, see ``TFOptimizer``) are merged into
  one view each (:func:`polyak.flat.runs`). The layout is remembered while the data pointers
  stay the same, keeping the merged views alive so that those addresses cannot be taken by
  other storage meanwhile.
- On the CPU the lists are cut into pieces of about :data:`CPU_PIECE_BYTES` per tensor, and the
  whole update runs piece by piece: TF's update rules are ten-odd elementwise passes, which
  stream from memory when each pass covers a whole model, and stay in the L2 cache over a
  piece (measured on the mlp48 benchmark: 22 ms per Adam step over whole lists, 7 ms over
  1 MiB pieces). On accelerators one batch holds everything, each call one or a few launches.

Elementwise updates give the same bits however the tensors are merged or cut.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from polyak.flat import runs, span

try:
    import numpy as _np
except ImportError:  # pragma: no cover - numpy comes with the test and RL extras
    _np = None

__all__ = [
    "CPU_PIECE_BYTES",
    "Layout",
    "add_scaled_",
    "add_scaled_quotient_",
    "by_device_dtype",
    "pieces",
    "rsqrt",
    "sqrt",
]

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


# The update rules are written with these few primitives, each exactly TF's roundings (every
# product and quotient rounded before it is added) on every device and SIMD level. On the CPU
# they take one call where they can, since there a call per tensor costs more than the
# arithmetic for small tensors: ``addcmul(x, y, 1, value=c)`` is ``x + round(c * y)`` (a fused
# multiply-add by 1 is exact) and ``addcdiv(x, y, z, value=c)`` is ``x + round(round(c * y) /
# z)``, checked bit for bit at every SIMD level in tests/test_optim_kernels.py. Elsewhere (CUDA)
# foreach kernels compute ``x + c * (y / z)`` with a contracted multiply-add, so the products
# are formed first. Half and bfloat16 always take separate operations: torch computes those
# fused ops in float32 and rounds once.

_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_EXACT_FUSED = (torch.float32, torch.float64)


def _fused(t: torch.Tensor) -> bool:
    return t.is_cpu and t.dtype in _EXACT_FUSED


def add_scaled_(xs: list[torch.Tensor], ys: list[torch.Tensor], c: float) -> None:
    """``xs[i] += round(ys[i] * c)``."""
    x = xs[0]
    if _fused(x):
        one = _ONES.get((x.device, x.dtype))
        if one is None:
            one = _ONES[(x.device, x.dtype)] = torch.ones((), dtype=x.dtype, device=x.device)
        torch._foreach_addcmul_(xs, ys, [one] * len(xs), value=c)
    else:
        torch._foreach_add_(xs, torch._foreach_mul(ys, c))


def add_scaled_quotient_(
    xs: list[torch.Tensor], ys: list[torch.Tensor], zs: list[torch.Tensor], c: float
) -> None:
    """``xs[i] += round(round(ys[i] * c) / zs[i])``."""
    if _fused(xs[0]):
        torch._foreach_addcdiv_(xs, ys, zs, value=c)
        return
    q = torch._foreach_mul(ys, c)
    if xs[0].dtype in _EXACT_FUSED:  # x + 1 * (q / z): the multiply-add by 1 is exact
        torch._foreach_addcdiv_(xs, q, zs)
    else:
        torch._foreach_div_(q, zs)
        torch._foreach_add_(xs, q)


def sqrt(tensors: list[torch.Tensor], *, inplace: bool = False) -> list[torch.Tensor]:
    """Square roots, correctly rounded as TF's kernels and IEEE hardware give them: new
    tensors, or ``tensors`` themselves with ``inplace=True`` (for temporaries).

    On the CPU torch's ``sqrt`` goes through MKL's vector math library, which is not correctly
    rounded on every processor (on the AMD EPYC of docs/optim.md one float32 in five comes out
    an ulp off, at every SIMD level); numpy's ``sqrt`` is the hardware instruction, exact, and
    there about 1.8 times faster (it runs on one thread). Without numpy, torch's is used.
    Elsewhere (CUDA) torch's ``sqrt`` is the correctly rounded one.
    """
    first = tensors[0]
    if _np is None or not first.is_cpu:
        if inplace:
            torch._foreach_sqrt_(tensors)
            return tensors
        return torch._foreach_sqrt(tensors)
    out = tensors if inplace else [t.detach().clone() for t in tensors]
    with _np.errstate(invalid="ignore"):  # NaN for negative inputs, silently, as torch
        for t in out:
            if t.dtype in _EXACT_FUSED and t.is_contiguous():
                a = t.detach().numpy()
                _np.sqrt(a, out=a)
            else:  # narrower dtypes: the float32 root, rounded again (exact for them)
                wide = t.detach().float().contiguous().numpy()
                _np.sqrt(wide, out=wide)
                t.copy_(torch.from_numpy(wide))
    return out


def rsqrt(tensors: list[torch.Tensor], *, inplace: bool = False) -> list[torch.Tensor]:
    """``1 / sqrt(x)`` with both operations correctly rounded (new tensors): TF's ``rsqrt``
    in scalar code (``numext::rsqrt``). TF's vectorized CPU kernels use a fast estimate
    instead (Eigen's ``prsqrt``, a few ulps off, machine-dependent); CUDA's ``rsqrtf``, which
    torch's ``rsqrt`` calls there, is approximate too."""
    roots = sqrt(tensors, inplace=inplace)
    torch._foreach_reciprocal_(roots)
    return roots
