"""polyak.rl.td3: smoothed clipped-double-Q target, delayed actor and target updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from rl_helpers import CPU, make_batch

from polyak.rl.config import TD3Config
from polyak.rl.td3 import TD3


def test_td3_delays_actor_and_target_updates_and_uses_twin_minimum():
    torch.manual_seed(0)
    cfg = TD3Config(env="x", net_arch=[16, 12], total_steps=10, policy_delay=2, gamma=0.5)
    agent = TD3(cfg, 3, 2, np.random.default_rng(0), CPU)
    actor0 = [p.detach().clone() for p in agent.actor.parameters()]
    target0 = [p.detach().clone() for p in agent.critic_target.module.parameters()]
    b = make_batch(action_dim=2)

    # The critic target with the smoothing noise TD3 will draw (same generator state).
    gen_state = agent.generator.get_state()
    eps = torch.randn(b.actions.shape, generator=agent.generator).mul(0.2).clamp(-0.5, 0.5)
    agent.generator.set_state(gen_state)
    a_next = (agent.actor_target(b.next_obs) + eps).clamp(-1, 1)
    q1n, q2n = agent.critic_target(b.next_obs, a_next)
    y = b.rewards + 0.5 * (1 - b.terminated) * torch.minimum(q1n, q2n)
    q1, q2 = agent.critic(b.obs, b.actions)
    expected = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()

    losses = agent.train_step(b)  # critic step 1: no actor step, no target move
    torch.testing.assert_close(losses["critic_loss"], expected.detach())
    assert "actor_loss" not in losses
    assert all(torch.equal(a, p) for a, p in zip(actor0, agent.actor.parameters(), strict=True))
    assert all(
        torch.equal(a, p)
        for a, p in zip(target0, agent.critic_target.module.parameters(), strict=True)
    )
    losses = agent.train_step(b)  # critic step 2: actor and targets move
    assert "actor_loss" in losses
    assert not all(torch.equal(a, p) for a, p in zip(actor0, agent.actor.parameters(), strict=True))
