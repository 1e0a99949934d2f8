"""TargetNetwork: soft (Polyak) and hard (periodic copy) target networks."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

import polyak
from polyak import ExponentialMovingAverage, TargetNetwork


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))


def step(model: nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_starts_equal_and_callable(device):
    online = net().to(device)
    target = TargetNetwork(online, tau=0.01)
    x = torch.randn(4, 3, device=device)
    assert torch.equal(target(x), online(x))
    for (n, p), (_, q) in zip(target.module.named_parameters(), online.named_parameters()):
        assert torch.equal(p, q), n
        assert p is not q and p.data_ptr() != q.data_ptr()
        assert not p.requires_grad
        assert p.data_ptr() == target.ema.average(n).data_ptr()
    assert target.ema.step == 0


@pytest.mark.parametrize("tau", [0.005, 0.001, 0.3, 1.0])
def test_soft_equals_ema_with_decay_one_minus_tau(tau):
    online = net()
    target = TargetNetwork(online, tau=tau)
    twin = net()
    ema = ExponentialMovingAverage(1 - tau)
    ema.track(twin)
    ref = {n: p.double() for n, p in params(online).items()}
    for i in range(5):
        torch.manual_seed(100 + i)
        step(online)
        torch.manual_seed(100 + i)
        step(twin)
        target.update()
        ema.update()
        ref = {n: (1 - tau) * ref[n] + tau * p.double() for n, p in params(online).items()}
    for n, p in target.module.named_parameters():
        assert torch.equal(p, ema.average(n)), n
        torch.testing.assert_close(p.double(), ref[n], rtol=1e-6, atol=1e-6)


def test_default_tau():
    online = net()
    target = TargetNetwork(online)
    before = params(online)
    step(online)
    target.update()
    for n, p in target.module.named_parameters():
        expected = 0.995 * before[n].double() + 0.005 * dict(online.named_parameters())[n].double()
        torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-7)


def test_hard_copies_every_n():
    online = net()
    target = TargetNetwork(online, every=3)
    snapshot = params(online)
    x = torch.randn(5, 3)
    for call in range(1, 10):
        step(online)
        target.update()
        if call % 3 == 0:
            snapshot = params(online)
            assert torch.equal(target(x), online(x))
        for n, p in target.module.named_parameters():
            assert torch.equal(p, snapshot[n]), (call, n)


@pytest.mark.parametrize("flat", [False, True])
def test_hard_copy_is_a_copy_even_of_infinities(flat):
    """A hard copy copies: an inf in the online weights arrives as inf (not the NaN of
    ``b - (b - a) * 0``), and a target holding an inf becomes finite again at the next copy."""
    online = net()
    if flat:
        polyak.flatten_parameters_(online)  # one buffer: the single-span hot path
    target = TargetNetwork(online, every=2)
    weight = online[0].weight
    with torch.no_grad():
        weight[0, 0] = float("inf")
    target.update()
    target.update()
    assert torch.equal(target.module[0].weight, weight)
    with torch.no_grad():
        weight[0, 0] = 1.5
    target.update()
    target.update()
    for (_, p), (_, q) in zip(target.module.named_parameters(), online.named_parameters()):
        assert torch.equal(p, q)
    # The same through a plain EMA with decay 0 (the general, per-span path).
    ema = ExponentialMovingAverage(0.0)
    a, c = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(2))
    b = torch.tensor([1.0, float("-inf"), 2.0, 3.0])
    ema.apply([a, c])
    with torch.no_grad():
        a.copy_(b)
    ema.apply([a, c])
    assert torch.equal(ema.average(a), b)


def test_tau_zero_freezes():
    online = net()
    target = TargetNetwork(online, tau=0.0)
    start = params(online)
    step(online)
    target.update()
    for n, p in target.module.named_parameters():
        assert torch.equal(p, start[n])


def test_batchnorm_buffers_follow():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = TargetNetwork(online, tau=0.5)
    mean0 = online[1].running_mean.clone()
    online.train()
    online(torch.randn(16, 3))
    target.update()
    torch.testing.assert_close(
        target.module[1].running_mean, 0.5 * mean0 + 0.5 * online[1].running_mean
    )
    assert int(target.module[1].num_batches_tracked) == 1


def test_no_gradient_into_target():
    online = net()
    target = TargetNetwork(online, tau=0.1)
    x = torch.randn(2, 3, requires_grad=True)
    y = target(x).sum() + online(x).sum()
    y.backward()
    assert x.grad is not None
    assert all(p.grad is None for p in target.module.parameters())
    assert all(p.grad is not None for p in online.parameters())


@pytest.mark.parametrize("kwargs", [{"tau": 0.05}, {"every": 4}])
def test_state_dict_round_trip(kwargs):
    online = net()
    target = TargetNetwork(online, **kwargs)
    for _ in range(6):  # hard: copies at 4, two calls towards the next
        step(online)
        target.update()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "target.pt")
        torch.save(target.state_dict(), path)
        loaded = torch.load(path, weights_only=True)
    online2 = net(seed=1)
    online2.load_state_dict(online.state_dict())
    target2 = TargetNetwork(online2, **kwargs)
    target2.load_state_dict(loaded)
    x = torch.randn(4, 3)
    assert torch.equal(target2(x), target(x))
    for i in range(4):
        torch.manual_seed(i)
        step(online)
        torch.manual_seed(i)
        step(online2)
        target.update()
        target2.update()
        for (n, p), (_, q) in zip(
            target.module.named_parameters(), target2.module.named_parameters()
        ):
            assert torch.equal(p, q), (i, n)
    if "every" in kwargs:  # 6 + 2 = 8: a copy happened at the second of the four
        for n, p in target2.module.named_parameters():
            assert not torch.equal(p, dict(online2.named_parameters())[n])


def test_to_dtype_rebuilds_module():
    online = net()
    target = TargetNetwork(online, tau=0.5)
    target.to(dtype=torch.float64)
    for n, p in target.module.named_parameters():
        assert p.dtype == torch.float64
        assert p.data_ptr() == target.ema.average(n).data_ptr()
    before = {n: p.clone() for n, p in target.module.named_parameters()}
    step(online)
    target.update()
    for n, p in target.module.named_parameters():
        expected = 0.5 * before[n] + 0.5 * dict(online.named_parameters())[n].double()
        torch.testing.assert_close(p, expected)
    assert target(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs",
    [{"tau": 0.1, "every": 2}, {"tau": 1.5}, {"tau": -0.1}, {"every": 0}, {"every": 2.0}],
)
def test_invalid(kwargs):
    with pytest.raises((ValueError, TypeError), match=r"tau|every"):
        TargetNetwork(net(), **kwargs)
