"""Decay schedules: formulas at a few steps, references from timm/ema-pytorch and EDM2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from polyak import ExponentialMovingAverage, schedules

pytestmark = pytest.mark.numerics  # expected bits: run again with AVX-512 off


def ema_pytorch_decay(step: int, beta: float, inv_gamma: float, power: float, min_value: float):
    """ema-pytorch's EMA.get_current_decay() with update_after_step=0, `step` already counted."""
    epoch = max(step - 1, 0)
    if epoch <= 0:
        return 0.0
    value = 1 - (1 + epoch / inv_gamma) ** -power
    return min(max(value, min_value), beta)


def timm_v3_decay(step: int, decay: float, gamma: float, power: float, min_decay: float):
    """timm ModelEmaV3.get_decay(step) with update_after_step=0."""
    step = max(0, step - 1)
    if step <= 0:
        return 0.0
    value = 1 - (1 + step / gamma) ** -power
    return max(min(value, decay), min_decay)


class TestFormulas:
    def test_constant(self):
        s = schedules.constant(0.9)
        assert [s(t) for t in (0, 1, 10**6)] == [0.9, 0.9, 0.9]

    def test_num_updates(self):
        s = schedules.num_updates(0.999)
        assert s(0) == pytest.approx(0.1, abs=1e-15)
        assert s(5) == pytest.approx(6 / 15, abs=1e-15)
        assert s(10) == pytest.approx(11 / 20, abs=1e-15)
        assert s(10**6) == 0.999

    @pytest.mark.parametrize("inv_gamma,power", [(1.0, 2 / 3), (1.0, 3 / 4), (10.0, 0.5)])
    def test_warmup_equals_timm_and_ema_pytorch(self, inv_gamma, power):
        s = schedules.warmup(0.9999, inv_gamma=inv_gamma, power=power)
        assert s(0) == 0.0
        for t in (1, 2, 3, 10, 100, 10**4, 10**7):
            expected = min(1 - (1 + t / inv_gamma) ** -power, 0.9999)
            assert s(t) == pytest.approx(expected, abs=1e-15)
            # both libraries evaluate their formula at their own step + 1
            assert s(t) == pytest.approx(
                ema_pytorch_decay(t + 1, 0.9999, inv_gamma, power, 0.0), abs=1e-15
            )
            assert s(t) == pytest.approx(
                timm_v3_decay(t + 1, 0.9999, inv_gamma, power, 0.0), abs=1e-15
            )
        assert s(1) == pytest.approx(1 - (1 + 1 / inv_gamma) ** -power)

    def test_warmup_min_decay(self):
        s = schedules.warmup(0.999, min_decay=0.5)
        assert s(1) == pytest.approx(max(1 - 2 ** (-2 / 3), 0.5))
        assert s(1) == 0.5  # 1 - 2**(-2/3) = 0.37 is below min_decay
        assert s(10**9) == 0.999

    def test_warmup_first_step_copies_even_with_min_decay(self):
        s = schedules.warmup(0.999, min_decay=0.5)
        assert s(0) == timm_v3_decay(1, 0.999, 1.0, 2 / 3, 0.5) == 0.0

    @pytest.mark.parametrize("gamma", [1.0, 6.94, 16.97])
    def test_power_function(self, gamma):
        s = schedules.power_function(gamma)
        assert s(0) == 0.0
        assert s(1) == pytest.approx(0.5 ** (gamma + 1), rel=1e-14)
        assert s(9) == pytest.approx(0.9 ** (gamma + 1), rel=1e-14)
        assert s(999) == pytest.approx(0.999 ** (gamma + 1), rel=1e-14)

    @pytest.mark.parametrize("sigma_rel,paper_gamma", [(0.05, 16.97), (0.10, 6.94)])
    def test_karras_gamma_solves_edm2_cubic(self, sigma_rel, paper_gamma):
        s = schedules.karras(sigma_rel)
        t = sigma_rel**-2
        roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
        largest = max(r.real for r in roots if abs(r.imag) < 1e-12)
        assert s.gamma == pytest.approx(largest, rel=1e-10)
        assert s.gamma == pytest.approx(paper_gamma, abs=0.005)  # EDM2, section 3.1
        g = s.gamma
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(sigma_rel, rel=1e-10)
        for step in (0, 1, 7, 1000):
            assert s(step) == pytest.approx((1 - 1 / (step + 1)) ** (g + 1), rel=1e-12)

    def test_cosine(self):
        s = schedules.cosine(0.996, 1.0, total_steps=100)
        assert s(0) == pytest.approx(0.996, abs=1e-15)
        assert s(50) == pytest.approx(0.998, abs=1e-15)
        assert s(100) == pytest.approx(1.0, abs=1e-15)
        assert s(250) == pytest.approx(1.0, abs=1e-15)
        for k in (1, 25, 77):  # BYOL: 1 - (1 - base) * (cos(pi k / K) + 1) / 2
            assert s(k) == pytest.approx(1 - 0.004 * (math.cos(math.pi * k / 100) + 1) / 2)
        dino = schedules.cosine(0.9, 0.99, total_steps=10)  # DINO: final + (base-final)(1+cos)/2
        assert dino(3) == pytest.approx(0.99 + 0.5 * (0.9 - 0.99) * (1 + math.cos(math.pi * 0.3)))

    @pytest.mark.parametrize(
        "make",
        [
            lambda: schedules.constant(1.5),
            lambda: schedules.num_updates(-0.1),
            lambda: schedules.warmup(1.2),
            lambda: schedules.warmup(0.9, inv_gamma=0),
            lambda: schedules.warmup(0.9, power=-1),
            lambda: schedules.warmup(0.5, min_decay=0.9),
            lambda: schedules.power_function(0.0),
            lambda: schedules.karras(0.0),
            lambda: schedules.karras(0.3),  # >= 12**-0.5 needs gamma <= 0
            lambda: schedules.cosine(0.9, 1.1, 10),
            lambda: schedules.cosine(0.9, 1.0, 0),
        ],
    )
    def test_invalid(self, make):
        with pytest.raises(ValueError):
            make()

    @pytest.mark.parametrize(
        "schedule",
        [
            schedules.constant(0.9),
            schedules.num_updates(0.99),
            schedules.warmup(0.999),
            schedules.power_function(3.0),
            schedules.karras(0.1),
            schedules.cosine(0.9, 1.0, 8),
        ],
    )
    def test_values_in_unit_interval(self, schedule):
        for t in [*range(20), 10**3, 10**6]:
            assert 0.0 <= schedule(t) <= 1.0


