"""polyak.transforms: hand-worked formulas, skip/accumulate semantics, state_dict round trips."""

import copy
import math

import pytest
import torch
from torch import nn

import polyak
from polyak import transforms as T
from polyak.grad.transforms import GradientStep


def _run(transform, grads, params=None, names=None):
    params = params or [torch.zeros_like(g) for g in grads]
    step = GradientStep(
        params, [g.clone() for g in grads], names or [str(i) for i in range(len(grads))]
    )
    transform(step)
    return step


def test_clip_by_value_and_scale():
    step = _run(
        T.chain(T.clip_by_value(-1.0, 1.0), T.scale(-2.0)), [torch.tensor([-3.0, 0.25, 2.0])]
    )
    torch.testing.assert_close(step.grads[0], torch.tensor([2.0, -0.5, -2.0]))
    with pytest.raises(ValueError, match="lo <= hi"):
        T.clip_by_value(1.0, -1.0)


def test_clip_by_norm_per_tensor():
    step = _run(
        T.clip_by_norm(1.0), [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4]), torch.zeros(2)]
    )
    torch.testing.assert_close(step.grads[0], torch.tensor([3.0, 4.0]) * 1.0 / 5.0)
    torch.testing.assert_close(step.grads[1], torch.tensor([0.3, 0.4]))
    assert torch.equal(step.grads[2], torch.zeros(2))
    with pytest.raises(ValueError, match="clip_norm"):
        T.clip_by_norm(0.0)


def test_clip_by_global_norm_matches_function_and_nan_on_inf():
    grads = [torch.tensor([3.0]), torch.tensor([[4.0, 0.0]])]
    t = T.clip_by_global_norm(2.5)
    step = _run(t, grads)
    expected, norm = polyak.clip_by_global_norm(grads, 2.5)
    for a, b in zip(step.grads, expected):
        assert torch.equal(a, b)
    assert t.last_norm.item() == norm.item() == 5.0
    step = _run(t, [torch.tensor([math.inf]), torch.ones(2)])
    assert all(torch.isnan(g).all() for g in step.grads)


def test_adaptive_clip_unitwise_by_hand():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # row norms 5 and 0 (-> eps)
    b = torch.tensor([1.0, 0.0])
    g_w = torch.tensor([[0.3, 0.4], [1.0, 0.0]])  # row norms 0.5 and 1
    g_b = torch.tensor([0.001, 0.0])
    step = _run(T.adaptive_clip(clipping=0.05, eps=1e-3), [g_w, g_b], params=[w, b])
    # row 0: max = 0.05*5 = 0.25 < 0.5 -> scaled by 0.25/0.5; row 1: max = 0.05*1e-3
    torch.testing.assert_close(step.grads[0][0], g_w[0] * 0.5)
    torch.testing.assert_close(step.grads[0][1], g_w[1] * (0.05 * 1e-3 / 1.0))
    torch.testing.assert_close(step.grads[1], g_b)  # 0.001 < 0.05 * 1: unchanged


