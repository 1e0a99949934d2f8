"""Environments for the agents: made by id, and checked to have spaces an agent can handle, with
errors that say why.

:func:`make_env` is ``gymnasium.make`` whose failures (an unknown id, a missing dependency) name
the id and say where the registered ids are listed.

DDPG and TD3 need a flat ``Box`` action space with finite bounds (the actor's ``tanh`` output is
rescaled onto them); DQN needs a ``Discrete`` action space (one Q-value per action). All three need
a flat ``Box`` observation space. Anything else is refused up front with a ``ValueError`` naming
the space and the alternatives, instead of failing later inside a matrix multiply.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from polyak.rl.validation import ConfigError

__all__ = ["check_box_actions", "check_discrete_actions", "check_observations", "make_env"]


def make_env(env_id: str) -> gym.Env:
    """``gymnasium.make(env_id)``; a :class:`ConfigError` naming ``env`` if Gymnasium refuses."""
    try:
        return gym.make(env_id)
    except (gym.error.DependencyNotInstalled, ImportError) as exc:  # ImportError: "module:Id"
        raise ConfigError([("env", f"env={env_id!r}: {exc}")]) from None
    except gym.error.Error as exc:
        raise ConfigError(
            [
                (
                    "env",
                    f"env={env_id!r}: {exc} (python -c 'import gymnasium; "
                    "gymnasium.pprint_registry()' lists the registered ids; for a "
                    "third-party environment write module:EnvName-v0 to import its module)",
                )
            ]
        ) from None


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
