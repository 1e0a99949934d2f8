"""Exploration noise for deterministic policies, added to actions in the normalized [-1, 1] space.

Both draw from the agent's NumPy ``Generator``, so the whole run has one source of randomness that
the checkpoint saves and restores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ActionNoise", "GaussianNoise", "OrnsteinUhlenbeckNoise", "make_noise"]


class ActionNoise:
    """Base class: ``noise()`` draws a ``(action_dim,)`` sample; ``reset()`` at episode start."""

    def __init__(self, action_dim: int, rng: np.random.Generator) -> None:
        self.action_dim, self.rng = action_dim, rng

    def __call__(self) -> np.ndarray:
        raise NotImplementedError

    def reset(self) -> None:
        """Called at each episode start; stateless noises have nothing to do."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class GaussianNoise(ActionNoise):
    """Independent ``N(0, std^2)`` per step (TD3, and the zoo's "normal" noise)."""

    def __init__(self, action_dim: int, rng: np.random.Generator, std: float) -> None:
        super().__init__(action_dim, rng)
        self.std = std

    def __call__(self) -> np.ndarray:
        return self.rng.normal(0.0, self.std, size=self.action_dim)


class OrnsteinUhlenbeckNoise(ActionNoise):
    """Temporally correlated noise of the DDPG paper (theta=0.15, sigma=0.2).

    Euler-Maruyama step of ``dx = theta * (mu - x) dt + sigma dW``::

        x <- x + theta * (mu - x) * dt + sigma * sqrt(dt) * N(0, 1)

    with ``mu = 0``; ``x`` restarts at 0 each episode. ``dt=1e-2`` as OpenAI Baselines and
    Stable-Baselines3, whose zoo hyperparameters assume it.
    """

    def __init__(
        self,
        action_dim: int,
        rng: np.random.Generator,
        std: float,
        theta: float = 0.15,
        dt: float = 1e-2,
    ) -> None:
        super().__init__(action_dim, rng)
        self.std, self.theta, self.dt = std, theta, dt
        self.x = np.zeros(action_dim)

    def __call__(self) -> np.ndarray:
        dw = self.rng.normal(size=self.action_dim) * np.sqrt(self.dt)
        self.x = self.x - self.theta * self.x * self.dt + self.std * dw
        return self.x

    def reset(self) -> None:
        self.x = np.zeros(self.action_dim)

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x = np.asarray(state["x"], dtype=np.float64)


def make_noise(
    kind: str, action_dim: int, rng: np.random.Generator, std: float, theta: float, dt: float
) -> ActionNoise | None:
    """``"normal"`` -> Gaussian, ``"ou"`` -> Ornstein-Uhlenbeck, ``"none"`` -> ``None``."""
    if kind == "normal":
        return GaussianNoise(action_dim, rng, std)
    if kind == "ou":
        return OrnsteinUhlenbeckNoise(action_dim, rng, std, theta, dt)
    if kind == "none":
        return None
    raise ValueError(f"noise_type must be 'normal', 'ou' or 'none', got {kind!r}")
