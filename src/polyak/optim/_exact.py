"""TF's elementwise roundings with torch operations: :class:`ForeachOps`, the operation set
the update rules are written in, on foreach lists (accelerators; on the CPU float16, bfloat16
and, without NumPy, all dtypes: float32 and float64 go through :mod:`polyak.optim._arrays`).

Its operations use the primitives below. Each computes exactly what TF's kernels compute
(every product and quotient rounded before it is added: no fused multiply-add where TF has
none) on every device and SIMD level, which tests/test_optim_kernels.py checks bit for bit at
the default, AVX2 and native levels:

- plain single operations (``_foreach_mul_``, ``_foreach_add_`` with ``alpha`` 1, ...);
- :func:`add_scaled_`, ``x += round(c * y)``: on the CPU one ``addcmul(x, y, 1, value=c)``
  (a fused multiply-add by 1 is exact), since there a call per tensor costs more than the
  arithmetic of small tensors; elsewhere a product, then a sum;
- :func:`add_scaled_quotient_`, ``x += round(round(c * y) / z)``: on the CPU one ``addcdiv``
  (torch computes ``x + (c * y) / z`` there); CUDA's foreach kernels compute ``x + c * (y / z)``
  with a contracted multiply-add, so there the product is formed first;
- :func:`sqrt`, correctly rounded square roots (see its docstring for the CPU).

Half and bfloat16 always take separate operations: torch computes the fused ones in float32 and
rounds once, where TF rounds each operation to the variable's dtype.

:class:`ForeachOps` makes an update's intermediate tensors. On the CPU (:class:`Reused`) they
are views of buffers kept from step to step: allocating and freeing a few megabytes per piece
made glibc return its pages and fault them back in, 5,600 page faults per Adam step on the
flattened mlp48 model (3.3 times the step's time). Elsewhere they come from torch's caching
allocator.
"""

from __future__ import annotations

import torch

from polyak import _torch_compat as torch_compat

try:
    import numpy as _np
except ImportError:  # pragma: no cover - numpy comes with the test and RL extras
    _np = None

__all__ = ["FRESH", "ForeachOps", "Reused", "add_scaled_", "add_scaled_quotient_", "sqrt"]

Tensors = list[torch.Tensor]

_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_EXACT_FUSED = (torch.float32, torch.float64)


def _fused(t: torch.Tensor) -> bool:
    return t.is_cpu and t.dtype in _EXACT_FUSED


def add_scaled_(xs: Tensors, ys: Tensors, c: float) -> None:
    """``xs[i] += round(ys[i] * c)``."""
    x = xs[0]
    if _fused(x):
        one = _ONES.get((x.device, x.dtype))
        if one is None:
            one = _ONES[(x.device, x.dtype)] = torch.ones((), dtype=x.dtype, device=x.device)
        torch_compat.foreach_addcmul_(xs, ys, [one] * len(xs), value=c)
    else:
        torch_compat.foreach_add_(xs, torch_compat.foreach_mul(ys, c))


def add_scaled_quotient_(xs: Tensors, ys: Tensors, zs: Tensors, c: float) -> None:
    """``xs[i] += round(round(ys[i] * c) / zs[i])``."""
    if _fused(xs[0]):
        torch_compat.foreach_addcdiv_(xs, ys, zs, value=c)
        return
    q = torch_compat.foreach_mul(ys, c)
    if xs[0].dtype in _EXACT_FUSED:  # x + 1 * (q / z): the multiply-add by 1 is exact
        torch_compat.foreach_addcdiv_(xs, q, zs)
    else:
        torch_compat.foreach_div_(q, zs)
        torch_compat.foreach_add_(xs, q)


