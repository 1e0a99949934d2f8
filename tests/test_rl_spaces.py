"""polyak.rl.spaces: the agents refuse the spaces they cannot handle, naming them."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gymnasium")
import gymnasium as gym

from polyak.rl.config import DDPGConfig, DQNConfig
from polyak.rl.loop import make_agent


def test_dqn_refuses_continuous_actions_and_ddpg_refuses_discrete():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"dqn.*needs a Discrete action space.*ddpg or td3"):
        make_agent(DQNConfig(env="Pendulum-v1"), gym.make("Pendulum-v1"), rng)
    with pytest.raises(ValueError, match=r"ddpg.*needs continuous \(Box\) actions.*dqn"):
        make_agent(DDPGConfig(env="CartPole-v1"), gym.make("CartPole-v1"), rng)


def test_unsupported_observation_space_is_named():
    from polyak.rl.spaces import check_observations

    with pytest.raises(ValueError, match="unsupported observation space Discrete"):
        check_observations(gym.spaces.Discrete(3), "dqn")
