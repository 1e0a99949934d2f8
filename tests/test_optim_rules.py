"""polyak.optim's update rules: worked formulas for a few steps, and property tests against
TF's kernels written op by op in NumPy (tests/tf1_numpy.py), in float32 and float64."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tf1_numpy import Reference

import polyak.optim as po

# Expected bits (run again with AVX-512 off); the CPU update goes through NumPy with one torch
# thread (and foreach with more): test that.
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_torch_thread")]

F32 = float(np.float32(0.1))  # TF's learning rate 0.1: a float32


def f32(x: float) -> float:
    return float(np.float32(x))


def run(cls, var, grads, dtype=torch.float64, **kwargs):
    """The variable after each step, with dense gradients ``grads`` (one list per step)."""
    p = torch.nn.Parameter(torch.tensor(var, dtype=dtype))
    opt = cls([p], **kwargs)
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        out.append(p.detach().clone().tolist())
    return out, opt, p


def close(a, b, rel=1e-12):
    assert a == pytest.approx(b, rel=rel, abs=1e-300)


# ---------------------------------------------------------------------- formulas by hand


def test_gradient_descent_subtracts_lr_times_grad():
    out, _, _ = run(
        po.GradientDescentOptimizer, [1.0, -2.0], [[0.5, 1.0], [-0.25, 2.0]], learning_rate=0.1
    )
    close(out[0], [1.0 - F32 * 0.5, -2.0 - F32 * 1.0])
    close(out[1], [1.0 - F32 * 0.5 + F32 * 0.25, -2.0 - F32 * 3.0])


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_accumulates_raw_gradients(nesterov):
    m = f32(0.9)
    grads = [[1.0], [2.0], [-1.0]]
    out, opt, p = run(
        po.MomentumOptimizer, [0.0], grads, learning_rate=0.1, momentum=0.9, use_nesterov=nesterov
    )
    accum, var = 0.0, 0.0
    for (g,), (got,) in zip(grads, out):
        accum = accum * m + g
        var -= F32 * g + F32 * m * accum if nesterov else F32 * accum
        close([got], [var])
    close(opt.state[p]["momentum"].tolist(), [accum])


def test_adam_first_steps_with_tfs_epsilon_hat():
    b1, b2, eps, lr = f32(0.9), f32(0.999), f32(1e-8), f32(0.001)
    out, opt, _ = run(po.AdamOptimizer, [1.0], [[2.0], [-1.0], [0.5]])
    # Step 1: m = 0.2, v = 0.004, lr_t = lr * sqrt(1 - b2) / (1 - b1): a step of almost lr.
    m, v, var = 0.0, 0.0, 1.0
    for t, ((g,), (got,)) in enumerate(zip([[2.0], [-1.0], [0.5]], out), start=1):
        b1p, b2p = f32(0.9) ** t, f32(0.999) ** t
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        var -= lr * math.sqrt(1 - b2p) / (1 - b1p) * m / (math.sqrt(v) + eps)
        assert got == pytest.approx(var, rel=1e-6)  # powers are float32, as TF's
    assert out[0][0] == pytest.approx(1.0 - 0.001, rel=1e-6)
    group = opt.param_groups[0]
    assert group["beta1_power"] == f32(f32(f32(b1 * b1) * b1) * b1)
    assert group["beta2_power"] == f32(f32(f32(b2 * b2) * b2) * b2)


def test_adam_large_epsilon_weighs_like_tf_not_torch():
    """Inception's epsilon=1.0: TF's first step is about 6 % of torch's (0.003 against 0.05)."""
    ours, _, _ = run(po.AdamOptimizer, [0.0], [[1.0]], learning_rate=0.1, epsilon=1.0)
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    torch_adam = torch.optim.Adam([p], lr=0.1, eps=1.0)
    p.grad = torch.ones(1, dtype=torch.float64)
    torch_adam.step()
    lr_t = f32(0.1) * math.sqrt(1 - f32(0.999)) / (1 - f32(0.9))
    m, v = 1 - f32(0.9), 1 - f32(0.999)
    close(ours[0], [-lr_t * m / (math.sqrt(v) + 1.0)])
    assert abs(ours[0][0]) < 0.1 * abs(p.item())


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_mean_square_starts_at_one(centered):
    rho, mom_c, eps = f32(0.9), f32(0.5), f32(1e-10)
    grads = [[0.1], [0.3], [-0.2]]
    out, opt, p = run(
        po.RMSPropOptimizer, [0.0], grads, learning_rate=0.01, momentum=0.5, centered=centered
    )
    lr = f32(0.01)
    ms, mg, mom, var = 1.0, 0.0, 0.0, 0.0
    for (g,), (got,) in zip(grads, out):
        ms += (g * g - ms) * (1 - rho)
        mg += (g - mg) * (1 - rho)
        denominator = ms - mg * mg + eps if centered else ms + eps
        mom = mom * mom_c + lr * g / math.sqrt(denominator)
        var -= mom
        close([got], [var])
    # A first step of lr * g / sqrt(0.9 + 0.1 g^2): about lr * g for small gradients.
    assert out[0][0] == pytest.approx(
        -lr * 0.1 / math.sqrt(0.901 - (0.0001 if centered else 0)), rel=1e-6
    )
    assert set(opt.state[p]) == ({"rms", "momentum", "mg"} if centered else {"rms", "momentum"})


