"""polyak.rl.ddpg: the critic target, the two-step actor gradient, the soft targets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from rl_helpers import CPU, make_batch

import polyak
from polyak.rl.config import DDPGConfig
from polyak.rl.ddpg import DDPG, deterministic_policy_gradient_step


def _ddpg(**kw) -> DDPG:
    torch.manual_seed(0)
    cfg = DDPGConfig(env="x", net_arch=[16, 12], total_steps=10, **kw)
    return DDPG(cfg, 3, 2, np.random.default_rng(0), CPU)


def test_ddpg_actor_gradient_is_autograd_gradient_of_minus_mean_q():
    agent = _ddpg()
    obs = torch.randn(7, 3)
    actor_ref, critic_ref = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic)
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    before = [p.detach().clone() for p in agent.actor.parameters()]
    opt = polyak.Optimizer(torch.optim.SGD(agent.actor.parameters(), lr=1.0))
    step = polyak.GlobalStep()
    loss = deterministic_policy_gradient_step(agent.actor, agent.critic, opt, obs, step)

    ref_loss = -critic_ref(obs, actor_ref(obs)).mean()
    ref_grads = torch.autograd.grad(ref_loss, list(actor_ref.parameters()))
    for b, p, g in zip(before, agent.actor.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, ref_loss.detach())
    assert int(step) == 1
    # Nothing flowed into the critic: same weights, no .grad.
    for b, p in zip(critic_before, agent.critic.parameters(), strict=True):
        assert torch.equal(b, p) and p.grad is None


def test_ddpg_critic_target_bootstraps_on_truncation_only():
    agent = _ddpg(gamma=0.9, critic_lr=0.0, actor_lr=0.0, tau=0.0)
    b = make_batch(action_dim=2)
    q_next = agent.critic_target(b.next_obs, agent.actor_target(b.next_obs)).detach()
    y = b.rewards + 0.9 * torch.tensor([0.0, 1.0, 1.0, 0.0]) * q_next  # rows 0, 3 terminated
    expected = torch.mean((agent.critic(b.obs, b.actions).detach() - y) ** 2)
    losses = agent.train_step(b)
    torch.testing.assert_close(losses["critic_loss"], expected)


def test_ddpg_targets_move_by_tau():
    agent = _ddpg(tau=0.25)
    old_target = [p.detach().clone() for p in agent.critic_target.module.parameters()]
    agent.train_step(make_batch(action_dim=2))
    for old, t, p in zip(
        old_target,
        agent.critic_target.module.parameters(),
        agent.critic.parameters(),
        strict=True,
    ):
        torch.testing.assert_close(t, 0.75 * old + 0.25 * p.detach())
