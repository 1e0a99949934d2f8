"""polyak.averaging.decay: what each call of an average does, and TF's float32 arithmetic.

The rule keeps two shortcuts (a weight computed once for a fixed decay and counter, and the
point from which TF's ``num_updates`` rule no longer lowers a fixed decay read from a
``GlobalStep``); both must give exactly the weight the full computation gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak import GlobalStep
from polyak.averaging.decay import (
    DecayRule,
    compounded,
    debias_factor,
    f32,
    num_updates_ratio,
    num_updates_saturation,
    one_minus,
)


def _rule(decay, num_updates=None, every=1, after=0, compound=True) -> DecayRule:
    return DecayRule(
        decay,
        num_updates,
        update_every=every,
        update_after=after,
        compound_decay=compound,
        who="test",
    )


@settings(max_examples=80, deadline=None)
@given(
    decay=st.floats(0.0, 1.0),
    n=st.integers(0, 2**25),
    every=st.integers(1, 4),
    compound=st.booleans(),
)
def test_globalstep_shortcut_is_the_full_computation(decay, n, every, compound):
    step = GlobalStep(n)
    rule = _rule(decay, step, every=every, compound=compound)
    calls = every - 1  # an averaging call
    full = one_minus(rule.decay_at(calls))
    assert rule.weight(calls) == full


@settings(max_examples=60, deadline=None)
@given(decay=st.floats(0.0, 1.0), n=st.integers(0, 10**6), every=st.integers(1, 4))
def test_fixed_weight_is_the_full_computation(decay, n, every):
    rule = _rule(decay, n, every=every)
    assert rule.fixed_weight == one_minus(rule.decay_at(0)) == rule.weight(every - 1)


@settings(max_examples=60, deadline=None)
@given(decay32=st.floats(0.0, 0.9999999).map(f32))
def test_from_saturation_on_the_ratio_never_lowers_the_decay(decay32):
    n = num_updates_saturation(decay32)
    if n is None:
        assert num_updates_ratio(2**24 - 17) < decay32
        return
    for m in (n, n + 1, n + 7, 2 * n + 1, 2**24 - 17):
        assert num_updates_ratio(m) >= decay32, m


def test_calls_copy_then_skip_between_update_every():
    rule = _rule(0.5, after=2, every=3)
    assert [rule.weight(c) is None for c in range(8)] == [True] * 4 + [False] + [True] * 2 + [False]
    assert [rule.copies(c) for c in range(4)] == [True, True, False, False]


def test_float32_arithmetic_as_tf():
    """Each value is what the float32 op sequence of TF's graph gives."""
    f = np.float32
    d = 0.999
    assert one_minus(f32(d)) == float(f(1.0) - f(d))
    assert compounded(f32(d), 3) == float(f(float(f(d)) ** 3))
    n = 12345
    assert num_updates_ratio(n) == float((f(1.0) + f(n)) / (f(10.0) + f(n)))
    w = one_minus(f32(d))
    assert debias_factor(w, 7) == float(f(1.0) - f(float(f(f(1.0) - f(w))) ** 7))


def test_tensor_weight_debias_matches_the_float_path():
    """A tensor weight (num_updates given as a tensor) rounds the power once, as floats do."""
    for d in (0.9, 0.99, 0.7531):
        w = one_minus(f32(d))
        for k in (1, 2, 3, 17):
            tensor = debias_factor(torch.tensor(w, dtype=torch.float32), k)
            assert float(tensor) == debias_factor(w, k), (d, k)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_decay_named(bad):
    with pytest.raises(ValueError, match="decay must be in"):
        _rule(bad)


def test_schedule_out_of_range_raises_at_its_step():
    rule = _rule(lambda t: 0.5 if t < 3 else 2.0)
    assert rule.weight(2) == 0.5
    with pytest.raises(ValueError, match=r"gave 2\.0 at step 3"):
        rule.weight(3)
