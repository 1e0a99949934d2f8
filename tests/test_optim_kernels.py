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
from tf1_numpy import Reference

import polyak
import polyak.optim as po
from polyak.optim import _arrays, _base, _batches, _exact
from polyak.optim._arith import Arith, to_float32

# Expected bits (run again with AVX-512 off); the CPU update goes through NumPy with one torch
# thread (and foreach with more): test that.
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_torch_thread")]

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
    torch.set_num_threads(1)  # polyak.optim's NumPy path
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
    # The optimizers through NumPy (the CPU's path) and through the primitives above.
    import polyak.optim as po
    from polyak.optim import _base
    for name, kwargs in [
        ("MomentumOptimizer", {"learning_rate": 0.1, "momentum": 0.9, "use_nesterov": True}),
        ("AdamOptimizer", {"learning_rate": 0.01}),
        ("RMSPropOptimizer", {"learning_rate": 0.01, "momentum": 0.9, "centered": True}),
        ("AdagradOptimizer", {"learning_rate": 0.1}),
        ("AdadeltaOptimizer", {"learning_rate": 1.0}),
        ("FtrlOptimizer", {"learning_rate": 0.1, "l1_regularization_strength": 0.001}),
    ]:
        for dt in (torch.float32, torch.float64):
            ends = []
            for paths in (_base.ARRAY_DTYPES, frozenset()):
                _base.ARRAY_DTYPES = paths
                torch.manual_seed(0)
                w = torch.nn.Parameter(torch.randn(3001, dtype=dt))
                opt = getattr(po, name)([w], **kwargs)
                for i in range(3):
                    w.grad = torch.randn(3001, dtype=dt) * 10.0 ** (i - 1)
                    opt.step()
                ends.append(w.detach().clone())
            assert torch.equal(*ends), (name, dt)
    print("ok", torch.backends.cpu.get_cpu_capability())
    """
)


@pytest.mark.parametrize("capability", [None, "default", "avx2"])
def test_primitives_round_as_tf_at_every_simd_level(capability):
    """torch's CPU kernels at three SIMD levels and NumPy's (all it dispatches, or its
    baseline alone with torch's default level): the primitives round as TF, and the
    optimizers give the same bits through NumPy and through torch."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    if capability == "default":
        umath = (getattr(np, "_core", None) or np.core)._multiarray_umath

        found = [f for f in umath.__cpu_dispatch__ if umath.__cpu_features__.get(f)]
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(found)
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


# ---------------------------------------------------------------------- NumPy chunks

OPTIMIZERS = {
    "GradientDescentOptimizer": {"learning_rate": 0.1},
    "MomentumOptimizer": {"learning_rate": 0.1, "momentum": 0.9, "use_nesterov": True},
    "AdamOptimizer": {"learning_rate": 0.01},
    "RMSPropOptimizer": {"learning_rate": 0.01, "momentum": 0.9, "centered": True},
    "AdagradOptimizer": {"learning_rate": 0.1},
    "AdadeltaOptimizer": {"learning_rate": 1.0},
    "FtrlOptimizer": {"learning_rate": 0.1, "l1_regularization_strength": 0.001, "beta": 0.1},
    "FtrlOptimizer-power": {"learning_rate": 0.1, "learning_rate_power": -0.6},
    "FtrlOptimizer-select": {
        "learning_rate": 0.1,
        "initial_accumulator_value": 0.0,
        "l1_regularization_strength": 0.01,
        "l2_shrinkage_regularization_strength": 0.01,
    },
}


def conv_net(layout):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5)
    )
    if layout == "float64":
        net.double()
    if layout == "channels_last":  # non-contiguous weights, contiguous slots
        net.to(memory_format=torch.channels_last)
    if layout in ("flat", "flat, gradients apart"):
        polyak.flatten_parameters_(net, grads=layout == "flat")
    return net


def run(net, name, steps=4):
    kwargs = OPTIMIZERS[name]
    opt = getattr(po, name.split("-")[0])(net.parameters(), **kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    dtype = next(net.parameters()).dtype
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=g, dtype=dtype)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        schedule.step()
    return [p.detach().clone() for p in net.parameters()], opt


