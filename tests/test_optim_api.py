"""polyak.optim as torch optimizers: TF's signatures, param groups, LR schedulers, state dicts,
polyak.Optimizer, flat buffers, devices and dtypes, and the errors for bad input."""

import copy
import inspect
import io
import pickle

import numpy as np
import pytest
import torch
from tf1_numpy import Reference
from torch import nn

import polyak
import polyak.optim as po
from polyak.optim import _arrays as arrays
from polyak.optim import _base as base
from polyak.optim import _batches as batches

# The CPU update goes through NumPy with one torch thread (and foreach with more): test that.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL = {
    "GradientDescentOptimizer": {"learning_rate": 0.1},
    "MomentumOptimizer": {"learning_rate": 0.1, "momentum": 0.9, "use_nesterov": True},
    "AdamOptimizer": {"learning_rate": 0.01},
    "RMSPropOptimizer": {"learning_rate": 0.01, "momentum": 0.9, "centered": True},
    "AdagradOptimizer": {"learning_rate": 0.1},
    "AdadeltaOptimizer": {"learning_rate": 1.0},
    "FtrlOptimizer": {"learning_rate": 0.1, "l1_regularization_strength": 0.001, "beta": 0.1},
}


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))


def batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def train(net, opt, steps, start=0, scheduler=None):
    for i in range(start, start + steps):
        x, y = batch(i)
        opt.zero_grad()
        (net(x) - y).square().mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def weights(net):
    return [p.detach().clone() for p in net.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------- signatures


def test_tf1_names_arguments_and_defaults():
    expected = {
        "GradientDescentOptimizer": "(params, learning_rate)",
        "MomentumOptimizer": "(params, learning_rate, momentum, use_nesterov=False)",
        "AdamOptimizer": "(params, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-08)",
        "RMSPropOptimizer": "(params, learning_rate, decay=0.9, momentum=0.0, epsilon=1e-10, "
        "centered=False)",
        "AdagradOptimizer": "(params, learning_rate, initial_accumulator_value=0.1)",
        "AdadeltaOptimizer": "(params, learning_rate=0.001, rho=0.95, epsilon=1e-08)",
        "FtrlOptimizer": "(params, learning_rate, learning_rate_power=-0.5, "
        "initial_accumulator_value=0.1, l1_regularization_strength=0.0, "
        "l2_regularization_strength=0.0, l2_shrinkage_regularization_strength=0.0, beta=0.0)",
    }
    for name, signature in expected.items():
        cls = getattr(po, name)
        params = inspect.signature(cls).parameters.values()
        got = (
            "("
            + ", ".join(
                p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params
            )
            + ")"
        )
        assert got == signature, name
        assert issubclass(cls, torch.optim.Optimizer)
    assert polyak.optim is po


@pytest.mark.parametrize("name", sorted(ALL))
def test_groups_carry_lr_and_the_tf_hyper_parameters(name):
    opt = getattr(po, name)(model().parameters(), **ALL[name])
    group = opt.param_groups[0]
    assert group["lr"] == ALL[name]["learning_rate"]
    for key, value in ALL[name].items():
        if key != "learning_rate":
            assert group[key] == value


# ---------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_state_dict_round_trip_mid_run_continues_bit_for_bit(name, how):
    net = model()
    opt = getattr(po, name)(net.parameters(), **ALL[name])
    train(net, opt, 4)
    saved_weights = weights(net)
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
    else:
        state = copy.deepcopy(opt.state_dict())
    train(net, opt, 4, start=4)
    resumed = model(seed=1)
    with torch.no_grad():
        for p, w in zip(resumed.parameters(), saved_weights):
            p.copy_(w)
    opt2 = getattr(po, name)(resumed.parameters(), **ALL[name])
    opt2.load_state_dict(state)
    train(resumed, opt2, 4, start=4)
    assert same(weights(net), weights(resumed))


def test_loaded_state_is_not_shared_with_the_state_dict():
    net = model()
    opt = po.AdamOptimizer(net.parameters(), 0.01)
    train(net, opt, 2)
    state = opt.state_dict()
    opt.load_state_dict(state)
    before = [t.clone() for entry in state["state"].values() for t in entry.values()]
    train(net, opt, 1, start=2)
    after = [t for entry in state["state"].values() for t in entry.values()]
    assert same(before, after)


@pytest.mark.parametrize(
    "other",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: po.RMSPropOptimizer(ps, 0.01),
        lambda ps: po.AdamOptimizer(ps[:1], 0.01),
    ],
    ids=["torch-adam", "tf-rmsprop", "fewer-params"],
)
def test_a_state_dict_of_another_optimizer_is_refused_and_nothing_changes(other):
    net = model()
    opt = po.AdamOptimizer(net.parameters(), 0.01)
    train(net, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    donor_net = model()
    donor = other(list(donor_net.parameters()))
    train(donor_net, donor, 2)
    with pytest.raises(ValueError, match=r"AdamOptimizer\.load_state_dict"):
        opt.load_state_dict(donor.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, entry in before["state"].items():
        assert same(entry.values(), after["state"][key].values())


def test_a_state_dict_with_wrong_slot_shapes_is_refused():
    net = model()
    opt = po.AdagradOptimizer(net.parameters(), 0.1)
    train(net, opt, 1)
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["accumulator"] = torch.zeros(2)
    with pytest.raises(ValueError, match="slot 'accumulator' of parameter 0"):
        opt.load_state_dict(state)


def test_pickle_and_deepcopy_keep_working():
    net = model()
    opt = po.RMSPropOptimizer(net.parameters(), 0.01)
    train(net, opt, 1)
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    pickle.loads(pickle.dumps(opt))
    # a copy of model and optimizer together steps its own weights (no views of the original's
    # memory survive the copy), as the original steps its own
    net_copy, opt_copy = copy.deepcopy((net, opt))
    train(net, opt, 2, start=1)
    train(net_copy, opt_copy, 2, start=1)
    assert same(weights(net), weights(net_copy))


# ---------------------------------------------------------------------- schedules, groups


def test_lr_schedulers_drive_the_learning_rate():
    net, manual = model(), model()
    opt = po.GradientDescentOptimizer(net.parameters(), 0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    train(net, opt, 5, scheduler=scheduler)
    opt_manual = po.GradientDescentOptimizer(manual.parameters(), 0.5)
    for i, lr in enumerate([0.5, 0.5, 0.05, 0.05, 0.005]):
        opt_manual.param_groups[0]["lr"] = 0.5 * 0.1 ** (i // 2)
        assert opt_manual.param_groups[0]["lr"] == pytest.approx(lr)
        train(manual, opt_manual, 1, start=i)
    assert same(weights(net), weights(manual))


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t)),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
    ],
    ids=["lambda", "cosine", "one-cycle"],
)
def test_other_schedulers_run(make):
    net = model()
    opt = po.MomentumOptimizer(net.parameters(), 0.05, momentum=0.9)
    scheduler = make(opt)
    train(net, opt, 6, scheduler=scheduler)
    assert opt.param_groups[0]["lr"] == scheduler.get_last_lr()[0]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_param_groups_step_as_separate_optimizers():
    grads = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    a, b = nn.Parameter(torch.ones(5)), nn.Parameter(torch.ones(5))
    opt = po.AdamOptimizer(
        [{"params": [a]}, {"params": [b], "lr": 0.1, "beta1": 0.5, "epsilon": 1.0}], 0.01
    )
    alone_a, alone_b = nn.Parameter(torch.ones(5)), nn.Parameter(torch.ones(5))
    single_a = po.AdamOptimizer([alone_a], 0.01)
    single_b = po.AdamOptimizer([alone_b], 0.1, beta1=0.5, epsilon=1.0)
    for g in grads:
        for p in (a, b, alone_a, alone_b):
            p.grad = g
        for o in (opt, single_a, single_b):
            o.step()
    assert torch.equal(a, alone_a) and torch.equal(b, alone_b)
    assert opt.param_groups[1]["beta1_power"] == np.float32(0.5) ** 5


