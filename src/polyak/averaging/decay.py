"""The decay of each averaging step, as TensorFlow computes it (timm's ``get_decay``).

One call of ``ExponentialMovingAverage.apply``/``update`` does one of three things, decided
here from the call count alone, before any tensor is touched:

- copy the variables (the first ``update_after`` calls);
- nothing (the calls between two of every ``update_every``-th);
- average with the lerp weight ``1 - decay``, where::

      decay = d                                       # a float, or schedule(t)
      decay = min(decay, (1 + n) / (10 + n))          # num_updates=n given
      decay = decay ** update_every                   # compound_decay (the default)

All of it in float32, rounded op by op as TF's graph does (``tf.train.ExponentialMovingAverage``
casts the decay to a float32 tensor first, then builds ``(1 + n) / (10 + n)`` and ``1 - decay``
as float32 ops). The zero-debias factor of TF's ``assign_moving_average`` is here too
(:func:`debias_factor`); applying the weight to tensors is :mod:`polyak.averaging.plan`'s and
:mod:`polyak.averaging.values`' business.
"""

from __future__ import annotations

import numbers
import struct
from collections.abc import Callable

import torch

from polyak._checks import check_bool, check_int
from polyak.step import GlobalStep

__all__ = [
    "F32_EXACT_INT",
    "Decay",
    "DecayRule",
    "NumUpdates",
    "Weight",
    "check_num_updates",
    "compounded",
    "debias_factor",
    "f32",
    "num_updates_ratio",
    "num_updates_saturation",
    "one_minus",
]

Decay = float | Callable[[int], float]
NumUpdates = int | torch.Tensor | GlobalStep | None
# The lerp weight 1 - decay of a call: a float, or a 0-dim tensor (num_updates given as a
# tensor, read on the device); None for a call that copies or does nothing.
Weight = float | torch.Tensor

# Below this, n, 1 + n and 10 + n are exact in float32.
F32_EXACT_INT = 2**24 - 16


def f32(x: float) -> float:
    """Round a Python float to the nearest float32, to compute decays as TF's float32 ops do."""
    return struct.unpack("f", struct.pack("f", x))[0]


def num_updates_ratio(n: int) -> float:
    """TF's ``(1.0 + n) / (10.0 + n)`` with ``n`` cast to float32, in float32."""
    if 0 <= n < F32_EXACT_INT:
        # Exact operands: one float64 division rounded to float32 is float32's division.
        return f32((1.0 + n) / (10.0 + n))
    n32 = f32(float(n))
    return f32(f32(1.0 + n32) / f32(10.0 + n32))


def num_updates_saturation(decay32: float) -> int | None:
    """A count ``n`` from which on ``num_updates_ratio(n) >= decay32`` (the ratio is
    non-decreasing below ``F32_EXACT_INT``), or ``None`` if there is none below that bound.
    It is the first such count at or after an estimate a little below where the exact ratio
    crosses ``decay32``; float32 rounding may reach ``decay32`` a few counts earlier, where
    the full computation gives the same weight anyway."""
    if decay32 >= 1.0:
        return None
    n = max(0, int((10.0 * decay32 - 1.0) / (1.0 - decay32)) - 2)
    while n < F32_EXACT_INT and num_updates_ratio(n) < decay32:
        n += 1
    return n if n < F32_EXACT_INT else None


def one_minus(decay: float | torch.Tensor) -> Weight:
    """The lerp weight ``1 - decay``, rounded to float32 as TF's ``1.0 - decay`` op."""
    return 1.0 - decay if isinstance(decay, torch.Tensor) else f32(1.0 - decay)


def compounded(decay: float | torch.Tensor, every: int) -> float | torch.Tensor:
    """``decay ** every``: one step of ``every`` calls averages as ``every`` steps would."""
    if every == 1:
        return decay
    if isinstance(decay, torch.Tensor):
        return decay**every
    return f32(decay**every)


def debias_factor(weight: Weight, local_step: int) -> float | torch.Tensor:
    """TF's zero-debias factor ``1 - (1 - (1 - decay)) ** local_step``, each op rounded as
    TF's float32 ops (``weight`` is ``1 - decay``): ``biased / factor`` is the unbiased
    average of a value whose shadow started at zero. The power is taken in float64 and
    rounded once on both paths (torch's float32 ``pow`` of a tensor takes ``x * x * x`` for
    a cube and rounds twice)."""
    if isinstance(weight, torch.Tensor):
        power = ((1.0 - weight).double() ** local_step).to(weight.dtype)
        return 1.0 - power
    return f32(1.0 - f32(f32(1.0 - weight) ** local_step))


def check_num_updates(n: NumUpdates, who: str) -> NumUpdates:
    """``num_updates`` as given, after checking it is a counter that cannot make the decay
    leave [0, 1] (TF's rule gives ``(1 + n) / (10 + n) < 0`` for ``-10 < n < -1``)."""
    if n is None or isinstance(n, GlobalStep):
        return n
    if isinstance(n, torch.Tensor):
        if n.dim() != 0 or n.dtype == torch.bool or n.is_complex():
            raise TypeError(
                f"{who}: num_updates must be a 0-dim real tensor, got shape {tuple(n.shape)} "
                f"{n.dtype}"
            )
        # Read once here (a sync if it lives on an accelerator); never per step.
        if not bool(n.detach() >= 0):
            raise ValueError(f"{who}: num_updates must be >= 0, got {n.item()}")
        return n
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(
            f"{who}: num_updates must be None, an int, a 0-dim tensor or a polyak.GlobalStep, "
            f"got {n!r}"
        )
    return check_int(n, "num_updates", who, low=0)


