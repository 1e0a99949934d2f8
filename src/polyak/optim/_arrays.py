"""TF's update rules on the CPU through NumPy, chunk by chunk.

On the CPU torch's ``_foreach_*`` operations are a loop of per-tensor operations (a microsecond
or more of dispatch each) over whole tensors, and TF's rules take ten-odd elementwise passes,
each rounded as TF rounds it. So float32 and float64 parameters on the CPU are updated through
NumPy views of their memory (:class:`ArrayPlan`, kept from step to step):

- every tensor, or every run of tensors that lies back to back in the parameters and every
  slot (after :func:`polyak.flatten_parameters_`), is cut into chunks of :data:`CHUNK_BYTES`
  per array, and the whole rule runs on a chunk before the next, so that its passes find the
  chunk in cache and memory is read and written about once a step;
- tensors of at most :data:`STAGED_ELEMENTS` elements are copied into one array per list,
  stepped together and copied back;
- each of TF's operations is one NumPy ufunc call with ``out=`` (IEEE ``+ - * /``, and the
  hardware's correctly rounded square root, where torch's CPU ``sqrt`` goes through MKL and is
  not correctly rounded on every processor), except the fused forms that are exact on the CPU
  (:mod:`polyak.optim._exact`): ``x + round(c * y)`` as torch's ``addcmul`` by 1 and
  ``x + round(round(c * y) / z)`` as ``addcdiv``, run on tensors over the same memory
  ("twins"), one pass where NumPy takes two or three.

:class:`ArrayOps` is the operation set the rules are written in, with the names of
:class:`polyak.optim._exact.ForeachOps` (torch's foreach lists, everywhere else). Writes
through NumPy are invisible to torch's version counters: :meth:`ArrayPlan.run` advances them
as torch's in-place updates would. docs/optim.md ("Speed") has the measurements behind this.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from polyak import _torch_compat as torch_compat
from polyak.flat import runs, span

__all__ = ["CHUNK_BYTES", "ArrayOps", "ArrayPlan", "writable"]

CHUNK_BYTES = 512 << 10
"""Bytes of each array in a chunk. A rule's six to nine arrays of a chunk stay in the L2 and L3
caches through its passes; longer chunks stream from memory better and pay a call's fixed cost
less often (on the mlp48 benchmark 128 KiB to 1 MiB were within a few percent of each other,
512 KiB the best, 16 KiB three times slower for gradient descent)."""

STAGED_ELEMENTS = 4096
"""Tensors of at most this many elements (biases, normalization weights) are stepped together,
copied into one array per list and back (:class:`_Staged`): a NumPy call costs about as much
as the arithmetic of a few thousand elements, and a rule makes ten-odd calls per array."""

TEMPORARIES = 4  # temporaries 0-2 for the rules, 3 for the fused operations' intermediate

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_stride = torch.Tensor.stride

_mul, _add, _sub, _div = np.multiply, np.add, np.subtract, np.divide
_sqrt, _reciprocal = np.sqrt, np.reciprocal


def writable(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements are distinct memory (no broadcast strides), so that NumPy may
    write through a view of it as torch writes in place."""
    size = 1
    for n, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if n == 1:
            continue
        if stride < size:
            return False
        size = stride * n
    return True


def as_array(t: torch.Tensor) -> np.ndarray:
    """``t``'s memory as a NumPy array (a view, strides kept)."""
    return (t.detach() if t.requires_grad else t).numpy()