# --------------------------------------------------------------------------- inside an EMA


def run_ema(decay, values, **kwargs) -> float:
    w = nn.Parameter(torch.tensor([values[0]], dtype=torch.float64))
    ema = ExponentialMovingAverage(decay, **kwargs)
    ema.track([w])
    for v in values:
        with torch.no_grad():
            w.fill_(v)
        ema.update()
    return float(ema.average(w)[0])


VALUES = [1.0, -2.0, 4.0, 0.5, 3.0, -1.0, 2.0, 7.0]


@pytest.mark.parametrize(
    "schedule,formula",
    [
        (schedules.constant(0.8), lambda t: 0.8),
        (schedules.num_updates(0.95), lambda t: min(0.95, (1 + t) / (10 + t))),
        (schedules.warmup(0.99, power=3 / 4), lambda t: min(0.99, 1 - (1 + t) ** -0.75)),
        (schedules.power_function(2.0), lambda t: (t / (t + 1)) ** 3),
        (
            schedules.cosine(0.5, 1.0, 4),
            lambda t: 1 - 0.5 * (math.cos(math.pi * min(t, 4) / 4) + 1) / 2,
        ),
    ],
)
def test_schedule_drives_ema(schedule, formula):
    expected = VALUES[0]
    for t, v in enumerate(VALUES):
        d = formula(t)
        expected = d * expected + (1 - d) * v
    assert run_ema(schedule, VALUES) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_power_function_weights_are_edm2_profile():
    # With decay_t = (1 - 1/(t+1))**(g+1), value number tau (1-based) ends with weight
    # (tau**(g+1) - (tau-1)**(g+1)) / T**(g+1): a telescoping product, worked out by hand.
    g = 2.5
    rng = np.random.default_rng(0)
    values = list(rng.standard_normal(30))
    big_t = len(values)
    weights = [(tau ** (g + 1) - (tau - 1) ** (g + 1)) / big_t ** (g + 1) for tau in range(1, 31)]
    expected = sum(w * v for w, v in zip(weights, values))
    assert run_ema(schedules.power_function(g), values) == pytest.approx(expected, rel=1e-5)


def test_warmup_with_update_after_matches_ema_pytorch_trajectory():
    # ema-pytorch (update_every=1, update_after_step=U): calls with step <= U copy; later
    # calls lerp with get_current_decay() evaluated after the step counter was incremented.
    big_u, beta, power = 3, 0.995, 2 / 3
    rng = np.random.default_rng(1)
    values = list(rng.standard_normal(15))
    ref = None
    for step, v in enumerate(values):
        if step <= big_u:
            ref = v
            continue
        epoch = step + 1 - big_u - 1
        d = 0.0 if epoch <= 0 else min(max(1 - (1 + epoch) ** -power, 0.0), beta)
        ref = ref + (v - ref) * (1 - d)
    got = run_ema(schedules.warmup(beta, power=power), values, update_after=big_u)
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-7)


def test_schedule_out_of_range_is_rejected_by_ema():
    w = nn.Parameter(torch.zeros(1))
    ema = ExponentialMovingAverage(lambda t: -0.5)
    ema.track([w])
    with pytest.raises(ValueError, match=r"-0\.5"):
        ema.update()
    assert ema.step == 0
