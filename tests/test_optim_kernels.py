"""The pieces under polyak.optim's update rules: host arithmetic in a dtype, the exact foreach
primitives (at every CPU SIMD level), the merged layout of flat buffers, and CPU pieces."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polyak
from polyak.optim import _batches, _exact
from polyak.optim._arith import Arith, to_float32

pytestmark = pytest.mark.numerics  # expected bits: run again with AVX-512 off

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------- Arith

finite32 = st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=False)


@settings(max_examples=300)
@given(finite32, finite32.filter(lambda x: x != 0))
def test_float32_arithmetic_is_numpys(a, b):
    f = Arith(torch.float32)
    n = np.float32
    with np.errstate(all="ignore"):
        assert f.add(a, b) == float(n(a) + n(b))
        assert f.sub(a, b) == float(n(a) - n(b))
        assert f.mul(a, b) == float(n(a) * n(b))
        assert f.div(a, b) == float(n(a) / n(b))
        assert f.sqrt(abs(a)) == float(np.sqrt(n(abs(a))))


@settings(max_examples=200)
@given(st.floats(-(2.0**15), 2.0**15, width=16), st.floats(2.0**-6, 2.0**6, width=16))
def test_float16_arithmetic_is_numpys(a, b):
    h, n = Arith(torch.float16), np.float16
    with np.errstate(over="ignore"):
        assert h.mul(a, b) == float(n(a) * n(b))
        assert h.div(a, b) == float(n(a) / n(b))
    assert h.hyper(0.1) == float(n(np.float32(0.1)))


def test_rounding_edges():
    assert to_float32(0.1) == float(np.float32(0.1))
    assert to_float32(1e39) == float("inf") and to_float32(-1e39) == float("-inf")
    f = Arith(torch.float32)
    assert f.div(1.0, 0.0) == float("inf") and f.div(-1.0, 0.0) == float("-inf")
    assert np.isnan(f.div(0.0, 0.0)) and np.isnan(f.sqrt(-1.0))
    assert Arith(torch.bfloat16).hyper(0.999) == 1.0  # as TF's cast of beta2 to bfloat16
    assert Arith(torch.float64).hyper(0.1) == float(np.float32(0.1))  # float32 first, as TF


# ---------------------------------------------------------------------- primitives

PRIMITIVES = textwrap.dedent(
    """
    import numpy as np, torch
    from polyak.optim import _exact as f
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64, np.float16):
        n = 1000
        x, y = rng.standard_normal(n).astype(dt), rng.standard_normal(n).astype(dt)
        z = (rng.random(n) + 0.5).astype(dt)
        c = dt(0.0123)
        X = [torch.from_numpy(x.copy())]
        f.add_scaled_(X, [torch.from_numpy(y)], float(c))
        assert np.array_equal(X[0].numpy(), x + y * c), ("add_scaled_", dt)
        X = [torch.from_numpy(x.copy())]
        f.add_scaled_quotient_(X, [torch.from_numpy(y)], [torch.from_numpy(z)], float(-c))
        assert np.array_equal(X[0].numpy(), x + (y * -c) / z), ("add_scaled_quotient_", dt)
        Z = [torch.from_numpy(z), torch.from_numpy(z[:7])]
        assert np.array_equal(f.sqrt(Z)[0].numpy(), np.sqrt(z)), ("sqrt", dt)
        R = f.Reused()
        T = R.sqrt(0, Z)
        assert np.array_equal(T[1].numpy(), np.sqrt(z[:7])), ("reused sqrt", dt)
        assert np.array_equal(R.mul(1, [torch.from_numpy(y)], float(c))[0].numpy(), y * c)
    print("ok", torch.backends.cpu.get_cpu_capability())
    """
)


@pytest.mark.parametrize("capability", [None, "default", "avx2"])
def test_primitives_round_as_tf_at_every_simd_level(capability):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run(
        [sys.executable, "-c", PRIMITIVES], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_sqrt_keeps_shapes_dtypes_and_nan():
    t = [torch.tensor([[4.0, -1.0]]), torch.tensor([9.0], dtype=torch.float32)]
    roots = _exact.sqrt(t)
    assert roots[0].shape == (1, 2) and roots[0][0, 0] == 2 and torch.isnan(roots[0][0, 1])
    assert roots[1].tolist() == [3.0]
    assert t[0][0, 0] == 4.0  # inputs untouched


# ---------------------------------------------------------------------- layout and pieces


def test_layout_merges_runs_that_are_contiguous_in_every_list():
    buf = [torch.arange(10.0) for _ in range(3)]
    lists = [[b[:4], b[4:7], b[7:]] for b in buf]
    merged = _batches.Layout().merge(lists)
    assert [len(ts) for ts in merged] == [1, 1, 1]
    assert all(torch.equal(m[0], b) for m, b in zip(merged, buf))
    other = torch.arange(3.0)  # a gradient that is not in the buffer breaks the run
    lists[1][1] = other
    merged = _batches.Layout().merge(lists)
    assert [len(ts) for ts in merged] == [3, 3, 3]
    assert merged[1][1] is other


def test_layout_follows_tensors_that_move():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    polyak.flatten_parameters_(model)
    params = list(model.parameters())
    grads = polyak.flat.pack([(p.shape, p.dtype, p.device) for p in params])
    layout = _batches.Layout()
    assert len(layout.merge([params, grads])[0]) == 1
    params[1].data = params[1].data.clone()  # leaves the buffer
    merged = layout.merge([params, grads])
    assert len(merged[0]) == 3 and merged[0][1] is params[1]


def test_cpu_pieces_cover_everything_once(monkeypatch):
    monkeypatch.setattr(_batches, "CPU_PIECE_BYTES", 40)  # 10 float32
    ts = [torch.arange(n, dtype=torch.float32) + 100 * i for i, n in enumerate([3, 4, 25, 2, 0, 9])]
    twins = [t.clone() for t in ts]
    pieces = _batches.pieces([ts, twins], torch.device("cpu"))
    for a, b in pieces:
        assert sum(t.numel() for t in a) <= 10 and [t.numel() for t in a] == [t.numel() for t in b]
    covered = torch.cat([t.reshape(-1) for a, _ in pieces for t in a])
    assert torch.equal(covered, torch.cat(ts))
    assert len(_batches.pieces([ts, twins], torch.device("meta"))) == 1