def test_adam_powers_advance_once_per_step_even_without_a_gradient():
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(3))
    opt = po.AdamOptimizer([{"params": [a]}, {"params": [b]}], 0.1)
    for _ in range(3):
        a.grad = torch.ones(3)
        opt.step()
    f32 = np.float32
    assert opt.param_groups[1]["beta1_power"] == f32(
        f32(f32(f32(0.9) * f32(0.9)) * f32(0.9)) * f32(0.9)
    )
    assert torch.equal(b.detach(), torch.ones(3)) and not opt.state[b]
    # b's first step, at step 4, is bias-corrected as TF's: with the optimizer's powers.
    b.grad, a.grad = torch.ones(3), None
    opt.step()
    lr_t = 0.1 * np.sqrt(1 - 0.999**4) / (1 - 0.9**4)  # torch's Adam would use t = 1 for b
    m_over_root_v = (1 - 0.9) / np.sqrt(1 - 0.999)
    assert b[0].item() == pytest.approx(1 - lr_t * m_over_root_v, rel=1e-5)


def test_a_step_without_any_gradient_changes_nothing():
    net = model()
    opt = po.AdamOptimizer(net.parameters(), 0.1)
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.step()
    after = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert after == before and not opt.state


def test_added_groups_can_continue_the_optimizers_powers():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = po.AdamOptimizer([a], 0.1)
    a.grad = torch.ones(2)
    opt.step()
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["beta1_power"] == np.float32(0.9)
    c = nn.Parameter(torch.ones(2))
    opt.add_param_group(
        {
            "params": [c],
            "beta1_power": opt.param_groups[0]["beta1_power"],
            "beta2_power": opt.param_groups[0]["beta2_power"],
        }
    )
    assert opt.param_groups[2]["beta1_power"] == opt.param_groups[0]["beta1_power"]