class ArrayOps:
    """Elementwise operations on NumPy arrays of one dtype, each result rounded once.

    An operand is an array (a chunk of a parameter, gradient or slot) or a scalar of the
    dtype: the rule's scalars, rounded to the dtype by ``Arith``, as :meth:`scalars` gives
    them (a Python float would be computed in the dtype too, more slowly). Results made with
    ``k`` go to temporary ``k`` of the chunk (:attr:`temps`, set by :meth:`chunk`),
    overwriting the last result made with ``k``. The fused operations run on torch tensors
    over the same memory where every array they write or read has one: :attr:`twins` (by
    ``id``, the arrays a plan keeps, set by :meth:`ArrayPlan.run`) and the chunk's gradient.
    Called under ``np.errstate(all="ignore")``: IEEE results, silently, as torch gives them."""

    __slots__ = ("_consts", "_dtype", "_grad_twin", "_one", "grad", "temps", "twins")

    def __init__(self, dtype: torch.dtype) -> None:
        self._dtype = as_array(torch.empty(0, dtype=dtype)).dtype
        self._one = torch.ones((), dtype=dtype)
        self._consts: dict[Any, np.ndarray] = {}
        self.temps: Sequence[np.ndarray] = ()
        self.twins: dict[int, torch.Tensor] = {}
        self.grad: np.ndarray | None = None  # the chunk's gradient, whose twin is made on demand
        self._grad_twin: torch.Tensor | None = None

    def chunk(self, temps: Sequence[np.ndarray], grad: np.ndarray | None) -> None:
        """Start a chunk: its temporaries and its gradient array."""
        self.temps, self.grad, self._grad_twin = temps, grad, None

    def _twin(self, a: Any) -> torch.Tensor | None:
        """A tensor over array ``a`` if ``a`` is one the plan keeps or the chunk's gradient."""
        t = self.twins.get(id(a))
        if t is None and a is self.grad:
            t = self._grad_twin
            if t is None:
                t = self._grad_twin = torch.from_numpy(a)
        return t

    def scalars(self, s: Any) -> Any:
        """``s`` (a rule's scalars: a float or a named tuple) with its floats as 0-d arrays of
        the dtype, so that NumPy computes in the dtype and takes its fast path."""
        if type(s) is float:
            return self._const(s)
        return type(s)(*(self._const(v) if type(v) is float else v for v in s))

    def _const(self, x: float) -> np.ndarray:
        key = (x, math.copysign(1.0, x))  # -0.0 == 0.0 as a key alone
        c = self._consts.get(key)
        if c is None:
            if len(self._consts) > 256:  # a schedule changes the learning rate every step
                self._consts.clear()
            c = self._consts[key] = np.array(x, dtype=self._dtype)
        return c

    # results in temporaries
    def mul(self, k: int, a: np.ndarray, b: Any) -> np.ndarray:
        """``a * b``."""
        return _mul(a, b, self.temps[k])

    def add(self, k: int, a: np.ndarray, b: Any) -> np.ndarray:
        """``a + b``."""
        return _add(a, b, self.temps[k])

    def sub(self, k: int, a: np.ndarray, b: Any) -> np.ndarray:
        """``a - b``."""
        return _sub(a, b, self.temps[k])

    def rsub(self, k: int, c: Any, a: np.ndarray) -> np.ndarray:
        """``c - a``."""
        return _sub(c, a, self.temps[k])

    def copy(self, k: int, a: np.ndarray) -> np.ndarray:
        """A copy of ``a``."""
        out = self.temps[k]
        np.copyto(out, a)
        return out

    def sqrt(self, k: int, a: np.ndarray) -> np.ndarray:
        """``sqrt(a)``, correctly rounded (NaN for negative ``a``)."""
        return _sqrt(a, self.temps[k])

    def clamp(self, k: int, a: np.ndarray, low: Any, high: Any) -> np.ndarray:
        """``max(min(a, high), low)`` (NaN stays NaN; where ``a`` ties with a bound of zero
        the result may be either zero, unlike torch's ``clamp``: keep zero bounds out)."""
        out = np.minimum(a, high, out=self.temps[k])
        return np.maximum(out, low, out=out)

    def pow(self, k: int, a: np.ndarray, exponent: float) -> np.ndarray:
        """``a ** exponent`` by torch's ``pow`` (neither it nor TF's is correctly rounded; this
        keeps the bits of the other backends)."""
        out = self.temps[k]
        torch.pow(torch.from_numpy(a), float(exponent), out=torch.from_numpy(out))
        return out

    # in place
    def mul_(self, x: np.ndarray, y: Any) -> None:
        """``x *= y``."""
        _mul(x, y, x)

    def add_(self, x: np.ndarray, y: Any) -> None:
        """``x += y``."""
        _add(x, y, x)

    def sub_(self, x: np.ndarray, y: Any) -> None:
        """``x -= y``."""
        _sub(x, y, x)

    def div_(self, x: np.ndarray, y: Any) -> None:
        """``x /= y``."""
        _div(x, y, x)

    def sqrt_(self, x: np.ndarray) -> None:
        """``x = sqrt(x)``, correctly rounded."""
        _sqrt(x, x)

    def reciprocal_(self, x: np.ndarray) -> None:
        """``x = 1 / x``."""
        _reciprocal(x, x)

    def copy_(self, x: np.ndarray, y: np.ndarray) -> None:
        """``x = y``."""
        np.copyto(x, y)

    def assign_quotient_(self, x: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        """``x = a / b``, where ``a`` is a temporary (it may be overwritten)."""
        _div(a, b, x)

    def keep_where_abs_above_(self, x: np.ndarray, y: np.ndarray, bound: float) -> None:
        """``x = x if |y| > bound else 0`` (0 where ``y`` is NaN)."""
        np.copyto(x, 0, where=~(np.abs(y) > bound))

    def add_scaled_(self, x: np.ndarray, y: np.ndarray, c: Any) -> None:
        """``x += round(y * c)``: one torch ``addcmul(x, y, 1, value=c)`` where both arrays
        have tensor :attr:`twins` (``polyak.optim._exact``: exact on the CPU), else two
        NumPy passes."""
        tx, ty = self._twin(x), self._twin(y)
        if tx is not None and ty is not None:
            tx.addcmul_(ty, self._one, value=float(c))
            return
        t = _mul(y, c, self.temps[-1])
        _add(x, t, x)

    def scale_add_(self, x: np.ndarray, c: Any, y: np.ndarray) -> None:
        """``x = round(x * c) + y``: one torch ``addcmul(y, x, 1, value=c)`` into ``x`` where
        both have :attr:`twins` (exact on the CPU, as :meth:`add_scaled_`), else two passes."""
        tx, ty = self._twin(x), self._twin(y)
        if tx is not None and ty is not None:
            torch.addcmul(ty, tx, self._one, value=float(c), out=tx)
            return
        _mul(x, c, x)
        _add(x, y, x)

    def add_scaled_quotient_(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, c: Any) -> None:
        """``x += round(round(y * c) / z)``: one torch ``addcdiv(x, y, z, value=c)`` where the
        arrays have tensor :attr:`twins` (exact on the CPU), else the product first (a
        gradient has no twin) and ``addcdiv`` by 1, else three NumPy passes."""
        tx, tz = self._twin(x), self._twin(z)
        if tx is not None and tz is not None:
            ty = self._twin(y)
            if ty is not None:
                tx.addcdiv_(ty, tz, value=float(c))
                return
            t = _mul(y, c, self.temps[-1])
            tx.addcdiv_(self.twins[id(t)], tz)
            return
        t = _mul(y, c, self.temps[-1])
        _div(t, z, t)
        _add(x, t, x)


class _Unit:
    """Tensors ``start:end`` of the lists: a run merged into one flat array per list, or one
    tensor (kept in its shape when it or a slot is not contiguous), cut into chunks."""

    __slots__ = ("bounds", "chunks", "end", "flat", "grad_offsets", "grads", "start")

    def __init__(self, start: int, end: int, flat: bool) -> None:
        self.start, self.end, self.flat = start, end, flat
        self.bounds: list[tuple[int, int]] = []
        # Per chunk: (parameter, slots..., temporaries), arrays of the chunk.
        self.chunks: list[tuple[np.ndarray, tuple[np.ndarray, ...], list[np.ndarray]]] = []
        self.grad_offsets: list[int] = []  # byte offsets of the run's gradients, back to back
        # the data pointers of a run's gradients and a view over them, while they lie back to
        # back (after polyak.flatten_parameters_, in one buffer kept from step to step)
        self.grads: tuple[list[int], np.ndarray] | None = None


class _Staged:
    """Small tensors (:data:`STAGED_ELEMENTS`) updated together: their parameters, slots and
    gradients copied into one array per list, stepped there, copied back."""

    __slots__ = (
        "flat_grads",
        "grad_array",
        "grad_stage",
        "indices",
        "sources",
        "stages",
        "temps",
        "writes",
    )

    def __init__(self, members: list[tuple[int, list[np.ndarray], bool]], dtype: np.dtype) -> None:
        total = sum(arrays[0].size for _, arrays, _ in members)
        self.indices = [i for i, _, _ in members]
        lists = len(members[0][1])
        self.stages = [np.empty(total, dtype) for _ in range(lists)]
        self.sources = [[arrays[j] for _, arrays, _ in members] for j in range(lists)]
        self.writes: list[tuple[np.ndarray, np.ndarray]] = []
        offset = 0
        for _, arrays, _ in members:
            n = arrays[0].size
            self.writes += [
                (a, stage[offset : offset + n]) for a, stage in zip(arrays, self.stages)
            ]
            offset += n
        self.grad_array = np.empty(total, dtype)
        self.grad_stage = torch.from_numpy(self.grad_array)
        # whether each gradient is 1-D already (parameters and gradients share shapes)
        self.flat_grads = [one_dim for _, _, one_dim in members]
        self.temps: list[np.ndarray] = []


class ArrayPlan:
    """The chunks of one (param group, device, dtype) on the CPU: NumPy views of the
    parameters and slots and the temporaries, built once and kept while the same parameters
    (same memory) and slot tensors are updated. Gradients are read anew every step (they are
    often new tensors); a run whose gradients do not lie back to back, as its parameters do,
    has them copied into one array for the step. Small tensors are stepped together
    (:class:`_Staged`)."""

    __slots__ = ("_marks", "_params", "_slots", "_strides", "_temps", "staged", "twins", "units")

    def __init__(self, params: list[torch.Tensor], slots: list[list[torch.Tensor]]) -> None:
        self._params = params
        self._strides = list(map(_stride, params))
        self._slots = slots
        dtype = as_array(params[0].new_empty(0)).dtype
        limit = max(1, CHUNK_BYTES // dtype.itemsize)
        largest = 0
        self.units: list[_Unit] = []
        small: list[tuple[int, list[np.ndarray], bool]] = []
        for start, end in runs(params, *slots):
            ts = [span(params, start, end), *(span(ss, start, end) for ss in slots)]
            flat = all(map(_is_contiguous, ts))
            arrays = [as_array(t).reshape(-1) if flat else as_array(t) for t in ts]
            n = arrays[0].size
            if flat and end - start == 1 and 0 < n <= STAGED_ELEMENTS:
                small.append((start, arrays, params[start].dim() == 1))
                continue
            unit = _Unit(start, end, flat)
            unit.bounds = [(s, min(n, s + limit)) for s in range(0, n, limit)] if flat else [(0, n)]
            if end - start > 1:
                offsets = [0]
                for p in params[start : end - 1]:
                    offsets.append(offsets[-1] + p.numel() * p.element_size())
                unit.grad_offsets = offsets
            largest = max(largest, max(e - s for s, e in unit.bounds) if n else 0)
            unit.chunks = [
                (
                    arrays[0][s:e] if flat else arrays[0],
                    tuple(a[s:e] if flat else a for a in arrays[1:]),
                    [],
                )
                for s, e in unit.bounds
            ]
            self.units.append(unit)
        self.staged: list[_Staged] = []
        while small:
            count, total = 0, 0
            while count < len(small) and (not count or total + small[count][1][0].size <= limit):
                total += small[count][1][0].size
                count += 1
            self.staged.append(_Staged(small[:count], dtype))
            small = small[count:]
            largest = max(largest, total)
        self._temps = [np.empty(max(largest, 1), dtype) for _ in range(TEMPORARIES)]
        for unit in self.units:
            for (s, e), (p, _, temps) in zip(unit.bounds, unit.chunks):
                temps.extend(t[: e - s].reshape(p.shape) for t in self._temps)
        for st in self.staged:
            st.temps = [t[: st.stages[0].size] for t in self._temps]
        # Tensors over the arrays the plan keeps, for the fused exact torch operations.
        self.twins: dict[int, torch.Tensor] = {}
        for unit in self.units:
            for p, unit_slots, temps in unit.chunks:
                for a in (p, *unit_slots, *temps):
                    self.twins[id(a)] = torch.from_numpy(a)
        for st in self.staged:
            for a in (*st.stages, *st.temps):
                self.twins[id(a)] = torch.from_numpy(a)
            self.twins[id(st.grad_array)] = st.grad_stage
        # Writes through NumPy do not count as torch's in-place writes: an empty view of each
        # parameter, zeroed after every step, advances its version counter as they would (so
        # autograd still refuses a backward pass through values the step overwrote).
        self._marks = [p.detach().as_strided((0,), (1,)) for p in params]

    def matches(self, params: list[torch.Tensor], slots: list[list[torch.Tensor]]) -> bool:
        """Whether this plan describes ``params`` and ``slots``: the same tensors, the
        parameters in the same layout (``p.data = p.data.t()`` keeps the memory; the caller
        drops the plan when a parameter's memory changes)."""
        return (
            len(params) == len(self._params)
            and all(map(operator.is_, params, self._params))
            and list(map(_stride, params)) == self._strides
            and len(slots) == len(self._slots)
            and all(all(map(operator.is_, new, old)) for new, old in zip(slots, self._slots))
        )

    def run(
        self, update: Callable[..., None], s: Any, ops: ArrayOps, grads: list[torch.Tensor]
    ) -> None:
        """``update(s, ops, param, grad, *slots)`` on every chunk, with ``grads`` (one per
        parameter, as the plan's)."""
        ops.twins = self.twins
        try:
            self._run(update, s, ops, grads)
        finally:
            ops.twins = {}
            ops.chunk((), None)
        torch_compat.foreach_zero_(self._marks)

    def _run(
        self, update: Callable[..., None], s: Any, ops: ArrayOps, grads: list[torch.Tensor]
    ) -> None:
        with np.errstate(all="ignore"):
            for unit in self.units:
                g = self._grad_array(unit, grads)
                if unit.flat:
                    for (start, end), (p, slots, temps) in zip(unit.bounds, unit.chunks):
                        ops.chunk(temps, grad := g[start:end])
                        update(s, ops, p, grad, *slots)
                else:
                    ((p, slots, temps),) = unit.chunks
                    ops.chunk(temps, g)
                    update(s, ops, p, g, *slots)
            for st in self.staged:
                for stage, sources in zip(st.stages, st.sources):
                    np.concatenate(sources, out=stage)
                gs = [grads[i] for i in st.indices]
                torch.cat(
                    [g if flat else g.reshape(-1) for g, flat in zip(gs, st.flat_grads)],
                    out=st.grad_stage,
                )
                ops.chunk(st.temps, st.grad_array)
                update(s, ops, st.stages[0], st.grad_array, *st.stages[1:])
                for dst, src in st.writes:
                    np.copyto(dst, src)

    def _grad_array(self, unit: _Unit, grads: list[torch.Tensor]) -> np.ndarray:
        """The gradients of ``unit`` as one array laid out as the unit's parameter array."""
        if unit.end - unit.start == 1:
            g = grads[unit.start]
            return as_array(g).reshape(-1) if unit.flat else as_array(g)
        gs = grads[unit.start : unit.end]
        ptrs = list(map(_data_ptr, gs))
        cached = unit.grads
        if cached is not None and cached[0] == ptrs:
            return cached[1]  # a view of the same memory (which it keeps from being freed)
        unit.grads = None
        base = ptrs[0]
        if all(map(_is_contiguous, gs)) and [p - base for p in ptrs] == unit.grad_offsets:
            storage = gs[0].untyped_storage()
            if (
                base + unit.grad_offsets[-1] + gs[-1].nbytes
                <= storage.data_ptr() + storage.nbytes()
            ):
                array = as_array(span(gs, 0, len(gs)))
                unit.grads = (ptrs, array)
                return array
        return np.concatenate([as_array(g).reshape(-1) for g in gs])
