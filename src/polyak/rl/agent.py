"""What the training loop needs from an agent, and the state-dict plumbing they share.

An agent exposes ``act(obs, explore)``, ``train_step(batch)`` (returns the losses as tensors, so
nothing waits for the device), ``train_burst(burst, n)`` (``n`` such steps on stacked
minibatches), ``on_env_step(step)``/``on_episode_start()`` hooks, and ``policy_network()`` (the
module greedy actions use). Its state splits in two for the checkpoint: ``networks()`` (the
online and target modules, the checkpoint's ``"agent"`` entry) and ``training_state()``
(optimizers, target-network averagers, global steps, noise: everything else that must be
restored for a bitwise-identical continuation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from polyak.rl.replay import Batch, minibatch

__all__ = ["Agent", "adam"]


def adam(params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused (one kernel per step) where the device supports it.

    Same update rule as the default implementation, in fewer kernels: on the agents' small
    networks the optimizer step is a large share of a gradient step (docs/performance.md).
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device without a fused Adam kernel
        return torch.optim.Adam(params, lr, weight_decay=weight_decay)


class _Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class Agent:
    """Base class of the reference agents (DDPG, TD3, DQN)."""

    device: torch.device
    dtype: torch.dtype
    # The agent's random draws (exploration) come from this generator; the training loop
    # shares it (warm-up actions, minibatches), so one seed fixes the whole run.
    rng: np.random.Generator

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray | int:
        """Action for one observation: normalized in [-1, 1] (continuous) or an index."""
        raise NotImplementedError

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One gradient step on ``batch``; returns 0-dim loss tensors (no host sync)."""
        raise NotImplementedError

    def train_burst(self, burst: Batch, n: int) -> dict[str, torch.Tensor]:
        """``n`` gradient steps on the ``n`` stacked minibatches of ``burst`` (from
        ``ReplayBuffer.sample_burst``), in order; returns the last step's losses. Agents may
        override this to share work across the burst (DQN computes all targets at once)."""
        batch_size = burst.obs.shape[0] // n
        losses: dict[str, torch.Tensor] = {}
        for k in range(n):
            losses = self.train_step(minibatch(burst, k, batch_size))
        return losses

    def on_episode_start(self) -> None:
        """Called before each training episode (resets temporally correlated noise)."""

    def on_env_step(self, step: int) -> None:
        """Called after environment step ``step`` (1-based), before the training it triggers."""

    def networks(self) -> dict[str, nn.Module]:
        """Online and target modules by name: the checkpoint's ``"agent"`` entry."""
        raise NotImplementedError

    def policy_network(self) -> nn.Module:
        """The module greedy actions (``act(obs, explore=False)``) use: what evaluations measure
        and what ``keep_best`` copies."""
        raise NotImplementedError

    def stateful(self) -> dict[str, _Stateful]:
        """Optimizers, target networks, global steps, noise: anything with a state dict."""
        raise NotImplementedError

    def obs_tensor(self, obs: np.ndarray) -> torch.Tensor:
        """One observation as a ``[1, d]`` tensor on the agent's device and dtype."""
        return torch.as_tensor(obs, dtype=self.dtype, device=self.device).unsqueeze(0)

    def training_state(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.stateful().items()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        _load_by_name(f"{type(self).__name__}: checkpoint training state", self.stateful(), state)

    def load_networks(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        _load_by_name(f"{type(self).__name__}: checkpoint networks", self.networks(), state)


def _load_by_name(what: str, objs: Mapping[str, _Stateful], state: Mapping[str, Any]) -> None:
    """``objs[name].load_state_dict(state[name])`` for all names, which must be the same set."""
    if set(state) != set(objs):
        raise ValueError(f"{what} has entries {sorted(state)}, expected {sorted(objs)}")
    for name, obj in objs.items():
        obj.load_state_dict(state[name])
