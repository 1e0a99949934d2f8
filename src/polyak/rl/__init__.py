"""Reference RL agents built only from polyak's public API: DDPG, TD3 and DQN.

Needs the ``rl`` extra (gymnasium, numpy, rich): ``pip install 'polyak[rl]'``. Entry points:
:func:`train` (also ``polyak train`` on the command line), :func:`make_config` for presets,
and the agent classes for use in your own loop.
"""

from polyak.rl.config import DDPGConfig, DQNConfig, RunConfig, TD3Config
from polyak.rl.ddpg import DDPG
from polyak.rl.dqn import DQN
from polyak.rl.loop import evaluate, train
from polyak.rl.noise import GaussianNoise, OrnsteinUhlenbeckNoise
from polyak.rl.presets import make_config
from polyak.rl.replay import Batch, ReplayBuffer
from polyak.rl.rundir import ConfigMismatchError
from polyak.rl.td3 import TD3
from polyak.rl.validation import ConfigError, validate_config

__all__ = [
    "DDPG",
    "DQN",
    "TD3",
    "Batch",
    "ConfigError",
    "ConfigMismatchError",
    "DDPGConfig",
    "DQNConfig",
    "GaussianNoise",
    "OrnsteinUhlenbeckNoise",
    "ReplayBuffer",
    "RunConfig",
    "TD3Config",
    "evaluate",
    "make_config",
    "train",
    "validate_config",
]
