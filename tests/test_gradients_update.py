"""polyak.Optimizer's direct path: once state exists it calls torch's functional update instead
of ``Optimizer.step``. Same bits as plain torch, and ``step`` still runs whenever something
watches it (step hooks, LR schedulers) or must create state."""

import warnings

import pytest
import torch
from torch import nn
from torch.optim.adamw import adamw
from torch.optim.optimizer import register_optimizer_step_pre_hook

import polyak
from polyak import transforms as T
from polyak.gradients import _update
from polyak.gradients._update import functional_update

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-amsgrad-wd-max": lambda ps: torch.optim.Adam(
        ps, lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True
    ),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
    "adamw-fused-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True, amsgrad=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-nesterov-wd": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "sgd-foreach-dampening": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, dampening=0.2, foreach=True
    ),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "sgd-fused-plain": lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
}


def _model(device, flat):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(device)
    return polyak.flatten_parameters_(model) if flat else model


def _loss(model, i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(9, 5, generator=g).to(next(model.parameters()).device)
    return model(x).pow(2).mean()


class _CountSteps:
    """Counts calls of ``cls.step`` (patched on the class: instances stay unpatched)."""

    def __init__(self, monkeypatch, cls):
        self.calls = 0
        original = cls.step

        def step(opt, *args, **kwargs):
            self.calls += 1
            return original(opt, *args, **kwargs)

        monkeypatch.setattr(cls, "step", step)


@pytest.mark.parametrize("flat", [False, True], ids=["separate", "flat"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_direct_path_is_bit_identical_to_step(name, flat, device, monkeypatch):
    make = OPTIMIZERS[name]
    ref, model = _model(device, False), _model(device, flat)
    o_ref = make(list(ref.parameters()))
    opt = polyak.Optimizer(make(list(model.parameters())), [T.clip_by_global_norm(0.5)])
    for i in range(3):  # plain torch, with polyak's clipping
        o_ref.zero_grad()
        _loss(ref, i).backward()
        clipped, _ = polyak.clip_by_global_norm([p.grad for p in ref.parameters()], 0.5)
        for p, c in zip(ref.parameters(), clipped):
            p.grad = c
        o_ref.step()
    counter = _CountSteps(monkeypatch, type(opt.inner))
    for i in range(3):
        if i % 2:
            opt.minimize(_loss(model, i))
        else:
            opt.apply_gradients(opt.compute_gradients(_loss(model, i)))
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        for key, value in o_ref.state[p_ref].items():
            assert torch.equal(value, opt.inner.state[p][key]), key
    # Only the first step went through step() (the inner optimizer's, or on the flat path its
    # twin's): it creates the state, or for fused SGD checks devices; plain SGD needs neither.
    d = opt.inner.defaults
    stateless = isinstance(opt.inner, torch.optim.SGD) and not d["momentum"] and not d["fused"]
    assert counter.calls == (0 if stateless else 1)


def test_step_hooks_and_schedulers_still_see_every_step(monkeypatch):
    model = _model("cpu", False)
    opt = polyak.Optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    seen = []
    handle = opt.inner.register_step_post_hook(lambda o, args, kwargs: seen.append(1))
    for i in range(3):
        opt.minimize(_loss(model, i))
    assert len(seen) == 3
    handle.remove()

    everywhere = []
    handle = register_optimizer_step_pre_hook(
        lambda o, args, kwargs: everywhere.append(o)
    )
    try:
        opt.minimize(_loss(model, 3))
    finally:
        handle.remove()
    assert everywhere == [opt.inner]

    counter = _CountSteps(monkeypatch, torch.optim.Adam)  # before the scheduler wraps step
    scheduler = torch.optim.lr_scheduler.StepLR(opt.inner, 1, gamma=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(2):
            opt.minimize(_loss(model, 4 + i))
            scheduler.step()
    assert counter.calls == 2
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


def test_profiler_still_shows_optimizer_steps():
    model = _model("cpu", False)
    opt = polyak.Optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    opt.minimize(_loss(model, 0))  # state exists: later steps may go direct
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.minimize(_loss(model, 1))
    assert any(e.name == "Optimizer.step#Adam.step" for e in prof.events())


def test_adamw_on_torch_without_the_decoupled_flag(monkeypatch):
    """Before torch 2.7, AdamW has its own functional update: route to it when adam() has no
    decoupled_weight_decay, even if the group carries the key (a newer torch's state dict)."""
    ref, model = _model("cpu", False), _model("cpu", False)
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = polyak.Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    monkeypatch.setattr(_update, "_ADAM_DECOUPLES", False)
    routed = []
    monkeypatch.setattr(_update, "adamw", lambda *a, **k: routed.append(1) or adamw(*a, **k))
    for i in range(3):
        o_ref.zero_grad()
        _loss(ref, i).backward()
        o_ref.step()
        opt.minimize(_loss(model, i))
    assert len(routed) == 2  # the first step creates state through step()
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_differentiable_and_sparse_steps_are_left_to_step():
    w = nn.Parameter(torch.ones(3))
    grad = torch.full((3,), 0.5)
    for opt in (
        torch.optim.SGD([w], lr=0.1, differentiable=True),
        torch.optim.Adam([w], lr=0.1, differentiable=True),
    ):
        update = functional_update(opt)
        assert update is not None
        assert not update(opt.param_groups[0], [w], [grad])
    sgd = torch.optim.SGD([w], lr=0.1)
    sparse = torch.sparse_coo_tensor([[0]], [1.0], (3,), check_invariants=True)
    assert not functional_update(sgd)(sgd.param_groups[0], [w], [sparse])
    assert torch.equal(w, torch.ones(3))  # nothing moved
    assert functional_update(torch.optim.RMSprop([w])) is None