LAYOUTS = ["plain", "float64", "channels_last", "flat", "flat, gradients apart"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_numpy_chunks_give_the_bits_of_torch_foreach(name, layout, monkeypatch):
    """The CPU's NumPy path against torch's foreach path, weights and slots, on layouts that
    take each branch of the chunk plan: small chunks (the weights are cut), the biases stepped
    together."""
    monkeypatch.setattr(_arrays, "CHUNK_BYTES", 256)
    monkeypatch.setattr(_arrays, "STAGED_ELEMENTS", 100)
    chunked, opt = run(conv_net(layout), name)
    plans = [p for p in opt._plans.values() if isinstance(p, _arrays.ArrayPlan)]
    if name != "GradientDescentOptimizer":  # one pass: torch's foreach
        (plan,) = plans
        assert any(len(u.chunks) > 1 for u in plan.units) or layout == "channels_last"
        assert len(plan.staged) == (0 if layout.startswith("flat") else 1)
    monkeypatch.setattr(_base, "ARRAY_DTYPES", frozenset())
    reference, ref_opt = run(conv_net(layout), name)
    assert all(torch.equal(a, b) for a, b in zip(chunked, reference))
    for p, q in zip(opt.state.values(), ref_opt.state.values()):
        assert all(torch.equal(p[k], q[k]) for k in p)


def test_numpy_chunks_follow_moved_parameters_and_replaced_slots():
    net, twin = conv_net("plain"), conv_net("plain")
    opts = [po.AdamOptimizer(n.parameters(), 0.01) for n in (net, twin)]
    x = torch.randn(4, 3, 6, 6)

    def step(n, opt):
        opt.zero_grad()
        n(x).square().mean().backward()
        opt.step()

    for n, opt in zip((net, twin), opts):
        step(n, opt)
    moved = net[0].weight
    moved.data = moved.data.clone()  # new memory: the chunks of the old one must not be written
    old = next(iter(opts[0].state.values()))
    old["m"] = old["m"].clone()  # a slot replaced by the user
    for n, opt in zip((net, twin), opts):
        step(n, opt)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


def test_a_parameter_with_overlapping_memory_is_left_to_torch():
    p = torch.nn.Parameter(torch.zeros(1).expand(4))
    assert not _arrays.writable(p) and _arrays.writable(torch.zeros(3, 4).t())
    assert _arrays.writable(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    opt = po.AdamOptimizer([p], 0.1)
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="single memory location"):
        opt.step()  # torch's in-place check, where NumPy would write one element four times


@pytest.mark.parametrize("l1", [0.0, 0.05])
@pytest.mark.parametrize("initial", [0.1, 0.0])
def test_ftrl_gives_tfs_zeros_where_linear_is_within_l1(l1, initial):
    """TF's ``select(|linear| > l1, x / y, 0)`` gives +0 where ``linear`` is 0; with l1 = 0
    the update takes ``0 - linear`` for ``x`` and leaves out ``+ 2 * l2`` (0): the same bits,
    zero signs included, as TF's formula (tests/tf1_numpy.py) on gradients that keep part of
    ``linear`` at zero."""
    torch.manual_seed(0)
    start = torch.randn(64)
    start[:8], start[8:16] = 0.0, -0.0
    kwargs = {"learning_rate": 0.1, "initial_accumulator_value": initial}
    kwargs["l1_regularization_strength"] = l1
    w = torch.nn.Parameter(start.clone())
    opt = po.FtrlOptimizer([w], **kwargs)
    reference = Reference("FtrlOptimizer", kwargs, start.numpy().copy())
    expected = start.numpy().copy()
    for i in range(3):
        grad = torch.randn(64, generator=torch.Generator().manual_seed(i))
        grad[:24] = 0.0 if i else -0.0
        w.grad = grad
        opt.step()
        with np.errstate(all="ignore"):
            expected = reference.step(expected, grad.numpy(), 0.1)
        got = w.detach().numpy()
        assert np.array_equal(got, expected, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(expected))


@pytest.mark.parametrize("flat", [False, True])
def test_a_step_counts_as_an_in_place_write_for_autograd(flat):
    """The NumPy path writes through views that torch does not see: the step still advances
    the parameters' version counters, so a backward pass through values it overwrote fails
    as with torch's optimizers instead of giving wrong gradients."""
    net = conv_net("flat" if flat else "plain")
    opt = po.AdamOptimizer(net.parameters(), 0.01)
    loss = net(torch.randn(2, 3, 6, 6)).square().sum()
    loss.backward(retain_graph=True)
    versions = [p._version for p in net.parameters()]
    opt.step()
    assert all(p._version > v for p, v in zip(net.parameters(), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", ["AdamOptimizer", "RMSPropOptimizer", "FtrlOptimizer"])
def test_numpy_chunks_on_odd_shapes_mixed_dtypes_and_missing_gradients(name, monkeypatch):
    """0-d and empty parameters, float32 and float64 in one group, a parameter without a
    gradient every other step (its slots wait, the plan changes): the bits of torch's path."""

    def final():
        torch.manual_seed(0)
        shapes = [(), (0,), (5000,), (3, 7), (40, 300)]
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        params.append(torch.nn.Parameter(torch.randn(9, dtype=torch.float64)))
        opt = getattr(po, name)(params, **OPTIMIZERS[name])
        g = torch.Generator().manual_seed(1)
        for i in range(4):
            for j, p in enumerate(params):
                grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                p.grad = None if (i % 2 and j == 2) else grad
            opt.step()
        return [p.detach().clone() for p in params] + [
            t.clone() for st in opt.state.values() for t in st.values()
        ]

    numpy_path = final()
    monkeypatch.setattr(_base, "ARRAY_DTYPES", frozenset())
    assert all(torch.equal(a, b) for a, b in zip(numpy_path, final()))


def test_numpy_chunks_follow_a_parameter_transposed_in_place(monkeypatch):
    """``p.data = p.data.t()`` keeps the memory and changes the layout: the plan's views are
    dropped (a view of the old layout would pair the gradient with the wrong elements)."""

    def final():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6, 6))
        opt = po.AdamOptimizer([p], 0.1)
        g = torch.Generator().manual_seed(1)
        for i in range(3):
            if i == 1:
                p.data = p.data.t()
            p.grad = torch.randn(6, 6, generator=g)
            opt.step()
        return p.detach().clone(), opt.state[p]["m"].clone()

    numpy_path = final()
    monkeypatch.setattr(_base, "ARRAY_DTYPES", frozenset())
    assert all(torch.equal(a, b) for a, b in zip(numpy_path, final()))


def test_more_torch_threads_take_torchs_foreach_path_with_the_same_bits():
    """With several torch threads the CPU update is torch's foreach operations, which spread a
    large tensor over the threads (NumPy's run on one): the same bits as the one-thread path,
    on gradients given (a backward pass on two threads may sum in another order)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(300, 400), (400,), (7, 3)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    threads = torch.get_num_threads()
    ends = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params = [torch.nn.Parameter(t.clone()) for t in start]
            opt = po.AdamOptimizer(params, 0.01)
            for step_grads in grads:
                for p, grad in zip(params, step_grads):
                    p.grad = grad
                opt.step()
            uses_numpy = any(isinstance(p, _arrays.ArrayPlan) for p in opt._plans.values())
            assert uses_numpy == (n == 1)
            ends.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*ends))
