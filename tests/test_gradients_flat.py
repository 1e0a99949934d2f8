"""The flat fast path: optimizer steps on flattened buffers are bit-identical to plain torch."""

import copy
import io

import pytest
import torch
from torch import nn

import polyak
from polyak import transforms as T

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
}


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 7), nn.Linear(7, 2)).to(
        device
    )


def _loss(model, i, device):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(9, 5, generator=g).to(device)
    return model(x).pow(2).mean()


def _reference_step(model, opt, loss, clip):
    opt.zero_grad()
    loss.backward()
    clipped, _ = polyak.clip_by_global_norm([p.grad for p in model.parameters()], clip)
    for p, c in zip(model.parameters(), clipped):
        p.grad = c
    opt.step()


def _shares_storage(opt):
    """True when each per-parameter state entry of the inner optimizer lives in one flat tensor."""
    ptrs = {}
    for entry in opt.inner.state.values():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                ptrs.setdefault(k, set()).add(v.untyped_storage().data_ptr())
    return bool(ptrs) and all(len(p) == 1 for p in ptrs.values())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_flat_path_is_bit_identical_with_scheduler(name, device):
    make = OPTIMIZERS[name]
    ref, flat = _model(device), polyak.flatten_parameters_(_model(device))
    o_ref = make(ref.parameters())
    opt = polyak.Optimizer(make(flat.parameters()), [T.clip_by_global_norm(0.5)])
    s_ref = torch.optim.lr_scheduler.ExponentialLR(o_ref, 0.9)
    s_flat = torch.optim.lr_scheduler.ExponentialLR(opt.inner, 0.9)
    for i in range(4):
        _reference_step(ref, o_ref, _loss(ref, i, device), 0.5)
        s_ref.step()
        if i % 2:
            opt.minimize(_loss(flat, i, device))
        else:
            opt.apply_gradients(opt.compute_gradients(_loss(flat, i, device)))
        s_flat.step()
    for a, b in zip(ref.parameters(), flat.parameters()):
        assert torch.equal(a, b)
    # fused CPU kernels are kept per tensor (their rounding depends on alignment)
    assert _shares_storage(opt) == (name != "adam-fused" or device.type != "cpu")
    # the wrapper's state dict loads into a plain optimizer that then continues identically
    plain_model = copy.deepcopy(flat)
    plain = make(plain_model.parameters())
    plain.load_state_dict(copy.deepcopy(opt.state_dict())["inner"])
    _reference_step(ref, o_ref, _loss(ref, 9, device), 0.5)
    _reference_step(plain_model, plain, _loss(plain_model, 9, device), 0.5)
    for a, b in zip(ref.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_fallback_when_flatness_breaks_and_back(device):
    make = OPTIMIZERS["adam"]
    ref, flat = _model(device), polyak.flatten_parameters_(_model(device))
    o_ref, opt = make(ref.parameters()), polyak.Optimizer(make(flat.parameters()))
    pairs = list(zip(ref.parameters(), flat.parameters()))

    def both(i, var_index=None):
        o_ref.zero_grad()
        _loss(ref, i, device).backward()
        if var_index is not None:  # only some variables get a step
            for j, p in enumerate(ref.parameters()):
                if j not in var_index:
                    p.grad = None
        o_ref.step()
        params = list(flat.parameters())
        var_list = None if var_index is None else [params[j] for j in var_index]
        opt.minimize(_loss(flat, i, device), var_list=var_list)
        for a, b in pairs:
            assert torch.equal(a, b)

    both(0)  # flat
    both(1, var_index=[0, 1, 4])  # a subset: fallback to inner.step
    both(2)  # back on the flat path (scalar state differs per param now: stays per-tensor)
    with torch.no_grad():  # take one parameter out of the buffer
        p = next(flat.parameters())
        p.data = p.data.clone()
    both(3)
    polyak.flatten_parameters_(flat)  # re-flatten: flat again
    both(4)


def test_uniform_state_returns_to_flat_path():
    ref, flat = _model("cpu"), polyak.flatten_parameters_(_model("cpu"))
    o_ref = OPTIMIZERS["sgd"](ref.parameters())
    opt = polyak.Optimizer(OPTIMIZERS["sgd"](flat.parameters()))
    for i in range(3):
        o_ref.zero_grad()
        _loss(ref, i, "cpu").backward()
        o_ref.step()
        if i == 1:  # one per-tensor step via a state reload, then flat again
            opt.inner.load_state_dict(copy.deepcopy(opt.inner.state_dict()))
        opt.minimize(_loss(flat, i, "cpu"))
    assert _shares_storage(opt)
    for a, b in zip(ref.parameters(), flat.parameters()):
        assert torch.equal(a, b)


def test_skip_nonfinite_on_flat_path():
    flat = polyak.flatten_parameters_(_model("cpu"))
    opt = polyak.Optimizer(OPTIMIZERS["adam"](flat.parameters()), [T.skip_nonfinite()])
    opt.minimize(_loss(flat, 0, "cpu"))
    params = copy.deepcopy(list(flat.parameters()))
    state = copy.deepcopy(opt.state_dict())
    opt.minimize(_loss(flat, 1, "cpu") * float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(params, flat.parameters()))
    after = opt.state_dict()["inner"]["state"]
    for k, entry in state["inner"]["state"].items():
        for n, v in entry.items():
            assert torch.equal(after[k][n], v)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_cpu_chunked_flat_twin_is_bit_identical(name, monkeypatch):
    """On the CPU, for-loop optimizers step the flat buffer in L2-sized pieces (cut at
    parameter boundaries): same bits as plain torch, state still flat."""
    from polyak.grad import stepping

    monkeypatch.setattr(stepping, "_CPU_CHUNK", 40)
    make = OPTIMIZERS[name]
    ref, flat = _model("cpu"), polyak.flatten_parameters_(_model("cpu"))
    o_ref = make(ref.parameters())
    opt = polyak.Optimizer(make(flat.parameters()), [T.clip_by_global_norm(0.5)])
    for i in range(4):
        _reference_step(ref, o_ref, _loss(ref, i, "cpu"), 0.5)
        opt.minimize(_loss(flat, i, "cpu"))
    for a, b in zip(ref.parameters(), flat.parameters()):
        assert torch.equal(a, b)
    (twin,) = opt._stepper._twins.values()
    assert 1 < len(twin.runs) < len(list(flat.parameters()))


# Parameters over the CPU piece size (2**17 elements) are pieces of their own, in their own
# shape: state merged from per-parameter state (a resume, a re-flatten) must take that shape.
CPU_DEFAULTS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


def _big_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(600, 300), nn.Tanh(), nn.Linear(300, 10))