def test_add_noise_annealed_variance_and_state():
    eta, gamma, seed = 0.3, 0.55, 7
    t = T.add_noise(eta, gamma, seed)
    grads = [torch.ones(3), torch.zeros(2, 2)]
    gen = torch.Generator().manual_seed(seed)
    for count in range(2):
        step = _run(t, grads)
        noise = torch.randn(7, generator=gen) * math.sqrt(eta / (1 + count) ** gamma)
        torch.testing.assert_close(
            torch.cat([g.reshape(-1) for g in step.grads]),
            torch.cat([torch.ones(3), torch.zeros(4)]) + noise,
        )
    saved = copy.deepcopy(t.state_dict())
    a = _run(t, grads).grads
    t2 = T.add_noise(eta, gamma, seed)
    t2.load_state_dict(saved)
    b = _run(t2, grads).grads
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_masked_by_names_and_predicate():
    grads = [torch.tensor([4.0]), torch.tensor([4.0])]
    step = _run(T.masked(T.scale(0.5), ["w"]), grads, names=["w", "b"])
    assert step.grads[0].item() == 2.0 and step.grads[1].item() == 4.0
    step = _run(T.masked(T.scale(0.5), lambda n, p: n == "b"), grads, names=["w", "b"])
    assert step.grads[0].item() == 4.0 and step.grads[1].item() == 2.0
    with pytest.raises(TypeError, match="list of names"):
        T.masked(T.scale(1.0), "w")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def test_accumulate_equals_large_batch(device):
    torch.manual_seed(2)
    x, y = torch.randn(12, 3, device=device), torch.randn(12, 1, device=device)
    big, small = _model().to(device), _model().to(device)
    o_big = polyak.Optimizer(torch.optim.Adam(big.parameters(), lr=1e-2))
    o_small = polyak.Optimizer(torch.optim.Adam(small.parameters(), lr=1e-2), [T.accumulate(3)])
    step = polyak.GlobalStep()
    for _ in range(2):
        o_big.minimize(((big(x) - y) ** 2).mean())
        for xs, ys in zip(x.split(4), y.split(4)):
            o_small.minimize(((small(xs) - ys) ** 2).mean(), global_step=step)
    assert int(step) == 2  # the optimizer stepped on every 3rd call only
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["for-loop", "foreach", "fused"])
@pytest.mark.parametrize("first", [True, False])
def test_skip_nonfinite_keeps_params_and_state(first, kind):
    m = _model()
    opt = polyak.Optimizer(
        torch.optim.Adam(m.parameters(), lr=1e-2, foreach=kind == "foreach", fused=kind == "fused"),
        [T.skip_nonfinite()],
    )
    x = torch.randn(5, 3)
    if not first:
        opt.minimize(m(x).pow(2).mean())
    params = copy.deepcopy(list(m.parameters()))
    state = copy.deepcopy(opt.inner.state_dict()["state"])
    opt.minimize(m(x).pow(2).mean() * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    after = opt.inner.state_dict()["state"]
    assert after.keys() == state.keys()
    for k in state:
        for name, v in state[k].items():
            assert torch.equal(after[k][name], v), name
    skip = opt.transform.transforms[0]
    assert skip.skipped.item() == 1 and skip.consecutive.item() == 1
    opt.minimize(m(x).pow(2).mean())  # a finite step goes through and resets the streak
    assert not all(torch.equal(a, b) for a, b in zip(params, m.parameters()))
    assert skip.skipped.item() == 1 and skip.consecutive.item() == 0


def test_skip_nonfinite_gives_up_after_max_consecutive():
    w = nn.Parameter(torch.ones(2))
    opt = polyak.Optimizer(torch.optim.SGD([w], lr=0.1), [T.skip_nonfinite(max_consecutive=2)])
    for _ in range(3):
        opt.minimize((w * float("inf")).sum())
    with pytest.raises(RuntimeError, match="3 consecutive"):
        opt.minimize((w * float("inf")).sum())


def test_chain_state_dict_round_trip():
    def make():
        return T.chain(
            T.accumulate(2),
            T.skip_nonfinite(5),
            T.add_noise(0.1, seed=3),
            T.clip_by_global_norm(1.0),
            T.masked(T.scale(2.0), ["a"]),
        )

    a = make()
    grads = [torch.ones(2), torch.ones(3)]
    params = [torch.zeros(2), torch.zeros(3)]
    _run(a, grads, params, names=["a", "b"])
    _run(a, grads, params, names=["a", "b"])
    _run(a, grads, params, names=["a", "b"])  # one micro-step pending
    b = make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    sa = _run(a, grads, params, names=["a", "b"])
    sb = _run(b, grads, params, names=["a", "b"])
    assert sa.apply and sb.apply
    assert all(torch.equal(x, y) for x, y in zip(sa.grads, sb.grads))
    with pytest.raises(ValueError, match="same transforms"):
        T.chain(T.scale(1.0)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="no state"):
        T.scale(1.0).load_state_dict({"x": 1})
    with pytest.raises(TypeError, match="not a polyak transform"):
        T.chain(lambda s: s)


def test_sparse_gradients_pass_or_are_rejected():
    s = torch.sparse_coo_tensor([[0, 0, 2]], [1.0, 2.0, 4.0], (3,), check_invariants=True)
    step = _run(T.chain(T.clip_by_value(-3.5, 3.5), T.scale(2.0)), [s])
    assert step.grads[0].is_sparse
    torch.testing.assert_close(step.grads[0].to_dense(), torch.tensor([6.0, 0.0, 7.0]))
    step = _run(T.clip_by_norm(1.0), [s])
    torch.testing.assert_close(step.grads[0].to_dense(), torch.tensor([0.6, 0.0, 0.8]))
    for t in (T.add_noise(0.1), T.adaptive_clip()):
        with pytest.raises(TypeError, match="sparse"):
            _run(t, [s], params=[torch.zeros(3)])
