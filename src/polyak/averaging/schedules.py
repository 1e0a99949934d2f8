"""Decay schedules: ``callable(step) -> float`` in [0, 1].

``step`` counts the calls to ``apply``/``update`` since averaging began: 0 for the first
call after the ``update_after`` copies (with ``update_every=k`` the schedule is read on
every ``k``-th call, at ``step = k-1, 2k-1, ...``, as ema-pytorch does). Pass any of these,
or your own callable, as ``ExponentialMovingAverage(decay=...)``.

- ``constant(d)``: ``d`` (TF's default).
- ``num_updates(d)``: ``min(d, (1 + t) / (10 + t))`` (TF's ``num_updates`` rule).
- ``warmup(d, inv_gamma, power, min_decay)``: ``clip(1 - (1 + t/inv_gamma)^-power, min_decay, d)``
  (timm, ema-pytorch).
- ``power_function(gamma)``: ``(1 - 1/(t+1))^(gamma+1)`` (EDM2, Karras et al. 2024).
- ``karras(sigma_rel)``: ``power_function(gamma(sigma_rel))`` (EDM2).
- ``cosine(base, final, T)``: ``final - (final - base) * (cos(pi t/T) + 1)/2`` (BYOL, DINO).

EDM2 describes a power-function average by its exponent ``gamma`` or by its relative width
``sigma_rel``; :func:`sigma_rel_to_gamma` and :func:`gamma_to_sigma_rel` convert.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from polyak._checks import check_int, check_real

__all__ = [
    "Schedule",
    "constant",
    "cosine",
    "gamma_to_sigma_rel",
    "karras",
    "num_updates",
    "power_function",
    "sigma_rel_to_gamma",
    "warmup",
]

Schedule = Callable[[int], float]


def _check_unit(who: str, name: str, value: float) -> float:
    return check_real(value, name, who, low=0.0, high=1.0)


class constant:
    """``decay(t) = d``."""

    def __init__(self, decay: float) -> None:
        self.decay = _check_unit("constant", "decay", decay)

    def __call__(self, step: int) -> float:
        return self.decay

    def __repr__(self) -> str:
        return f"constant({self.decay})"


class num_updates:
    """``decay(t) = min(d, (1 + t) / (10 + t))``: TF's ``num_updates`` rule as a schedule.

    Equivalent to ``tf.train.ExponentialMovingAverage(d, num_updates=t)`` when ``t`` counts
    the averaging steps. To read an external counter instead (a ``GlobalStep``), pass it as
    ``ExponentialMovingAverage(num_updates=...)``, which also reproduces TF's float32 rounding.
    """

    def __init__(self, decay: float) -> None:
        self.decay = _check_unit("num_updates", "decay", decay)

    def __call__(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    def __repr__(self) -> str:
        return f"num_updates({self.decay})"


class warmup:
    """``decay(t) = clip(1 - (1 + t / inv_gamma) ** -power, min_decay, decay)``.

    The warm-up of timm's ``ModelEmaV3`` and ema-pytorch: 0 at the first step (a copy), then
    rising towards ``decay``. ``power=2/3`` suits long runs, ``3/4`` shorter ones.
    """

    def __init__(
        self, decay: float, inv_gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0
    ) -> None:
        self.decay = _check_unit("warmup", "decay", decay)
        self.min_decay = _check_unit("warmup", "min_decay", min_decay)
        self.inv_gamma = check_real(inv_gamma, "inv_gamma", "warmup", low=0.0, low_open=True)
        self.power = check_real(power, "power", "warmup", low=0.0, low_open=True)
        if self.min_decay > self.decay:
            raise ValueError(f"warmup: min_decay {min_decay} is above decay {decay}")

    def __call__(self, step: int) -> float:
        if step <= 0:
            return 0.0  # the first averaged step copies, whatever min_decay (as timm)
        value = 1.0 - (1.0 + step / self.inv_gamma) ** -self.power
        return min(max(value, self.min_decay), self.decay)

    def __repr__(self) -> str:
        return (
            f"warmup({self.decay}, inv_gamma={self.inv_gamma}, power={self.power}, "
            f"min_decay={self.min_decay})"
        )


class power_function:
    """``decay(t) = (1 - 1 / (t + 1)) ** (gamma + 1)``: EDM2's power-function EMA.

    The average then weighs the step-``tau`` weights proportionally to ``tau ** gamma``, so
    its length grows with training. The first step copies (``decay(0) = 0``).
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = check_real(gamma, "gamma", type(self).__name__, low=0.0, low_open=True)

    def __call__(self, step: int) -> float:
        return (1.0 - 1.0 / (step + 1)) ** (self.gamma + 1.0)

    def __repr__(self) -> str:
        return f"power_function({self.gamma})"