def sqrt(tensors: Tensors, *, out: Tensors | None = None) -> Tensors:
    """Square roots, correctly rounded as TF's kernels and IEEE hardware give them, into
    ``out`` (default: new tensors; ``out=tensors`` works in place).

    On the CPU torch's ``sqrt`` goes through MKL's vector math library, which is not correctly
    rounded on every processor (on the AMD EPYC of docs/optim.md one float32 in five comes out
    an ulp off, at every SIMD level); numpy's ``sqrt`` is the hardware instruction, exact, and
    there about 1.8 times faster (it runs on one thread). Without numpy, torch's is used.
    Elsewhere (CUDA) torch's ``sqrt`` is the correctly rounded one.
    """
    first = tensors[0]
    if _np is None or not first.is_cpu:
        if out is tensors:
            torch_compat.foreach_sqrt_(tensors)
            return tensors
        roots = torch_compat.foreach_sqrt(tensors)
        if out is None:
            return roots
        torch_compat.foreach_copy_(out, roots)
        return out
    if out is None:
        out = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    with _np.errstate(invalid="ignore"):  # NaN for negative inputs, silently, as torch
        for t, o in zip(tensors, out):
            if t.dtype in _EXACT_FUSED and o.is_contiguous():
                _np.sqrt(t.detach().numpy(), out=o.detach().numpy())
            else:  # narrower dtypes: the float32 root, rounded again (exact for them)
                wide = t.detach().float().contiguous().numpy()
                o.copy_(torch.from_numpy(_np.sqrt(wide)))
    return out


