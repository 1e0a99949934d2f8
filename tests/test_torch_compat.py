"""polyak._torch_compat: each entry's public fallback, forced, gives the bits of the entry's
internal-based implementation; probes reject internals that behave differently; the
environment variable forces fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

import polyak
from polyak import _torch_compat as torch_compat
from polyak import transforms as T
from polyak.averaging.names import module_tensors

FOREACH = sorted(n for n in torch_compat.FALLBACKS if n.startswith("foreach_"))


def fast_or_skip(name: str) -> Callable:
    impl = torch_compat.fast(name)
    if impl is None:
        pytest.skip(f"this torch has no usable internal for {name}")
    return impl


def force(monkeypatch: pytest.MonkeyPatch, names: list[str], fallback: bool) -> None:
    """Bind ``names`` to their fallbacks (or to their internal-based implementations)."""
    for name in names:
        impl = torch_compat.FALLBACKS[name] if fallback else fast_or_skip(name)
        monkeypatch.setattr(torch_compat, name, impl)


def test_every_entry_has_a_fallback_and_a_name_in_all():
    assert set(torch_compat.FALLBACKS) <= set(torch_compat.__all__)
    for name in torch_compat.FALLBACKS:
        impl = torch_compat.fast(name)  # probing never raises
        assert getattr(torch_compat, name) in (impl, torch_compat.FALLBACKS[name])


# ---------------------------------------------------------------- multi-tensor kernels


def _lists(device, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def one():
        return [
            (torch.randn(s, generator=g, dtype=torch.float64) * 3).to(device, dtype)
            for s in [(4, 3), (7,), (2, 2, 2), ()]
        ]

    return one(), one()


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", FOREACH)
def test_foreach_fallback_is_bit_identical(name, dtype, device):
    op, fallback = fast_or_skip(name), torch_compat.FALLBACKS[name]
    weights = [torch.tensor(w, device=device, dtype=dtype) for w in (0.1, 0.5, 0.9, 0.25)]
    calls = {
        "foreach_add": [lambda o: ((0.5,), {})],
        "foreach_add_": [
            lambda o: ((o,), {}),
            lambda o: ((o,), {"alpha": 0.37}),
            lambda o: ((0.5,), {}),
        ],
        "foreach_addcdiv_": [
            lambda o: ((o, [t.abs() + 0.5 for t in o]), {}),
            lambda o: ((o, [t.abs() + 0.5 for t in o]), {"value": 0.3}),
        ],
        "foreach_addcmul_": [lambda o: ((o, o), {"value": 0.3})],
        "foreach_clamp_max_": [lambda o: ((0.5,), {}), lambda o: ((o,), {})],
        "foreach_clamp_min_": [lambda o: ((-0.5,), {}), lambda o: ((o,), {})],
        "foreach_copy_": [lambda o: ((o,), {})],
        "foreach_div_": [lambda o: ((3.0,), {}), lambda o: ((o,), {})],
        "foreach_lerp_": [lambda o: ((o, 0.3), {}), lambda o: ((o, weights), {})],
        "foreach_lerp_scalars_": [lambda o: ((o, [0.1, 0.5, 0.9, 0.25]), {})],
        "foreach_mul": [
            lambda o: ((0.7,), {}),
            lambda o: ((weights[1],), {}),
            lambda o: ((o,), {}),
        ],
        "foreach_mul_": [lambda o: ((0.7,), {}), lambda o: ((weights,), {}), lambda o: ((o,), {})],
        "foreach_neg": [lambda o: ((), {})],
        "foreach_norm": [lambda o: ((), {}), lambda o: ((), {"ord": float("inf")})],
        "foreach_pow": [lambda o: ((-0.7,), {}), lambda o: ((2.0,), {})],
        "foreach_reciprocal_": [lambda o: ((), {})],
        "foreach_sqrt": [lambda o: ((), {})],
        "foreach_sqrt_": [lambda o: ((), {})],
        "foreach_sub": [lambda o: ((o,), {})],
        "foreach_sub_": [lambda o: ((o,), {})],
        "foreach_zero_": [lambda o: ((), {})],
    }[name]
    for k, make in enumerate(calls):
        (a, other), (b, _) = _lists(device, dtype, k), _lists(device, dtype, k)
        if name.startswith(("foreach_sqrt", "foreach_pow")):  # real results: positive bases
            a, b = [t.abs() for t in a], [t.abs() for t in b]
        args, kwargs = make(other)
        got, want = op(a, *args, **kwargs), fallback(b, *args, **kwargs)
        if name.endswith("_"):  # in place
            got, want = a, b
        if name == "foreach_norm" and device.type == "cuda" and not kwargs:
            # CUDA's multi-tensor norm sums in another order than the per-tensor one.
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
            continue
        assert len(got) == len(want)
        for x, y in zip(got, want):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y), (name, k)


def _ema_run(exact_tf: bool, flat: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    if flat:
        polyak.flatten_parameters_(model)
    ema = polyak.ExponentialMovingAverage(0.9, num_updates=torch.tensor(3), exact_tf=exact_tf)
    ema.apply(model)
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        model(torch.randn(6, 5, generator=torch.Generator().manual_seed(10 + i)))
        ema.update()
    target = polyak.TargetNetwork(model, tau=0.01)
    target.update()
    return [ema.average(p) for p in model.parameters()] + list(target.module.parameters())


def _optimizer_run(
    make: Callable, flat: bool, steps: int = 4, transforms: list | None = None
) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    if flat:
        polyak.flatten_parameters_(model)
    if transforms is None:
        transforms = [T.clip_by_value(-0.4, 0.4), T.clip_by_norm(0.3), T.clip_by_global_norm(0.5)]
    opt = polyak.Optimizer(make(model.parameters()), transforms)
    for i in range(steps):
        x = torch.randn(9, 5, generator=torch.Generator().manual_seed(i))
        loss = model(x).pow(2).mean()
        if i % 2:
            opt.minimize(loss)
        else:
            opt.apply_gradients(opt.compute_gradients(loss))
    state = [v for s in opt.inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return [p.detach().clone() for p in model.parameters()] + state


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw-wd": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
}


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("flat", [False, True], ids=["separate", "flat"])
@pytest.mark.parametrize("exact_tf", [False, True])
def test_ema_on_fallback_kernels_is_bit_identical(exact_tf, flat, monkeypatch):
    force(monkeypatch, FOREACH, fallback=False)
    fast = _ema_run(exact_tf, flat)
    force(monkeypatch, FOREACH, fallback=True)
    _same(_ema_run(exact_tf, flat), fast)


def test_clipping_functions_on_fallback_kernels_are_bit_identical(monkeypatch):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) * 5 for s in [(3, 4), (5,), ()]]

    def run():
        clipped, norm = polyak.clip_by_global_norm(grads, 1.0)
        return [*clipped, norm, polyak.global_norm(grads)]

    force(monkeypatch, FOREACH, fallback=False)
    fast = run()
    force(monkeypatch, FOREACH, fallback=True)
    _same(run(), fast)


@pytest.mark.parametrize("flat", [False, True], ids=["separate", "flat"])
def test_transforms_on_fallback_kernels_are_bit_identical(flat, monkeypatch):
    def transforms():
        return [
            T.accumulate(2),
            T.skip_nonfinite(),
            T.adaptive_clip(0.05),
            T.add_noise(0.01, seed=3),
            T.scale(0.9),
        ]

    make = OPTIMIZERS["sgd-momentum"]
    force(monkeypatch, FOREACH, fallback=False)
    fast = _optimizer_run(make, flat, steps=6, transforms=transforms())
    force(monkeypatch, FOREACH, fallback=True)
    _same(_optimizer_run(make, flat, steps=6, transforms=transforms()), fast)


@pytest.mark.parametrize("flat", [False, True], ids=["separate", "flat"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_on_fallback_kernels_is_bit_identical(name, flat, monkeypatch):
    force(monkeypatch, FOREACH, fallback=False)
    fast = _optimizer_run(OPTIMIZERS[name], flat)
    force(monkeypatch, FOREACH, fallback=True)
    _same(_optimizer_run(OPTIMIZERS[name], flat), fast)


# ---------------------------------------------------------------- module buffers


def test_persistent_buffers_fallback_is_identical():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.register_buffer("cache", torch.zeros(2), persistent=False)
            self.register_buffer("scale", torch.ones(1))
            self.register_buffer("unset", None)
            self.alias = self.bn  # shared submodule

    net = Net()
    for sub in net.modules():
        want = [(n, b) for n, b in torch_compat.FALLBACKS["persistent_buffers"](sub)]
        got = [(n, b) for n, b in fast_or_skip("persistent_buffers")(sub)]
        assert [(n, id(b)) for n, b in got] == [(n, id(b)) for n, b in want]
    assert [n for n, _ in torch_compat.persistent_buffers(net)] == ["scale"]


def test_module_tensors_on_fallback_are_identical(monkeypatch):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    model[1].register_buffer("cache", torch.zeros(1), persistent=False)
    force(monkeypatch, ["persistent_buffers"], fallback=False)
    fast = [(n, id(t), avg) for n, t, avg in module_tensors(model, "average")]
    force(monkeypatch, ["persistent_buffers"], fallback=True)
    assert [(n, id(t), avg) for n, t, avg in module_tensors(model, "average")] == fast
    assert "1.cache" not in [n for n, _, _ in fast]


# ---------------------------------------------------------------- probes and forcing


def test_a_probe_rejects_an_internal_that_behaves_differently(monkeypatch):
    monkeypatch.setattr(torch_compat, "_FAST", {})
    monkeypatch.delattr(torch, "_foreach_zero_")  # as a release without it
    assert torch_compat.fast("foreach_zero_") is None
    # A norm that sums differently (as another kernel might): the probe sees other bits.
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, ord=2: [t.abs().sum() for t in ts])
    assert torch_compat.fast("foreach_norm") is None
    # Buffers listed without their persistence (as a changed attribute would make them).
    _, _, probe = torch_compat._ENTRIES["persistent_buffers"]
    assert not probe(lambda m: m.named_buffers(recurse=False))


def _run_python(code: str, fallbacks: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, POLYAK_TORCH_FALLBACKS=fallbacks)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_environment_variable_forces_fallbacks():
    code = (
        "from polyak import _torch_compat as c\n"
        "print(sorted(n for n in c.FALLBACKS if c.uses_fast(n)))\n"
    )
    everything = _run_python(code, "all")
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.strip() == "[]"
    some = _run_python(code, "foreach_norm, persistent_buffers")
    assert some.returncode == 0, some.stderr
    chosen = eval(some.stdout)
    assert "foreach_norm" not in chosen and "persistent_buffers" not in chosen
    assert "foreach_lerp_" in chosen or torch_compat.fast("foreach_lerp_") is None


def test_environment_variable_with_an_unknown_name_says_which_names_exist():
    bad = _run_python("import polyak", "foreach_nrom")
    assert bad.returncode != 0
    assert "foreach_nrom" in bad.stderr and "foreach_norm" in bad.stderr


TF1_OPTIMIZERS = {
    "GradientDescentOptimizer": {"learning_rate": 0.1},
    "MomentumOptimizer": {"learning_rate": 0.1, "momentum": 0.9, "use_nesterov": True},
    "AdamOptimizer": {"learning_rate": 0.01},
    "RMSPropOptimizer": {"learning_rate": 0.01, "momentum": 0.5, "centered": True},
    "AdagradOptimizer": {"learning_rate": 0.1},
    "AdadeltaOptimizer": {"learning_rate": 1.0},
    "FtrlOptimizer": {
        "learning_rate": 0.1,
        "learning_rate_power": -0.7,
        "l1_regularization_strength": 0.01,
        "l2_regularization_strength": 0.01,
    },
}


def _tf1_run(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(dtype)
    opt = getattr(polyak.optim, name)(model.parameters(), **TF1_OPTIMIZERS[name])
    for i in range(4):
        x = torch.randn(9, 5, generator=torch.Generator().manual_seed(i)).to(dtype)
        model.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return [p.detach().clone() for p in model.parameters()] + state


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(TF1_OPTIMIZERS))
def test_tf1_optimizer_on_fallback_kernels_is_bit_identical(name, dtype, monkeypatch):
    """polyak.optim's multi-tensor path (CUDA's, and the CPU's for half precision and gradient
    descent) gives the same bits on the per-tensor fallbacks."""
    force(monkeypatch, FOREACH, fallback=False)
    fast = _tf1_run(name, dtype)
    force(monkeypatch, FOREACH, fallback=True)
    _same(_tf1_run(name, dtype), fast)
