"""TD3 (Fujimoto et al. 2018): DDPG plus three fixes for Q-value overestimation.

Per gradient step, on a batch ``(s, a, r, s', terminated)``:

1. Target policy smoothing and clipped double Q::

       eps = clip(N(0, sigma^2), -c, c)
       a'  = clip(mu'(s') + eps, -1, 1)
       y   = stop_gradient(r + gamma * (1 - terminated) * min(Q1'(s', a'), Q2'(s', a')))
       L   = mean((Q1(s, a) - y)^2) + mean((Q2(s, a) - y)^2)

2. Delayed updates: every ``policy_delay``-th critic step, the actor takes one deterministic
   policy gradient step on ``Q1`` (the same two-``gradients`` recipe as DDPG, shared from
   ``polyak.rl.ddpg``), and the targets move: ``theta' <- (1 - tau) theta' + tau theta``.

TF equivalent: the TD3 authors' code, with ``tf.train.ExponentialMovingAverage(1 - tau)`` targets.
The smoothing noise is drawn from a ``torch.Generator`` on the agent's device whose state is
checkpointed, so runs resume bitwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import polyak
from polyak.rl.config import TD3Config
from polyak.rl.ddpg import DDPG, deterministic_policy_gradient_step
from polyak.rl.networks import Critic
from polyak.rl.replay import Batch

__all__ = ["TD3", "TwinCritic"]


class TwinCritic(nn.Module):
    """Two independent critics ``Q1``, ``Q2`` (one module, so one optimizer and one target)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.q1, self.q2 = Critic(*args, **kwargs), Critic(*args, **kwargs)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q1(obs, action), self.q2(obs, action)


class _GeneratorState:
    """A ``torch.Generator`` seen as a stateful object for the checkpoint."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class TD3(DDPG):
    """Twin Delayed DDPG: DDPG's actor, optimizers, targets and exploration, a twin critic."""

    critic_class = TwinCritic

    def __init__(
        self,
        config: TD3Config,
        obs_dim: int,
        action_dim: int,
        rng: np.random.Generator,
        device: torch.device,
    ) -> None:
        super().__init__(config, obs_dim, action_dim, rng, device)
        self.config: TD3Config = config
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(rng.integers(2**63)))

    def td_target(self, batch: Batch) -> torch.Tensor:
        """``stop_gradient(r + gamma * (1 - terminated) * min(Q1', Q2')(s', a'))`` with the
        smoothed target action ``a' = clip(mu'(s') + clip(N(0, sigma^2), -c, c), -1, 1)``."""
        cfg = self.config
        eps = torch.randn(
            batch.actions.shape, generator=self.generator, device=self.device, dtype=self.dtype
        )
        eps = (eps * cfg.target_policy_noise).clamp(-cfg.target_noise_clip, cfg.target_noise_clip)
        next_actions = (self.actor_target.module(batch.next_obs) + eps).clamp(-1.0, 1.0)
        q1_next, q2_next = self.critic_target.module(batch.next_obs, next_actions)
        next_q = torch.minimum(q1_next, q2_next)
        return polyak.stop_gradient(batch.rewards + cfg.gamma * (1.0 - batch.terminated) * next_q)

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        y = self.td_target(batch)
        q1, q2 = self.critic(batch.obs, batch.actions)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.critic_opt.minimize(critic_loss, global_step=self.critic_step)
        losses = {"critic_loss": critic_loss.detach()}
        if int(self.critic_step) % self.config.policy_delay == 0:
            losses["actor_loss"] = deterministic_policy_gradient_step(
                self.actor, self.critic.q1, self.actor_opt, batch.obs, self.actor_step
            )
            self.update_targets()
        return losses

    def stateful(self) -> dict:
        return {**super().stateful(), "generator": _GeneratorState(self.generator)}
