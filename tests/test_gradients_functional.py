"""polyak.gradients / stop_gradient against hand-worked derivatives (tf.gradients semantics)."""

import pytest
import torch

import polyak


def test_sum_over_ys_and_default_ones_for_any_shape():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y1 = x**2  # dy1/dx = 2x, seeded with ones
    y2 = 3 * x.sum()
    (g,) = polyak.gradients([y1, y2], [x])
    torch.testing.assert_close(g, torch.tensor([2 * 1 + 3, 2 * 2 + 3.0]))


def test_grad_ys_seeds_the_chain_rule_ddpg_style():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    s = torch.tensor([[1.0, -1.0]])
    actions = s @ w  # [[-2, -2]]
    dq_da = torch.tensor([[0.5, -1.0]])
    (g,) = polyak.gradients(actions, [w], grad_ys=-dq_da / 1)
    # d(sum(grad * s @ w))/dw = s^T grad
    torch.testing.assert_close(g, s.T @ (-dq_da))


def test_unconnected_none_or_zero_and_non_requires_grad():
    x = torch.ones(3, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    const = torch.ones(2)
    y = (2 * x).sum()
    assert polyak.gradients(y, [x, unused, const], retain_graph=True)[1:] == [None, None]
    g = polyak.gradients(y, [x, unused, const], unconnected_gradients="zero")
    torch.testing.assert_close(g[1], torch.zeros(2))
    torch.testing.assert_close(g[2], torch.zeros(2))


def test_constant_y_gives_none():
    x = torch.ones(2, requires_grad=True)
    assert polyak.gradients(torch.ones(()), [x]) == [None]


def test_stop_gradients_treats_tensors_as_constants():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor(3.0, requires_grad=True)
    z = x * w
    y = (z * x).sum()
    gx, gw, gz = polyak.gradients(y, [x, w, z], stop_gradients=[z])
    torch.testing.assert_close(gx, z.detach())  # only the direct x path
    assert gw is None  # reachable only through z: unconnected, as TF
    torch.testing.assert_close(gz, x.detach())


def test_stop_gradient_blocks_dqn_target():
    q = torch.tensor([1.0, 2.0], requires_grad=True)
    target = polyak.stop_gradient(1.0 + 0.9 * q.max())
    assert not target.requires_grad
    (g,) = polyak.gradients(((target - q) ** 2).sum(), [q])
    torch.testing.assert_close(g, -2 * (target - q.detach()))


def test_bad_input():
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="shape"):
        polyak.gradients(x * 2, [x], grad_ys=[torch.ones(3)])
    with pytest.raises(ValueError, match="unconnected_gradients"):
        polyak.gradients(x.sum(), [x], unconnected_gradients="zeros")
    with pytest.raises(ValueError, match="entries"):
        polyak.gradients(x.sum(), [x], grad_ys=[None, None])
    with pytest.raises(TypeError, match="xs"):
        polyak.gradients(x.sum(), [1.0])
    with pytest.raises(TypeError):
        polyak.stop_gradient(1.0)


def test_ddpg_actor_update_equals_gradient_of_mean_q():
    torch.manual_seed(0)
    actor = torch.nn.Linear(3, 2)
    critic_w = torch.randn(5, 1)
    states = torch.randn(4, 3)

    def critic(s, a):
        return torch.cat([s, a], dim=1) @ critic_w

    a = actor(states)
    a_in = polyak.stop_gradient(a).requires_grad_()
    (dq_da,) = polyak.gradients(critic(states, a_in), [a_in])
    params = list(actor.parameters())
    grads = polyak.gradients(a, params, grad_ys=-dq_da / a.shape[0])
    ref = torch.autograd.grad(-critic(states, actor(states)).mean(), params)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
