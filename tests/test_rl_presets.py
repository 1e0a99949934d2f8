"""polyak.rl.presets: the paper and rl-baselines3-zoo hyperparameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from polyak.rl.dqn import DQN
from polyak.rl.presets import make_config


def test_presets():
    paper = make_config("ddpg", "Pendulum-v1", "paper", total_steps=100)
    assert (paper.actor_lr, paper.critic_lr, paper.critic_l2, paper.tau, paper.batch_size) == (
        1e-4,
        1e-3,
        1e-2,
        1e-3,
        64,
    )
    assert paper.net_arch == [400, 300] and paper.noise_type == "ou"
    zoo = make_config("ddpg", "Pendulum-v1", "zoo")
    assert zoo.total_steps == 20_000 and zoo.gamma == 0.98 and zoo.learning_starts == 10_000
    assert zoo.noise_type == "normal" and zoo.noise_std == 0.1 and zoo.batch_size == 256
    dqn = make_config("dqn", "CartPole-v1", "zoo", overrides={"double_dqn": True})
    assert dqn.total_steps == 50_000 and dqn.train_freq == 256 and dqn.gradient_steps == 128
    assert dqn.double_dqn and dqn.net_arch == [256, 256]
    for env in ("Acrobot-v1", "MountainCar-v0"):
        make_config("dqn", env, "zoo")
    make_config("td3", "MountainCarContinuous-v0", "zoo")
    with pytest.raises(ValueError, match="no dqn hyperparameters for 'LunarLander-v3'"):
        make_config("dqn", "LunarLander-v3", "zoo")
    with pytest.raises(ValueError, match="--total-steps"):
        make_config("dqn", "CartPole-v1", "paper")


def test_zoo_cartpole_evaluates_the_averaged_network_and_trains_as_the_zoo():
    """The zoo CartPole-v1 DQN adds only evaluation settings; the other zoo DQN entries and
    every training field are rl-baselines3-zoo's."""
    zoo = make_config("dqn", "CartPole-v1", "zoo")
    assert (zoo.eval_ema_decay, zoo.eval_ema_num_updates, zoo.keep_best) == (0.9999, True, True)
    assert (zoo.learning_rate, zoo.target_update_interval, zoo.eps_final) == (2.3e-3, 10, 0.04)
    for env in ("Acrobot-v1", "MountainCar-v0"):
        other = make_config("dqn", env, "zoo")
        assert (other.eval_ema_decay, other.eval_ema_num_updates, other.keep_best) == (
            0.0,
            False,
            False,
        )
    # One override turns it off: the online network is evaluated, nothing extra is stored.
    online = make_config("dqn", "CartPole-v1", "zoo", overrides={"eval_ema_decay": 0.0})
    agent = DQN(online, 4, 2, np.random.default_rng(0), torch.device("cpu"))
    assert agent.q_eval is agent.q and agent.eval_ema is None