def test_closure():
    net = model()
    opt = po.AdagradOptimizer(net.parameters(), 0.1)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        return loss

    assert opt.step(closure) is not None


# ---------------------------------------------------------------------- polyak.Optimizer, flat


@pytest.mark.parametrize("name", sorted(ALL))
def test_polyak_optimizer_apply_gradients_with_global_step(name):
    direct, wrapped = model(), model()
    train(direct, getattr(po, name)(direct.parameters(), **ALL[name]), 3)
    opt = polyak.Optimizer(getattr(po, name)(wrapped.parameters(), **ALL[name]))
    step = polyak.GlobalStep()
    for i in range(3):
        x, y = batch(i)
        gv = opt.compute_gradients((wrapped(x) - y).square().mean())
        opt.apply_gradients(gv, global_step=step)
    assert step.value == 3
    assert same(weights(direct), weights(wrapped))


@pytest.mark.parametrize("path", ["numpy", "foreach"])
@pytest.mark.parametrize("name", sorted(ALL))
def test_flattened_model_steps_one_buffer_and_the_same_bits(name, path, monkeypatch):
    if path == "foreach":
        monkeypatch.setattr(base, "ARRAY_DTYPES", frozenset())
    plain, flat = model(), model()
    polyak.flatten_parameters_(flat)
    train(plain, getattr(po, name)(plain.parameters(), **ALL[name]), 3)
    cls = getattr(po, name)
    operands = []
    real = cls._update

    def spy(self, s, ops, params, *rest):
        operands.append(params)
        return real(self, s, ops, params, *rest)

    monkeypatch.setattr(cls, "_update", spy)
    opt = cls(flat.parameters(), **ALL[name])
    train(flat, opt, 3)
    assert same(weights(plain), weights(flat))
    # one call a step, on one run: parameters, gradients and slots are contiguous
    total = sum(p.numel() for p in flat.parameters())
    assert len(operands) == 3
    last = operands[-1]
    if isinstance(last, np.ndarray):
        assert last.shape == (total,) and np.shares_memory(last, as_numpy(flat[0].weight))
    else:
        assert [t.numel() for t in last] == [total]


def as_numpy(t):
    return t.detach().numpy()


@pytest.mark.parametrize("name", sorted(ALL))
def test_the_accelerator_formulation_gives_the_same_bits(name, monkeypatch):
    """Off the CPU the update runs torch's foreach operations with separate products and fresh
    temporaries (CUDA's foreach kernels contract ``x + c * (y / z)``), where the CPU's goes
    through NumPy: run that formulation here: the same bits."""
    import polyak.optim._exact as exact

    cpu, accelerator = model(), model()
    train(cpu, getattr(po, name)(cpu.parameters(), **ALL[name]), 3)
    monkeypatch.setattr(base, "ARRAY_DTYPES", frozenset())
    monkeypatch.setattr(exact, "_fused", lambda t: False)
    monkeypatch.setattr(exact.Reused, "_out", lambda self, k, like: None)
    train(accelerator, getattr(po, name)(accelerator.parameters(), **ALL[name]), 3)
    assert same(weights(cpu), weights(accelerator))