class karras(power_function):
    """EDM2's power-function EMA given its relative width ``sigma_rel`` (e.g. 0.05 to 0.10):
    ``power_function(sigma_rel_to_gamma(sigma_rel))``."""

    def __init__(self, sigma_rel: float) -> None:
        self.sigma_rel = check_real(
            sigma_rel, "sigma_rel", "karras", low=0.0, high=SIGMA_REL_MAX, low_open=True
        )
        super().__init__(sigma_rel_to_gamma(self.sigma_rel))

    def __repr__(self) -> str:
        return f"karras({self.sigma_rel})"


# sigma_rel of gamma -> 0; every gamma > 0 has a smaller one.
SIGMA_REL_MAX = 12**-0.5
# Above this gamma (below sigma_rel 1e-100), the conversions use the asymptote
# sigma_rel = 1 / (gamma + 3), exact to float64 rounding there, instead of sums of cubes
# that overflow.
_HUGE_GAMMA = 1e100


def gamma_to_sigma_rel(gamma: float) -> float:
    """``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (EDM2, eq. 123).

    The standard deviation of the power-function profile ``p(tau) ~ tau^gamma`` on ``[0, t]``
    relative to ``t``: the width of the average as a fraction of the training so far.
    """
    gamma = check_real(gamma, "gamma", "gamma_to_sigma_rel", low=0.0, low_open=True)
    if gamma > _HUGE_GAMMA:  # the product overflows; sigma_rel = 1 / (gamma + 3) (1 + O(gamma^-2))
        return 1.0 / (gamma + 3.0)
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The ``gamma`` whose power-function profile has relative width ``sigma_rel``.

    The largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0`` (EDM2, eq. 126
    and Algorithm 2), the inverse of :func:`gamma_to_sigma_rel`; ``sigma_rel`` must be in
    ``(0, 12**-0.5)`` (0.2887) for ``gamma > 0``. EDM2's 0.05 and 0.10 give 16.97 and 6.94.
    """
    sigma_rel = check_real(sigma_rel, "sigma_rel", "sigma_rel_to_gamma")
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(
            f"sigma_rel_to_gamma: sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) for gamma > 0, "
            f"got {sigma_rel}"
        )
    if sigma_rel < 1.0 / _HUGE_GAMMA:  # the cubic's coefficients overflow; see gamma_to_sigma_rel
        gamma = 1.0 / sigma_rel - 3.0
        if math.isinf(gamma):
            raise ValueError(
                f"sigma_rel_to_gamma: sigma_rel {sigma_rel!r} is so small that gamma "
                "(about 1 / sigma_rel) is not a finite float"
            )
        return gamma
    t = sigma_rel**-2

    def poly(g: float) -> float:
        return ((g + 7.0) * g + (16.0 - t)) * g + (12.0 - t)

    # The cubic is negative at 0 (t > 12) and increasing past its largest root: bisect.
    lo, hi = 0.0, 1.0
    while poly(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if poly(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class cosine:
    """``decay(t) = final - (final - base) * (cos(pi * min(t, T) / T) + 1) / 2``.

    BYOL's target momentum (base 0.996 rising to 1.0 over training), also DINO's teacher.
    """

    def __init__(self, base: float, final: float, total_steps: int) -> None:
        self.base = _check_unit("cosine", "base", base)
        self.final = _check_unit("cosine", "final", final)
        self.total_steps = check_int(total_steps, "total_steps", "cosine", low=1)

    def __call__(self, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        return self.final - (self.final - self.base) * (math.cos(math.pi * progress) + 1) / 2

    def __repr__(self) -> str:
        return f"cosine({self.base}, {self.final}, total_steps={self.total_steps})"
