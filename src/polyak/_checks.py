"""Argument checks shared by the library's constructors and ``load_state_dict`` methods.

Each check returns the value in its canonical type or raises a ``TypeError`` (wrong kind of
value) or ``ValueError`` (right kind, outside the allowed range) whose message starts with
the caller and names the argument, the value given and what is allowed. They run on the host,
at construction or load time, never in a per-step path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "check_bool",
    "check_device",
    "check_dtype",
    "check_int",
    "check_mapping",
    "check_real",
]


def check_int(value: Any, name: str, who: str, *, low: int | None = None) -> int:
    """``value`` as an ``int`` (Python or NumPy integers; not ``bool``), ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        bound = "" if low is None else f" >= {low}"
        raise TypeError(f"{who}: {name} must be an int{bound}, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{who}: {name} must be an int >= {low}, got {value}")
    return value


def check_real(
    value: Any,
    name: str,
    who: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    hint: str | None = None,
    allow_infinite: bool = False,
) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Not accepted: ``bool``, strings, tensors (a device value cannot be checked without a
    sync), NaN and, unless ``allow_infinite``, +-inf; ``hint`` says what to write instead of
    a non-finite value (e.g. "omit the transform for no clipping").
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {value!r}")
    value = float(value)
    tail = f"; {hint}" if hint else ""
    if math.isnan(value):
        raise ValueError(f"{who}: {name} must be a number, got nan{tail}")
    if math.isinf(value) and not allow_infinite:
        raise ValueError(f"{who}: {name} must be finite, got {value}{tail}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        left = "(" if low_open or low is None else "["
        right = ")" if high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ValueError(f"{who}: {name} must be in {interval}, got {value!r}")
    return value


def check_bool(value: Any, name: str, who: str) -> bool:
    """``value``, which must be a ``bool`` (a string such as ``"false"`` would be true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be True or False, got {value!r}")
    return value


def check_dtype(value: Any, name: str, who: str, *, floating: bool = True) -> torch.dtype:
    """A ``torch.dtype`` from a dtype or its name (``"float32"``, ``"torch.bfloat16"``);
    with ``floating``, only floating dtypes."""
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"{who}: {name} must be a torch.dtype or its name (e.g. torch.float32 or "
            f"'float32'), got {value!r}"
        )
    if floating and not dtype.is_floating_point:
        raise TypeError(
            f"{who}: {name} must be a floating dtype (float16, bfloat16, float32, float64), "
            f"got {dtype}"
        )
    return dtype


def check_device(value: Any, name: str, who: str) -> torch.device:
    """A ``torch.device`` that this process can allocate on (``"cuda"`` without CUDA is
    refused here rather than at the first allocation)."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(
            f"{who}: {name} must be a torch.device or a string such as 'cpu' or 'cuda:0', "
            f"got {value!r}"
        )
    try:
        device = torch.device(value)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{who}: {name}={str(value)!r} is not a device this process can use ({first_line})"
        ) from None
    return device


def check_mapping(value: Any, name: str, who: str) -> Mapping:
    """``value``, which must be a mapping (a state dict or a part of one)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{who}: {name} must be a dict, got {type(value).__name__}")
    return value