def test_minimize_on_a_flattened_model_through_polyak_optimizer():
    plain, flat = model(), model()
    polyak.flatten_parameters_(flat)
    for net in (plain, flat):
        opt = polyak.Optimizer(
            po.RMSPropOptimizer(net.parameters(), 0.01, momentum=0.9),
            [polyak.transforms.clip_by_global_norm(1.0)],
        )
        for i in range(3):
            x, y = batch(i)
            opt.minimize((net(x) - y).square().mean())
    assert same(weights(plain), weights(flat))


@pytest.mark.parametrize("path", ["numpy", "foreach"])
def test_cpu_pieces_give_the_same_bits(path, monkeypatch):
    """Chunks (NumPy) or pieces (foreach) of a few KiB, which cut tensors, against one batch."""
    a, b = nn.Linear(300, 300), nn.Linear(300, 300)
    b.load_state_dict(a.state_dict())
    if path == "foreach":
        monkeypatch.setattr(base, "ARRAY_DTYPES", frozenset())
    x = torch.randn(4, 300)
    for net, size in ((a, 1 << 30), (b, 4096)):
        monkeypatch.setattr(arrays, "CHUNK_BYTES", size)
        monkeypatch.setattr(batches, "CPU_PIECE_BYTES", size)
        opt = po.AdamOptimizer(net.parameters(), 0.01)
        for _ in range(2):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    assert same(weights(a), weights(b))


def test_device_and_dtype(device):
    for dtype in (torch.float32, torch.float64):
        p = nn.Parameter(torch.randn(5, 7, device=device, dtype=dtype))
        opt = po.AdamOptimizer([p], 0.1)
        p.grad = torch.randn_like(p)
        opt.step()
        assert opt.state[p]["m"].device == p.device and opt.state[p]["m"].dtype == dtype


@pytest.mark.parametrize("name", sorted(ALL))
def test_float16_rounds_every_op_to_float16_as_tf(name):
    """TF casts hyper-parameters to the variable's dtype and computes in it; so does polyak
    (NumPy's float16 arithmetic rounds each operation the same way)."""
    x = np.linspace(-1, 1, 37).astype(np.float16)
    grads = [np.linspace(0.5, -0.25, 37).astype(np.float16) * np.float16(s) for s in (1, 3, 0.1)]
    p = nn.Parameter(torch.from_numpy(x.copy()))
    opt = getattr(po, name)([p], **ALL[name])
    reference = Reference(name, ALL[name], x)
    expected = x
    with np.errstate(all="ignore"):
        for g in grads:
            p.grad = torch.from_numpy(g)
            opt.step()
            expected = reference.step(expected, g, ALL[name]["learning_rate"])
    np.testing.assert_array_equal(p.detach().numpy(), expected)


