"""polyak.rl.dqn: the TD target, the loss, hard and soft targets, bursts, the evaluation
average, greedy actions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from rl_helpers import filled_replay, make_batch, make_dqn

from polyak.rl.agent import adam
from polyak.rl.config import DQNConfig
from polyak.rl.dqn import linear_epsilon
from polyak.rl.networks import QNetwork
from polyak.rl.replay import minibatch


@pytest.mark.parametrize("double", [False, True])
def test_dqn_target_by_hand(double):
    agent = make_dqn(gamma=0.9, double_dqn=double)
    # Make the target differ from the online network so Double DQN matters.
    with torch.no_grad():
        for p in agent.q.parameters():
            p.add_(torch.randn_like(p))
    b = make_batch(discrete_actions=[0, 2, 1, 1])
    qt = agent.q_target(b.next_obs)
    best = agent.q(b.next_obs).argmax(1) if double else qt.argmax(1)
    q_next = qt[torch.arange(4), best]
    y = b.rewards + 0.9 * torch.tensor([0.0, 1.0, 1.0, 0.0]) * q_next  # truncated row 1 bootstraps
    torch.testing.assert_close(agent.td_target(b), y.detach())
    assert not agent.td_target(b).requires_grad


def test_dqn_huber_loss_and_hard_target_every_n_env_steps():
    agent = make_dqn(target_update_interval=3, learning_rate=0.1)
    b = make_batch(discrete_actions=[0, 2, 1, 1])
    q_sa = agent.q(b.obs)[torch.arange(4), b.actions]
    expected = torch.nn.functional.smooth_l1_loss(q_sa, agent.td_target(b))
    torch.testing.assert_close(agent.train_step(b)["loss"], expected.detach())
    online = [p.detach().clone() for p in agent.q.parameters()]
    stale = [p.detach().clone() for p in agent.q_target.module.parameters()]
    assert not all(torch.equal(a, c) for a, c in zip(online, stale, strict=True))
    agent.on_env_step(1)
    agent.on_env_step(2)
    assert all(
        torch.equal(a, p) for a, p in zip(stale, agent.q_target.module.parameters(), strict=True)
    )
    agent.on_env_step(3)
    assert all(
        torch.equal(a, p) for a, p in zip(online, agent.q_target.module.parameters(), strict=True)
    )


def test_dqn_refuses_hard_interval_with_soft_tau():
    with pytest.raises(ValueError, match="target_update_interval=0"):
        make_dqn(target_update_interval=10, tau=0.5)


def test_epsilon_schedule():
    cfg = DQNConfig(total_steps=1000, eps_initial=1.0, eps_final=0.1, eps_fraction=0.5)
    assert linear_epsilon(0, cfg) == 1.0
    assert linear_epsilon(250, cfg) == pytest.approx(0.55)
    assert linear_epsilon(500, cfg) == pytest.approx(0.1)
    assert linear_epsilon(900, cfg) == pytest.approx(0.1)


def test_dqn_burst_with_frozen_target_equals_step_by_step():
    """The batched targets of a burst are the per-step targets: same losses, same weights."""
    burst = filled_replay().sample_burst(6, 8)
    fast = make_dqn(target_update_interval=4, learning_rate=0.01, max_grad_norm=10.0)
    slow = make_dqn(target_update_interval=4, learning_rate=0.01, max_grad_norm=10.0)
    with torch.no_grad():  # a target that differs from the online network
        for p in fast.q_target.module.parameters():
            p.add_(0.5)
        for p in slow.q_target.module.parameters():
            p.add_(0.5)
    frozen = [p.clone() for p in fast.q_target.module.parameters()]
    losses = fast.train_burst(burst, 6)
    for k in range(6):
        expected = slow.train_step(minibatch(burst, k, 8))
    torch.testing.assert_close(losses["loss"], expected["loss"])
    for x, y in zip(fast.q.parameters(), slow.q.parameters(), strict=True):
        torch.testing.assert_close(x, y)
    # The online net moved, the hard target did not (copies happen only in on_env_step).
    assert all(torch.equal(a, p) for a, p in zip(frozen, fast.q_target.module.parameters()))
    assert not torch.equal(next(fast.q.parameters()), next(make_dqn().q.parameters()))


def test_dqn_steps_equal_the_textbook_loop_bit_for_bit():
    """A DQN burst is exactly the plain torch loop that Stable-Baselines3 writes (frozen
    target, Huber loss on ``Q(s, a)``, clipping by global norm, Adam), with TF's clip factor
    ``c * min(1 / norm, 1 / c)``: the same bits, on the same minibatches."""
    n, b, clip = 12, 16, 0.5
    agent = make_dqn(target_update_interval=4, learning_rate=0.01, max_grad_norm=clip, gamma=0.9)
    plain = QNetwork(3, 3, [16])
    plain.load_state_dict(agent.q.state_dict())
    target = QNetwork(3, 3, [16])
    target.load_state_dict(agent.q_target.module.state_dict())
    opt = adam(plain.parameters(), 0.01)
    burst = filled_replay().sample_burst(n, b)
    agent.train_burst(burst, n)
    clipped = 0
    for k in range(n):
        mb = minibatch(burst, k, b)
        with torch.no_grad():
            y = mb.rewards + 0.9 * (1.0 - mb.terminated) * target(mb.next_obs).max(1).values
        q_sa = plain(mb.obs).gather(1, mb.actions.unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q_sa, y)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in plain.parameters()]
        norm = torch.stack(torch._foreach_norm(grads)).square().sum().sqrt()
        clipped += int(norm > clip)
        torch._foreach_mul_(grads, clip * torch.clamp_max(norm.reciprocal(), 1.0 / clip))
        opt.step()
    assert clipped > 0  # the clip was active
    for x, y in zip(agent.q.parameters(), plain.parameters(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kw", [{"double_dqn": True}, {"target_update_interval": 0, "tau": 0.5}])
def test_dqn_burst_falls_back_to_step_by_step(kw):
    """Double DQN's and soft targets change during a burst: the per-step path, bit for bit."""
    burst = filled_replay().sample_burst(4, 8)
    fast, slow = make_dqn(learning_rate=0.01, **kw), make_dqn(learning_rate=0.01, **kw)
    fast.train_burst(burst, 4)
    for k in range(4):
        slow.train_step(minibatch(burst, k, 8))
    for x, y in zip(fast.q.parameters(), slow.q.parameters(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(fast.q_target.module.parameters(), slow.q_target.module.parameters()):
        assert torch.equal(x, y)


def test_dqn_eval_ema_is_the_average_of_the_online_weights():
    """``eval_ema_decay``: after every gradient step, q_eval <- d * q_eval + (1 - d) * q."""
    agent = make_dqn(learning_rate=0.05, eval_ema_decay=0.75)
    assert agent.q_eval is not agent.q
    assert set(agent.networks()) == {"q", "q_target", "q_eval"}
    assert "eval_ema" in agent.stateful()
    start = [p.detach().clone() for p in agent.q.parameters()]
    assert all(torch.equal(a, e) for a, e in zip(start, agent.q_eval.parameters(), strict=True))
    agent.train_step(make_batch(discrete_actions=[0, 2, 1, 1]))
    after = [p.detach().clone() for p in agent.q.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(start, after, strict=True))
    for s, a, e in zip(start, after, agent.q_eval.parameters(), strict=True):
        torch.testing.assert_close(e, 0.75 * s + 0.25 * a)
    # Off by default: evaluation acts with the online network, and nothing else is stored.
    plain = make_dqn()
    assert plain.q_eval is plain.q and set(plain.stateful()) == {
        "q_target",
        "opt",
        "step",
        "env_step",
    }
    with pytest.raises(ValueError, match="eval_ema_decay"):
        make_dqn(eval_ema_decay=1.0)


def test_dqn_eval_ema_num_updates_follows_tf_rule_on_gradient_steps():
    """``eval_ema_num_updates``: the n-th gradient step averages with decay
    ``min(d, (1 + n) / (10 + n))`` (TF's ``num_updates`` rule, n counted after the step)."""
    agent = make_dqn(learning_rate=0.05, eval_ema_decay=0.9999, eval_ema_num_updates=True)
    expected = [p.detach().clone().double() for p in agent.q.parameters()]
    batch = make_batch(discrete_actions=[0, 2, 1, 1])
    for n in range(1, 6):
        agent.train_step(batch)
        assert int(agent.step) == n
        d = min(0.9999, (1 + n) / (10 + n))  # 0.18, 0.25, ...: far from the cap
        for e, p in zip(expected, agent.q.parameters(), strict=True):
            e.mul_(d).add_(p.detach().double(), alpha=1 - d)
    for e, avg in zip(expected, agent.q_eval.parameters(), strict=True):
        torch.testing.assert_close(avg, e.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("numpy_path", [True, False])
def test_dqn_greedy_evaluation_acts_with_the_averaged_weights(monkeypatch, numpy_path):
    """With ``eval_ema_decay``, ``act(explore=False)`` is argmax of the EMA network (both the
    NumPy fast path and the torch path), and exploration still acts with the online one."""
    agent = make_dqn(learning_rate=0.05, eval_ema_decay=0.9, eps_initial=0.0, eps_final=0.0)
    if not numpy_path:
        monkeypatch.setattr(agent.greedy, "host_layers", lambda q: None)
    agent.train_burst(filled_replay().sample_burst(3, 8), 3)
    # Flip the online network's output layer (no gradient step, so the average does not move):
    # the online and the averaged greedy actions now disagree wherever there is a clear best.
    with torch.no_grad():
        agent.q.layers[-1].weight.mul_(-1.0)
        agent.q.layers[-1].bias.mul_(-1.0)
    obs = np.random.default_rng(2).normal(size=(200, 3)).astype(np.float32)
    x = torch.from_numpy(obs)

    def clear_argmax(q):
        top2 = q.topk(2, dim=1).values
        return q.argmax(1), (top2[:, 0] - top2[:, 1]) > 1e-4

    q_avg, clear_avg = clear_argmax(agent.q_eval(x).detach())
    q_online, clear_online = clear_argmax(agent.q(x).detach())
    clear = clear_avg & clear_online
    assert clear.sum() > 100
    assert (q_avg[clear] != q_online[clear]).float().mean() > 0.5
    greedy = torch.tensor([agent.act(o, explore=False) for o in obs])
    assert torch.equal(greedy[clear], q_avg[clear])
    explore = torch.tensor([agent.act(o, explore=True) for o in obs])  # epsilon is 0
    assert torch.equal(explore[clear], q_online[clear])
