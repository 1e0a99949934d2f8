"""exact_tf=True: variables follow TF's op sequence, bitwise equal to float32 TF."""

import numpy as np
import pytest
import torch
from torch import nn

import polyak
from polyak.step import GlobalStep

pytestmark = pytest.mark.numerics  # expected bits: run again with AVX-512 off


def tf_assign_moving_average(shadow, value, decay, num_updates=None):
    """TF 1.x ExponentialMovingAverage.apply on a variable, op by op in float32 (numpy)."""
    d = np.float32(decay)
    if num_updates is not None:
        n = np.float32(num_updates)
        d = np.minimum(d, (np.float32(1.0) + n) / (np.float32(10.0) + n))
    one_minus = np.float32(np.float32(1.0) - d)
    return (shadow - (shadow - value) * one_minus).astype(np.float32)


@pytest.mark.parametrize("decay", [0.999, 0.9, 0.5, 0.25, 0.0])
@pytest.mark.parametrize("counter", [None, "int", "global_step", "tensor"])
def test_variables_bitwise_tf(decay, counter):
    gen = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.randn(4096, generator=gen))
    step = GlobalStep(3)
    num_updates = {
        None: None,
        "int": 7,
        "global_step": step,
        "tensor": torch.tensor(5),
    }[counter]
    ema = polyak.ExponentialMovingAverage(decay, num_updates=num_updates, exact_tf=True)
    ema.apply([p])
    shadow = p.detach().numpy().copy()
    for _ in range(20):
        with torch.no_grad():
            p.add_(torch.randn(4096, generator=gen))
        n = {None: None, "int": 7, "global_step": step.value, "tensor": 5}[counter]
        ema.update()
        shadow = tf_assign_moving_average(shadow, p.detach().numpy(), decay, n)
        step.increment()
        np.testing.assert_array_equal(ema.average(p).numpy(), shadow)


def test_exact_and_fused_agree_to_an_ulp_per_step():
    gen = torch.Generator().manual_seed(2)
    model = nn.Linear(64, 64)
    polyak.flatten_parameters_(model)
    fused = polyak.ExponentialMovingAverage(0.99)
    exact = polyak.ExponentialMovingAverage(0.99, exact_tf=True)
    fused.apply(model)
    exact.apply(model)
    for _ in range(10):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=gen))
        fused.update()
        exact.update()
    for name in ("weight", "bias"):
        a, b = fused.average(name), exact.average(name)
        # Values here stay below ~10, where a float32 ulp is ~1e-6: a few ulps apart at most.
        assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_target_network_passes_exact_tf():
    net = nn.Linear(3, 2)
    target = polyak.TargetNetwork(net, tau=0.001, exact_tf=True)
    assert target.ema.exact_tf
    w0 = net.weight.detach().numpy().copy()
    with torch.no_grad():
        net.weight.add_(1.0)
    target.update()
    expected = tf_assign_moving_average(w0, net.weight.detach().numpy(), 1 - 0.001)
    np.testing.assert_array_equal(target.module.weight.detach().numpy(), expected)


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.999, 0.75])
def test_global_step_around_saturation_bitwise(decay):
    """Past some count TF's rule stops lowering the decay; polyak then skips the float32
    arithmetic. The weights on both sides of that count must still be TF's."""
    threshold = (10 * decay - 1) / (1 - decay)
    gen = torch.Generator().manual_seed(3)
    p = nn.Parameter(torch.randn(256, generator=gen))
    step = GlobalStep(max(0, int(threshold) - 6))
    ema = polyak.ExponentialMovingAverage(decay, num_updates=step, exact_tf=True)
    ema.apply([p])
    shadow = p.detach().numpy().copy()
    for _ in range(12):
        with torch.no_grad():
            p.add_(torch.randn(256, generator=gen))
        expected = tf_assign_moving_average(shadow, p.detach().numpy(), decay, step.value)
        ema.update()
        np.testing.assert_array_equal(ema.average(p).numpy(), expected)
        shadow = expected
        step.increment()


def test_num_updates_ratio_matches_float32_for_large_counts():
    from polyak.averaging.decay import num_updates_ratio as _num_updates_ratio

    for n in [0, 1, 9, 10**6, 2**24 - 17, 2**24 - 1, 2**24 + 1, 2**31 + 12345]:
        n32 = np.float32(n)
        expected = (np.float32(1.0) + n32) / (np.float32(10.0) + n32)
        assert _num_updates_ratio(n) == float(expected), n


def test_apply_without_var_list_steps_every_tracked_variable():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    ema = polyak.ExponentialMovingAverage(0.5)
    ema.track([a, b])
    with torch.no_grad():
        a.fill_(2.0)
        b.fill_(4.0)
    ema.apply()  # TF: var_list=None means every variable
    assert torch.equal(ema.average(a), torch.full((2,), 1.0))
    assert torch.equal(ema.average(b), torch.full((3,), 2.0))
    assert ema.step == 1