def test_adagrad_accumulator_starts_at_its_initial_value_without_epsilon():
    grads = [[3.0, 0.0], [4.0, 0.0]]
    out, opt, p = run(po.AdagradOptimizer, [0.0, 1.0], grads, learning_rate=0.5)
    lr, a0 = f32(0.5), 0.1
    close(out[0], [-lr * 3.0 / math.sqrt(a0 + 9.0), 1.0])
    close(out[1], [out[0][0] - lr * 4.0 / math.sqrt(a0 + 25.0), 1.0])
    close(opt.state[p]["accumulator"].tolist(), [a0 + 25.0, a0])


def test_adadelta_unit_free_steps():
    rho, eps, lr = f32(0.95), f32(1e-6), f32(1.0)
    grads = [[1.0], [0.5]]
    out, _, _ = run(po.AdadeltaOptimizer, [0.0], grads, learning_rate=1.0, epsilon=1e-6)
    accum = update_accum = var = 0.0
    for (g,), (got,) in zip(grads, out):
        accum = accum * rho + g * g * (1 - rho)
        update = math.sqrt(update_accum + eps) / math.sqrt(accum + eps) * g
        var -= update * lr
        update_accum = update_accum * rho + update * update * (1 - rho)
        close([got], [var])


@pytest.mark.parametrize("l1", [0.0, 0.05, 10.0])
def test_ftrl_closed_form(l1):
    lr, l2, a0 = f32(0.1), f32(0.01), 0.1  # a float64 accumulator starts at 0.1 exactly
    grads = [[1.0, -0.02], [-0.5, -0.02]]
    out, _, _ = run(
        po.FtrlOptimizer,
        [0.3, 0.3],
        grads,
        learning_rate=0.1,
        l1_regularization_strength=l1,
        l2_regularization_strength=0.01,
    )
    l1 = f32(l1)
    accum, linear, var = [a0, a0], [0.0, 0.0], [0.3, 0.3]
    for step, got in zip(grads, out):
        for i, g in enumerate(step):
            new = accum[i] + g * g
            linear[i] += g - (math.sqrt(new) - math.sqrt(accum[i])) / lr * var[i]
            accum[i] = new
            quadratic = math.sqrt(new) / lr + 2 * l2
            var[i] = (
                (math.copysign(l1, linear[i]) - linear[i]) / quadratic
                if abs(linear[i]) > l1
                else 0.0
            )
        close(got, var, rel=1e-9)
    if l1 == f32(10.0):
        assert out[-1] == [0.0, 0.0]  # l1 large enough: FTRL's sparsity


def test_ftrl_beta_adds_to_l2_over_twice_the_learning_rate():
    a, _, _ = run(po.FtrlOptimizer, [0.5], [[1.0]], learning_rate=0.1, beta=0.2)
    b, _, _ = run(
        po.FtrlOptimizer,
        [0.5],
        [[1.0]],
        learning_rate=0.1,
        l2_regularization_strength=float(np.float32(0.2) / (np.float32(2) * np.float32(0.1))),
    )
    assert a == b


# ---------------------------------------------------------------------- properties

OPTIMIZERS = {
    "GradientDescentOptimizer": {},
    "MomentumOptimizer": {"momentum": st.floats(0, 0.99), "use_nesterov": st.booleans()},
    "AdamOptimizer": {
        "beta1": st.floats(0, 0.99),
        "beta2": st.floats(0, 0.9999),
        "epsilon": st.sampled_from([0.0, 1e-8, 1e-3, 1.0]),
    },
    "RMSPropOptimizer": {
        "decay": st.floats(0, 1),
        "momentum": st.floats(0, 0.99),
        "epsilon": st.sampled_from([1e-10, 1e-6, 0.1]),
        "centered": st.booleans(),
    },
    "AdagradOptimizer": {"initial_accumulator_value": st.floats(1e-3, 10)},
    "AdadeltaOptimizer": {"rho": st.floats(0, 1), "epsilon": st.sampled_from([1e-8, 1e-6, 1e-2])},
    "FtrlOptimizer": {
        "learning_rate_power": st.sampled_from([-0.5, -0.5, 0.0, -0.7, -1.0]),
        "initial_accumulator_value": st.floats(0.01, 10),
        "l1_regularization_strength": st.sampled_from([0.0, 1e-3, 0.1]),
        "l2_regularization_strength": st.sampled_from([0.0, 1e-3, 0.1]),
        "l2_shrinkage_regularization_strength": st.sampled_from([0.0, 0.0, 0.1]),
        "beta": st.sampled_from([0.0, 0.5]),
    },
}