class ForeachOps:
    """The operation set TF's update rules are written in (see :class:`polyak.optim._arrays.
    ArrayOps` for the same on NumPy arrays), on parallel lists of tensors of one device and
    dtype, with torch's foreach operations and the exact primitives above.

    Results made with ``k`` are temporaries: one is overwritten by the next result made with
    the same ``k`` (so a rule reuses ``k`` once a temporary is dead). Here they are fresh
    tensors from the allocator; see :class:`Reused`. Scalars are Python floats already
    rounded to the dtype (``Arith``)."""

    def _out(self, k: int, like: Tensors) -> Tensors | None:
        return None

    # results in temporaries
    def mul(self, k: int, a: Tensors, b: Tensors | float) -> Tensors:
        """``a * b``."""
        out = self._out(k, a)
        if out is None:
            return torch_compat.foreach_mul(a, b)
        others = b if isinstance(b, list) else [b] * len(a)
        for x, y, o in zip(a, others, out):
            torch.mul(x, y, out=o)
        return out

    def sub(self, k: int, a: Tensors, b: Tensors) -> Tensors:
        """``a - b``."""
        out = self._out(k, a)
        if out is None:
            return torch_compat.foreach_sub(a, b)
        for x, y, o in zip(a, b, out):
            torch.sub(x, y, out=o)
        return out

    def rsub(self, k: int, c: float, a: Tensors) -> Tensors:
        """``c - a``, as ``(-a) + c`` (IEEE subtraction is the sum with the negation)."""
        out = self._out(k, a)
        if out is None:
            out = torch_compat.foreach_neg(a)
        else:
            for x, o in zip(a, out):
                torch.neg(x, out=o)
        torch_compat.foreach_add_(out, c)
        return out

    def add(self, k: int, a: Tensors, c: float) -> Tensors:
        """``a + c``."""
        out = self._out(k, a)
        if out is None:
            return torch_compat.foreach_add(a, c)
        for x, o in zip(a, out):
            torch.add(x, c, out=o)
        return out

    def copy(self, k: int, a: Tensors) -> Tensors:
        """A copy of ``a``."""
        out = self._out(k, a)
        if out is None:
            return [t.clone() for t in a]
        torch_compat.foreach_copy_(out, a)
        return out

    def sqrt(self, k: int, a: Tensors) -> Tensors:
        """``sqrt(a)``, correctly rounded (:func:`sqrt`)."""
        return sqrt(a, out=self._out(k, a))

    def clamp(self, k: int, a: Tensors, low: float, high: float) -> Tensors:
        """``max(min(a, high), low)`` (NaN stays NaN)."""
        out = self.copy(k, a)
        torch_compat.foreach_clamp_max_(out, high)
        torch_compat.foreach_clamp_min_(out, low)
        return out

    def pow(self, k: int, a: Tensors, exponent: float) -> Tensors:
        """``a ** exponent`` (torch's ``pow``: not always correctly rounded, nor is TF's)."""
        out = self._out(k, a)
        if out is None:
            return torch_compat.foreach_pow(a, exponent)
        for x, o in zip(a, out):
            torch.pow(x, exponent, out=o)
        return out

    # in place
    def mul_(self, x: Tensors, y: Tensors | float) -> None:
        """``x *= y``."""
        torch_compat.foreach_mul_(x, y)

    def add_(self, x: Tensors, y: Tensors | float) -> None:
        """``x += y``."""
        torch_compat.foreach_add_(x, y)

    def sub_(self, x: Tensors, y: Tensors | float) -> None:
        """``x -= y``."""
        torch_compat.foreach_sub_(x, y)

    def div_(self, x: Tensors, y: Tensors | float) -> None:
        """``x /= y``."""
        torch_compat.foreach_div_(x, y)

    def sqrt_(self, x: Tensors) -> None:
        """``x = sqrt(x)``, correctly rounded (:func:`sqrt`)."""
        sqrt(x, out=x)

    def reciprocal_(self, x: Tensors) -> None:
        """``x = 1 / x``."""
        torch_compat.foreach_reciprocal_(x)

    def copy_(self, x: Tensors, y: Tensors) -> None:
        """``x = y``."""
        torch_compat.foreach_copy_(x, y)

    def assign_quotient_(self, x: Tensors, a: Tensors, b: Tensors) -> None:
        """``x = a / b``, where ``a`` is a temporary (it may be overwritten)."""
        torch_compat.foreach_div_(a, b)
        torch_compat.foreach_copy_(x, a)

    def keep_where_abs_above_(self, x: Tensors, y: Tensors, bound: float) -> None:
        """``x = x if |y| > bound else 0`` (0 where ``y`` is NaN)."""
        for a, b in zip(x, y):
            a.masked_fill_((b.abs() > bound).logical_not_(), 0.0)

    def add_scaled_(self, x: Tensors, y: Tensors, c: float) -> None:
        """``x += round(y * c)`` (:func:`add_scaled_`)."""
        add_scaled_(x, y, c)

    def scale_add_(self, x: Tensors, c: float, y: Tensors) -> None:
        """``x = round(x * c) + y``."""
        torch_compat.foreach_mul_(x, c)
        torch_compat.foreach_add_(x, y)

    def add_scaled_quotient_(self, x: Tensors, y: Tensors, z: Tensors, c: float) -> None:
        """``x += round(round(y * c) / z)`` (:func:`add_scaled_quotient_`)."""
        add_scaled_quotient_(x, y, z, c)


FRESH = ForeachOps()


class Reused(ForeachOps):
    """Temporaries in buffers kept across pieces and steps (the CPU's), one per ``k`` and
    dtype, grown to the largest piece seen; the views for a piece's shapes are remembered."""

    __slots__ = ("_buffers", "_views")

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._views: dict[tuple, Tensors] = {}

    def _out(self, k: int, like: Tensors) -> Tensors:
        dtype = like[0].dtype
        key = (k, dtype, *(t.shape for t in like))
        views = self._views.get(key)
        if views is not None:
            return views
        total = sum(t.numel() for t in like)
        buffer = self._buffers.get((k, dtype))
        if buffer is None or buffer.numel() < total:
            buffer = self._buffers[(k, dtype)] = torch.empty(total, dtype=dtype)
            self._views = {v: ts for v, ts in self._views.items() if v[:2] != (k, dtype)}
        views, offset = [], 0
        for t in like:
            views.append(buffer[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        self._views[key] = views
        return views
