"""TF's scalar arithmetic, done on the host: hyper-parameters and the scalars derived from them.

A Python float given to a TF1 optimizer becomes a float32 tensor (``ops.convert_to_tensor``),
which ``math_ops.cast`` then converts to the variable's dtype; scalars a kernel derives from
them (Adam's ``lr * sqrt(1 - beta2_power) / (1 - beta1_power)``, ``1 - beta1``, ``2 * l2``) are
computed in that dtype, each operation rounded. :class:`Arith` repeats those roundings with
Python floats, so the scalars handed to torch's kernels carry TF's bits without any device
work or host sync. Every operation is exact in double precision before the final rounding,
and double rounding through float64 is harmless for float32 and narrower formats (53 >=
2 * 24 + 2), so each result is the correctly rounded one, as IEEE hardware gives.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch

__all__ = ["Arith", "to_float32"]

_F32 = struct.Struct("f")
_F16 = struct.Struct("e")


def _round_with(fmt: struct.Struct) -> Callable[[float], float]:
    def rounded(x: float) -> float:
        try:
            return fmt.unpack(fmt.pack(x))[0]
        except OverflowError:  # rounds past the format's largest finite value
            return math.copysign(math.inf, x)

    return rounded


to_float32 = _round_with(_F32)
"""``x`` rounded to the nearest float32 (ties to even), as a Python float."""


def _via_torch(dtype: torch.dtype) -> Callable[[float], float]:
    # bfloat16 and any other format struct cannot pack: a CPU tensor, so never a device sync.
    return lambda x: torch.tensor(x, dtype=dtype).item()


_ROUNDERS: dict[torch.dtype, Callable[[float], float]] = {
    torch.float64: float,
    torch.float32: to_float32,
    torch.float16: _round_with(_F16),
}


class Arith:
    """Scalar arithmetic as a kernel over ``dtype`` does it: every result rounded to ``dtype``."""

    __slots__ = ("round",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.round = _ROUNDERS.get(dtype) or _via_torch(dtype)

    def hyper(self, x: float) -> float:
        """A hyper-parameter: Python float -> float32 tensor -> the variable's dtype."""
        return self.round(to_float32(float(x)))

    def add(self, a: float, b: float) -> float:
        return self.round(a + b)

    def sub(self, a: float, b: float) -> float:
        return self.round(a - b)

    def mul(self, a: float, b: float) -> float:
        return self.round(a * b)

    def div(self, a: float, b: float) -> float:
        if b == 0.0:  # IEEE, where Python raises
            return (
                math.nan
                if a == 0.0 or math.isnan(a)
                else math.copysign(math.inf, a) * (math.copysign(1.0, b))
            )
        return self.round(a / b)

    def sqrt(self, a: float) -> float:
        return self.round(math.sqrt(a)) if a >= 0.0 else math.nan

    def max(self, a: float, b: float) -> float:
        return a if a >= b else b
