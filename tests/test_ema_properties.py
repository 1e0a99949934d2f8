"""Property tests: the update rule, TF's debiasing, and state_dict round trips."""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tf_reference import tf_zero_debias_f32
from torch import nn

from polyak import ExponentialMovingAverage, schedules

pytestmark = pytest.mark.numerics  # expected bits: run again with AVX-512 off

EMA = ExponentialMovingAverage

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(0, 2**31 - 1)
decays = st.floats(0.0, 1.0)
magnitudes = st.sampled_from([1e-3, 1.0, 1e3, 1e20])


def random(shape, dtype, seed, scale) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@settings(max_examples=60, deadline=None)
@given(decay=decays, shape=shapes, dtype=dtypes, seed=seeds, scale=magnitudes)
def test_one_step_is_the_lerp(decay, shape, dtype, seed, scale):
    start = random(shape, dtype, seed, scale)
    value = random(shape, dtype, seed + 1, scale)
    w = nn.Parameter(start.clone())
    ema = EMA(decay)
    ema.track([w])
    with torch.no_grad():
        w.copy_(value)
    ema.update()
    s, v = start.double(), value.double()
    expected = decay * s + (1 - decay) * v
    got = ema.average(w)
    assert got.dtype == dtype and got.shape == start.shape
    # decay is a float32 (as in TF): its rounding moves the result by <= 6e-8 |v - s|;
    # then the dtype's own rounding of the lerp.
    eps = 2.5e-7 if dtype == torch.float32 else 1e-15
    tol = 1e-7 * (v - s).abs() + eps * (s.abs() + v.abs()) + 1e-300
    assert bool(((got.double() - expected).abs() <= tol).all()), (got, expected)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, dtype=dtypes, seed=seeds, scale=magnitudes, steps=st.integers(1, 3))
def test_decay_zero_copies_decay_one_freezes(shape, dtype, seed, scale, steps):
    start = random(shape, dtype, seed, scale)
    w = nn.Parameter(start.clone())
    copier, frozen = EMA(0.0), EMA(1.0)
    copier.apply([w])
    frozen.apply([w])
    for i in range(steps):
        with torch.no_grad():
            w.copy_(random(shape, dtype, seed + 1 + i, scale))
        copier.update()
        frozen.update()
        assert torch.equal(copier.average(w), w.detach())
        assert torch.equal(frozen.average(w), start)


@settings(max_examples=40, deadline=None)
@given(
    decay=st.floats(0.01, 0.9999),
    seed=seeds,
    steps=st.integers(1, 6),
)
def test_zero_debias_float32_bitwise_tf_ops(decay, seed, steps):
    # TF's op sequence in numpy float32, with the power rounded once (tf_reference.py): the
    # same bits on every machine.
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(3).astype(np.float32) for _ in range(steps)]
    shadows, biased = tf_zero_debias_f32(decay, values)
    ema = EMA(decay, zero_debias=True)
    for value, shadow in zip(values, shadows):
        ema.apply({"x": torch.from_numpy(value)})
        assert np.array_equal(ema.average("x").numpy(), shadow)
    assert np.array_equal(ema.state_dict()["values"]["x"]["biased"].numpy(), biased)


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def train_step(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        model.train()
        model(torch.randn(6, 3, generator=g))
    return torch.randn(2, generator=g)  # a "loss" value


@settings(max_examples=15, deadline=None)
@given(
    decay=st.one_of(decays, st.just("warmup")),
    zero_debias=st.booleans(),
    update_every=st.integers(1, 3),
    update_after=st.integers(0, 3),
    before=st.integers(0, 5),
    after=st.integers(1, 4),
    seed=seeds,
)
def test_state_dict_round_trip(decay, zero_debias, update_every, update_after, before, after, seed):
    def make() -> EMA:
        return EMA(
            schedules.warmup(0.99) if decay == "warmup" else decay,
            zero_debias=zero_debias,
            update_every=update_every,
            update_after=update_after,
        )

    model = small_model(seed % 1000)
    ema = make()
    ema.apply(model)
    for i in range(before):
        loss = train_step(model, seed + i)
        ema.update()
        ema.apply({"loss": loss})

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ema.pt")
        torch.save(ema.state_dict(), path)
        loaded = torch.load(path, weights_only=True)

    twin = copy.deepcopy(model)
    fresh = make()
    fresh.track(twin)
    result = fresh.load_state_dict(loaded)
    assert result.missing_keys == [] and result.unexpected_keys == []

    def same(a: EMA, b: EMA) -> None:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["step"] == sb["step"]
        assert sa["averages"].keys() == sb["averages"].keys()
        for name in sa["averages"]:
            # decay 1 with zero_debias divides 0 by 0: NaN on both sides is the same state.
            torch.testing.assert_close(
                sa["averages"][name], sb["averages"][name], rtol=0, atol=0, equal_nan=True
            )
        assert sa["values"].keys() == sb["values"].keys()
        for name, state in sa["values"].items():
            assert state["local_step"] == sb["values"][name]["local_step"]
            assert ("biased" in state) == ("biased" in sb["values"][name])
            if "biased" in state:
                torch.testing.assert_close(
                    state["biased"], sb["values"][name]["biased"], rtol=0, atol=0, equal_nan=True
                )

    same(ema, fresh)
    assert fresh.step == 1 + 2 * before
    for i in range(after):
        for m, e in ((model, ema), (twin, fresh)):
            loss = train_step(m, seed + 100 + i)
            e.update()
            e.apply({"loss": loss})
        same(ema, fresh)