values = st.floats(-4, 4, width=32)
# No subnormal products: float32 underflows where float64 does not (and TF's CPU kernels
# flush subnormals to zero, a float32-only effect either way).
normal_values = values.map(lambda x: x if abs(x) > 1e-15 else 0.0)


@st.composite
def problems(draw, values=values):
    name = draw(st.sampled_from(sorted(OPTIMIZERS)))
    kwargs = {k: draw(s) for k, s in OPTIMIZERS[name].items()}
    steps = draw(st.integers(1, 5))
    size = draw(st.integers(1, 37))
    var = np.array(draw(st.lists(values, min_size=size, max_size=size)), np.float32)
    grads = np.array(
        draw(
            st.lists(st.lists(values, min_size=size, max_size=size), min_size=steps, max_size=steps)
        ),
        np.float32,
    )
    grads *= np.float32(draw(st.sampled_from([1.0, 1e-3, 10.0])))
    lrs = [draw(st.sampled_from([1e-3, 0.01, 0.1, 0.5])) for _ in range(steps)]
    return name, kwargs, var, grads, lrs


def replay(name, kwargs, var, grads, lrs, dtype):
    p = torch.nn.Parameter(torch.tensor(var, dtype=dtype))
    opt = getattr(po, name)([p], learning_rate=lrs[0], **kwargs)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return p.detach().numpy(), {k: v.numpy() for k, v in opt.state[p].items()}


def reference(name, kwargs, var, grads, lrs, dtype, *, reference_out=None):
    r = Reference(name, kwargs, var.astype(dtype))
    v = var.astype(dtype)
    with np.errstate(all="ignore"):
        for g, lr in zip(grads, lrs):
            v = r.step(v, g.astype(dtype), lr)
    if reference_out is not None:
        reference_out.append(r)
    return v, r.slots()


def uses_pow(name, kwargs):
    return name == "FtrlOptimizer" and kwargs["learning_rate_power"] != -0.5


@settings(max_examples=200, deadline=None)
@given(problems(), st.sampled_from([torch.float32, torch.float64]))
def test_bitwise_tfs_kernels_op_by_op(problem, dtype):
    name, kwargs = problem[:2]
    ours, slots = replay(*problem, dtype)
    theirs, their_slots = reference(*problem, np.float32 if dtype == torch.float32 else np.float64)
    if uses_pow(name, kwargs):  # torch's pow and NumPy's differ in the last place
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
        return
    np.testing.assert_array_equal(ours, theirs)
    for k, v in their_slots.items():
        np.testing.assert_array_equal(slots[k], v)


@settings(max_examples=100, deadline=None)
@given(problems(normal_values))
def test_float32_close_to_float64_reference(problem):
    """Rounding only: float32 steps stay near the same formulas evaluated in float64."""
    name, kwargs, var = problem[:3]
    ours, _ = replay(*problem, torch.float32)
    kept = []
    exact, _ = reference(*problem, np.float64, reference_out=kept)
    assume(np.isfinite(exact).all())  # 0 / 0 with epsilon 0 and a zero gradient: NaN in TF too
    # Ill-conditioned in TF's formulas, so left out: ``x += (y - x) * (1 - beta)`` cancels when
    # beta is small (as does centered RMSProp's rms - mg**2); FTRL's var jumps to 0 where
    # |linear| crosses l1.
    for key in ("beta1", "beta2", "decay"):
        assume(kwargs.get(key, 1.0) >= 0.5)
    if name == "FtrlOptimizer":
        assume(kept[0].l1_margin > 1e-3 * (kwargs["l1_regularization_strength"] + 1))
    moved = np.abs(exact - var.astype(np.float64)).max()
    # A few steps of float32 rounding, where a step's inputs are themselves of size ~ lr.
    tolerance = 1e-4 * max(moved, np.abs(exact).max(), 1e-3)
    assert np.abs(ours - exact).max() <= tolerance
