"""polyak.Optimizer's update goes through the inner optimizer's ``step``: the same bits as
plain torch for every optimizer mode, flat or not, and step hooks, LR schedulers and the
profiler see every step."""

import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import polyak
from polyak import transforms as T

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
def test_steps_are_bit_identical_to_plain_torch(name, flat, device):
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
    opt.minimize(_loss(model, 0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.minimize(_loss(model, 1))
    assert any(e.name == "Optimizer.step#Adam.step" for e in prof.events())
