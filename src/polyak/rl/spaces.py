"""Checks that an environment's spaces are ones an agent can handle, with errors that say why.

DDPG and TD3 need a flat ``Box`` action space with finite bounds (the actor's ``tanh`` output is
rescaled onto them); DQN needs a ``Discrete`` action space (one Q-value per action). All three need
a flat ``Box`` observation space. Anything else is refused up front with a ``ValueError`` naming
the space and the alternatives, instead of failing later inside a matrix multiply.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

__all__ = ["check_box_actions", "check_discrete_actions", "check_observations"]


def check_observations(space: gym.Space, algo: str) -> int:
    """Return the observation size of a flat ``Box`` space, or raise ``ValueError``."""
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(
            f"{algo}: unsupported observation space {space}; polyak.rl agents take a flat "
            "Box observation (shape (n,)). Wrap the environment (e.g. "
            "gymnasium.wrappers.FlattenObservation) to use it."
        )
    return int(space.shape[0])


def check_box_actions(space: gym.Space, algo: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(low, high)`` of a flat, bounded ``Box`` action space, or raise ``ValueError``."""
    if isinstance(space, gym.spaces.Discrete):
        raise ValueError(
            f"{algo}: unsupported action space {space}: {algo} needs continuous (Box) actions; "
            "use dqn for a Discrete action space."
        )
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(
            f"{algo}: unsupported action space {space}; {algo} needs a flat Box action space "
            "(shape (n,))."
        )
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise ValueError(
            f"{algo}: action space {space} has infinite bounds; the actor's tanh output is "
            "rescaled onto [low, high], so both must be finite (wrap with "
            "gymnasium.wrappers.ClipAction or RescaleAction)."
        )
    return low, high


def check_discrete_actions(space: gym.Space, algo: str) -> int:
    """Return the number of actions of a ``Discrete`` space (starting at 0), or raise."""
    if isinstance(space, gym.spaces.Box):
        raise ValueError(
            f"{algo}: unsupported action space {space}: {algo} needs a Discrete action space; "
            "use ddpg or td3 for continuous (Box) actions."
        )
    if not isinstance(space, gym.spaces.Discrete) or int(space.start) != 0:
        raise ValueError(
            f"{algo}: unsupported action space {space}; {algo} needs Discrete(n) with start=0."
        )
    return int(space.n)
