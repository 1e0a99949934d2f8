"""Builders shared by the RL unit tests: a hand-made batch, a filled replay buffer, a DQN."""

from __future__ import annotations

import numpy as np
import torch

from polyak.rl.config import DQNConfig
from polyak.rl.dqn import DQN
from polyak.rl.replay import Batch, ReplayBuffer

CPU = torch.device("cpu")


def make_batch(obs_dim=3, action_dim=1, n=4, discrete_actions=None, seed=0) -> Batch:
    """A batch of ``n <= 4`` random transitions: rows 0 and 3 terminated, row 1 truncated."""
    g = torch.Generator().manual_seed(seed)
    actions = (
        torch.as_tensor(discrete_actions)
        if discrete_actions is not None
        else torch.rand(n, action_dim, generator=g) * 2 - 1
    )
    return Batch(
        obs=torch.randn(n, obs_dim, generator=g),
        actions=actions,
        rewards=torch.randn(n, generator=g),
        next_obs=torch.randn(n, obs_dim, generator=g),
        terminated=torch.tensor([1.0, 0.0, 0.0, 1.0][:n]),
        truncated=torch.tensor([0.0, 1.0, 0.0, 0.0][:n]),
    )


def filled_replay(seed=0, n=50, action_dim=0) -> ReplayBuffer:
    """A buffer holding transitions ``i = 0 .. n-1`` with ``obs = i`` and ``reward = i``."""
    rb = ReplayBuffer(64, obs_dim=3, action_dim=action_dim, rng=np.random.default_rng(seed))
    for i in range(n):
        action = i % 3 if action_dim == 0 else np.full(action_dim, i / n)
        rb.add(np.full(3, i), action, float(i), np.full(3, i + 0.5), i % 7 == 0, i % 11 == 0)
    return rb


def make_dqn(**kw) -> DQN:
    """A small DQN (3 observations, 3 actions, one hidden layer of 16) on the CPU, seeded."""
    torch.manual_seed(0)
    cfg = DQNConfig(env="x", net_arch=[16], total_steps=1000, **kw)
    return DQN(cfg, 3, 3, np.random.default_rng(0), CPU)