class DecayRule:
    """What each call of an average does: copy, nothing, or a lerp with weight ``1 - decay``.

    Args are those of :class:`polyak.ExponentialMovingAverage` (checked here): ``decay`` (a
    float in [0, 1] or a schedule ``callable(t) -> float``), ``num_updates``,
    ``update_every``, ``update_after``, ``compound_decay``.

    ``t``, the averaging step, counts the calls since the ``update_after`` copies.
    """

    __slots__ = (
        "compound_decay",
        "fixed_weight",
        "num_updates",
        "saturated_from",
        "saturated_weight",
        "schedule",
        "update_after",
        "update_every",
        "value",
    )

    def __init__(
        self,
        decay: Decay,
        num_updates: NumUpdates,
        *,
        update_every: int,
        update_after: int,
        compound_decay: bool,
        who: str,
    ) -> None:
        if callable(decay):
            self.schedule: Callable[[int], float] | None = decay
            self.value = float("nan")
        else:
            if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
                raise TypeError(
                    f"{who}: decay must be a float in [0, 1] or a schedule callable(step) -> "
                    f"float, got {type(decay).__name__}"
                )
            if not 0.0 <= decay <= 1.0:
                raise ValueError(
                    f"{who}: decay must be in [0, 1], got {decay}; for a target network with "
                    "update rate tau use decay = 1 - tau"
                )
            self.schedule = None
            self.value = float(decay)
        self.num_updates = check_num_updates(num_updates, who)
        self.update_every = check_int(update_every, "update_every", who, low=1)
        self.update_after = check_int(update_after, "update_after", who, low=0)
        self.compound_decay = check_bool(compound_decay, "compound_decay", who)
        # The weight is computed once when it cannot change (a float decay, num_updates None
        # or an int); TF's num_updates rule stops lowering a fixed decay once the counter
        # passes a threshold, so from there on a GlobalStep needs no float32 arithmetic either.
        self.fixed_weight: Weight | None = None
        self.saturated_from: int | None = None
        self.saturated_weight: Weight | None = None
        fixed_counter = not isinstance(self.num_updates, (torch.Tensor, GlobalStep))
        if self.schedule is None and fixed_counter:
            self.fixed_weight = one_minus(self.decay_at(0))
        elif self.schedule is None and isinstance(self.num_updates, GlobalStep):
            self.saturated_from = num_updates_saturation(f32(self.value))
            self.saturated_weight = one_minus(self._compounded(f32(self.value)))

    def weight(self, calls: int) -> Weight | None:
        """The lerp weight of the call after ``calls`` calls, or ``None`` when that call
        copies (``calls < update_after``) or does nothing (between ``update_every`` steps).
        A schedule that returns a bad decay raises here, before anything changes."""
        t = calls - self.update_after
        if t < 0 or not (self.update_every == 1 or (t + 1) % self.update_every == 0):
            return None
        if self.fixed_weight is not None:
            return self.fixed_weight
        if self.saturated_from is not None and (
            self.saturated_from <= int(self.num_updates) < F32_EXACT_INT  # type: ignore[arg-type]
        ):
            return self.saturated_weight
        return one_minus(self.decay_at(t))

    def copies(self, calls: int) -> bool:
        """Whether the call after ``calls`` calls copies the variables."""
        return calls < self.update_after

    def decay_at(self, t: int) -> float | torch.Tensor:
        """The decay of averaging step ``t``: schedule, TF's num_updates rule, compounding."""
        if self.schedule is not None:
            given = self.schedule(t)
            if isinstance(given, bool) or not isinstance(given, (numbers.Real, torch.Tensor)):
                raise TypeError(
                    f"decay schedule {self.schedule!r} gave {given!r} at step {t}; a schedule "
                    "returns a float in [0, 1]"
                )
            decay = float(given)
            if not 0.0 <= decay <= 1.0:
                raise ValueError(
                    f"decay schedule {self.schedule!r} gave {decay} at step {t}; a decay must "
                    "be in [0, 1]"
                )
        else:
            decay = self.value
        # TF converts the decay to a float32 tensor before anything else.
        d: float | torch.Tensor = f32(decay)
        n = self.num_updates
        if isinstance(n, torch.Tensor):
            nf = n.detach().to(torch.float32)
            d = torch.clamp((1.0 + nf) / (10.0 + nf), max=d)
        elif n is not None:
            d = min(d, num_updates_ratio(int(n)))  # type: ignore[type-var]
        return self._compounded(d)

    def _compounded(self, decay: float | torch.Tensor) -> float | torch.Tensor:
        return compounded(decay, self.update_every) if self.compound_decay else decay

    def __repr__(self) -> str:
        decay = self.schedule if self.schedule is not None else self.value
        return f"DecayRule(decay={decay!r}, num_updates={self.num_updates!r})"
