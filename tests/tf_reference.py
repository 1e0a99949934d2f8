"""TF's float32 moving-average op sequences, re-implemented op by op, with the same bits on
every machine.

Subtraction, multiplication and division are IEEE operations: numpy's float32 kernels round
each exactly once whatever SIMD code they dispatch to. ``np.power`` is not one: its float32
loop differs by an ulp between AVX2 and AVX-512 (``0.9 ** 4`` gives 0.6560999 on one and
0.6561 on the other), and ``1 - d ** t`` magnifies that ulp. So the power is computed exactly
in rational arithmetic and rounded once to float32 (the correctly rounded power polyak
promises; see docs/averaging.md).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def round_f32(q: Fraction) -> np.float32:
    """The float32 nearest to ``q`` (ties to even), exactly."""
    guess = np.float32(float(q))  # within an ulp: float() rounds once, to float64
    inf = np.float32(np.inf)
    return min(
        (np.nextafter(guess, -inf), guess, np.nextafter(guess, inf)),
        key=lambda c: (abs(Fraction(float(c)) - q), int(c.view(np.uint32)) & 1),
    )


def pow_f32(base: np.float32, exponent: int) -> np.float32:
    """``base ** exponent`` correctly rounded to float32."""
    return round_f32(Fraction(float(base)) ** exponent)


def tf_zero_debias_f32(
    decay: float, values: list[np.ndarray], n: int | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """TF's ``assign_moving_average(zero_debias=True)``, op by op in numpy float32.

    Returns the debiased shadow after each value and the final ``biased`` accumulator;
    ``n`` is ``num_updates`` (TF's ``decay = min(decay, (1 + n) / (10 + n))``).
    """
    f = np.float32
    d = f(decay)
    if n is not None:
        nf = f(n)
        d = np.minimum(d, (f(1.0) + nf) / (f(10.0) + nf))
    one_minus = f(f(1.0) - d)
    biased = np.zeros_like(values[0])
    shadows = []
    for local_step, value in enumerate(values, start=1):
        biased = biased - (biased - value) * one_minus
        factor = f(1.0) - pow_f32(f(f(1.0) - one_minus), local_step)
        shadows.append((biased / factor).astype(np.float32))
    return shadows, biased


def tf_plain_f32(decay: float, values: list[np.ndarray]) -> list[np.ndarray]:
    """TF's ``assign_moving_average`` without debiasing: ``v -= (v - value) * (1 - decay)``."""
    f = np.float32
    one_minus = f(f(1.0) - f(decay))
    shadow = np.zeros_like(values[0])
    out = []
    for value in values:
        shadow = shadow - (shadow - value) * one_minus
        out.append(shadow)
    return out