def _big_loss(model, i):
    x = torch.randn(8, 600, generator=torch.Generator().manual_seed(i))
    return model(x).square().mean()


def _plain_step(model, opt, i):
    opt.zero_grad()
    _big_loss(model, i).backward()
    opt.step()


def _assert_same(ref, model):
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(CPU_DEFAULTS))
def test_resume_into_a_fresh_flat_model_is_bit_identical(name):
    make = CPU_DEFAULTS[name]
    ref, flat = _big_model(), polyak.flatten_parameters_(_big_model())
    o_ref, opt = make(ref.parameters()), polyak.Optimizer(make(flat.parameters()))
    for i in range(3):
        _plain_step(ref, o_ref, i)
        opt.minimize(_big_loss(flat, i))
    saved = _round_trip({"model": flat.state_dict(), "opt": opt.state_dict()})
    resumed = polyak.flatten_parameters_(_big_model())
    resumed.load_state_dict(saved["model"])
    opt2 = polyak.Optimizer(make(resumed.parameters()))
    opt2.load_state_dict(saved["opt"])
    for i in range(3, 6):
        _plain_step(ref, o_ref, i)
        opt2.minimize(_big_loss(resumed, i))
        _assert_same(ref, resumed)
    assert opt2._stepper._twins  # back on the flat path, not a fallback


@pytest.mark.parametrize("name", list(CPU_DEFAULTS))
def test_reflatten_and_replaced_storage_mid_training_are_bit_identical(name):
    make = CPU_DEFAULTS[name]
    ref, flat = _big_model(), polyak.flatten_parameters_(_big_model())
    o_ref, opt = make(ref.parameters()), polyak.Optimizer(make(flat.parameters()))
    for i in range(8):
        if i == 2:
            polyak.flatten_parameters_(flat)  # new buffers: state merged anew
        if i == 4:
            with torch.no_grad():  # one parameter leaves the buffer: a fallback, then flat
                flat[2].weight.data = flat[2].weight.data.clone()
        if i == 6:
            polyak.flatten_parameters_(flat)
        _plain_step(ref, o_ref, i)
        opt.minimize(_big_loss(flat, i))
        _assert_same(ref, flat)
    assert opt._stepper._twins


class _Scalars(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return ((self.a + self.b) * x).square().mean()  # equal gradients: equal moments


def test_resume_with_zero_dim_parameters_keeps_their_moments_per_parameter():
    ref, flat = _Scalars(), polyak.flatten_parameters_(_Scalars())
    o_ref, opt = torch.optim.Adam(ref.parameters()), polyak.Optimizer(
        torch.optim.Adam(flat.parameters())
    )
    x = torch.arange(4.0)
    for _ in range(2):
        o_ref.zero_grad()
        ref(x).backward()
        o_ref.step()
        opt.minimize(flat(x))
    saved = _round_trip({"model": flat.state_dict(), "opt": opt.state_dict()})
    resumed = polyak.flatten_parameters_(_Scalars())
    resumed.load_state_dict(saved["model"])
    opt2 = polyak.Optimizer(torch.optim.Adam(resumed.parameters()))
    opt2.load_state_dict(saved["opt"])
    for _ in range(2):
        o_ref.zero_grad()
        ref(x).backward()
        o_ref.step()
        opt2.minimize(resumed(x))
        _assert_same(ref, resumed)
    assert opt2._stepper._twins