def test_half_precision_hyper_parameters_round_as_in_tf():
    """bfloat16 rounds beta2=0.999 to 1.0: v never grows, as in TF (keep float32 weights)."""
    p = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = po.AdamOptimizer([p])
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(opt.state[p]["v"], torch.zeros(4, dtype=torch.bfloat16))


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "kwargs", "culprit"),
    [
        ("GradientDescentOptimizer", {"learning_rate": -0.1}, "learning_rate must be >= 0"),
        (
            "GradientDescentOptimizer",
            {"learning_rate": float("nan")},
            "learning_rate must be finite",
        ),
        (
            "MomentumOptimizer",
            {"learning_rate": 0.1, "momentum": 1.0},
            r"momentum must be in \[0, 1\)",
        ),
        ("MomentumOptimizer", {"learning_rate": 0.1, "momentum": -0.1}, "momentum"),
        ("AdamOptimizer", {"epsilon": -1e-8}, "epsilon must be >= 0"),
        ("AdamOptimizer", {"beta1": 1.0}, "beta1"),
        ("AdamOptimizer", {"beta2": 1.5}, "beta2"),
        ("RMSPropOptimizer", {"learning_rate": 0.1, "epsilon": -1.0}, "epsilon"),
        ("RMSPropOptimizer", {"learning_rate": 0.1, "decay": 1.1}, "decay"),
        ("RMSPropOptimizer", {"learning_rate": 0.1, "momentum": 1.0}, "momentum"),
        (
            "AdagradOptimizer",
            {"learning_rate": 0.1, "initial_accumulator_value": 0.0},
            "initial_accumulator_value must be > 0",
        ),
        ("AdadeltaOptimizer", {"rho": -0.5}, "rho"),
        ("FtrlOptimizer", {"learning_rate": 0.0}, "learning_rate must be > 0"),
        (
            "FtrlOptimizer",
            {"learning_rate": 0.1, "learning_rate_power": 0.5},
            "learning_rate_power must be <= 0",
        ),
        (
            "FtrlOptimizer",
            {"learning_rate": 0.1, "initial_accumulator_value": -1.0},
            "initial_accumulator_value",
        ),
        (
            "FtrlOptimizer",
            {"learning_rate": 0.1, "l1_regularization_strength": -1.0},
            "l1_regularization_strength",
        ),
        (
            "FtrlOptimizer",
            {"learning_rate": 0.1, "l2_shrinkage_regularization_strength": -1.0},
            "l2_shrinkage",
        ),
    ],
)
def test_bad_hyper_parameters_raise_value_error_naming_them(name, kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        getattr(po, name)(model().parameters(), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": torch.tensor(0.1)},
        {"learning_rate": "0.1"},
        {"learning_rate": 0.1, "momentum": True},
    ],
)
def test_non_numbers_raise_type_error(kwargs):
    with pytest.raises(TypeError, match=r"learning_rate|momentum"):
        po.MomentumOptimizer(model().parameters(), **{"momentum": 0.5, **kwargs})


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_non_real_floating_parameters_raise_type_error(dtype):
    p = torch.zeros(3, dtype=dtype, requires_grad=dtype.is_complex)
    with pytest.raises(TypeError, match=f"parameter 1 of param group 0 is {dtype}"):
        po.AdamOptimizer([nn.Parameter(torch.zeros(2)), p])


def test_a_bad_group_value_fails_the_step_before_anything_changes():
    net = model()
    opt = po.RMSPropOptimizer(net.parameters(), 0.01)
    train(net, opt, 1)
    before_w, before_s = weights(net), copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["lr"] = -1.0  # e.g. a scheduler gone wrong
    x, y = batch(9)
    (net(x) - y).square().mean().backward()
    with pytest.raises(ValueError, match="'lr' of param group 0 must be >= 0"):
        opt.step()
    assert same(weights(net), before_w)
    assert same(
        [t for e in before_s["state"].values() for t in e.values()],
        [t for e in opt.state_dict()["state"].values() for t in e.values()],
    )


def test_a_parameter_listed_twice_is_refused():
    """It was updated twice per step (torch only warns about it)."""
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="parameter 1 of param group 0 is parameter 0 again"):
        po.GradientDescentOptimizer([p, p], 1.0)
    opt = po.GradientDescentOptimizer([p], 1.0)
    q = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="parameter 2 of param group 1 is parameter 0 again"):
        opt.add_param_group({"params": [q, nn.Parameter(torch.zeros(1)), q]})
    assert len(opt.param_groups) == 1


def test_a_state_dict_whose_slots_cannot_load_is_refused_before_loading():
    """A sparse slot made load_state_dict fail after torch had replaced the state; state keys
    that are strings (a JSON round trip) were dropped silently."""
    net = model()
    opt = po.AdamOptimizer(net.parameters(), 0.01)
    train(net, opt, 1)
    before = copy.deepcopy(opt.state_dict())
    sparse = copy.deepcopy(before)
    sparse["state"][0]["m"] = sparse["state"][0]["m"].to_sparse()
    with pytest.raises(TypeError, match=r"slot 'm' of parameter 0 is a torch.sparse_coo"):
        opt.load_state_dict(sparse)
    strings = {**before, "state": {str(k): v for k, v in before["state"].items()}}
    with pytest.raises(ValueError, match=r"parameter ids \['0', '1'"):
        opt.load_state_dict(strings)
    for k, entry in before["state"].items():
        for slot, value in entry.items():
            assert torch.equal(opt.state_dict()["state"][k][slot], value)


def test_add_param_group_checks_before_adding():
    opt = po.AdamOptimizer([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="'epsilon' of param group 1"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "epsilon": -1.0})
    with pytest.raises(ValueError, match="'lr'"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "learning_rate": 0.1})
    assert len(opt.param_groups) == 1
