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
from polyak.rl.agent import Agent, adam
from polyak.rl.config import TD3Config
from polyak.rl.ddpg import act_deterministic, deterministic_policy_gradient_step
from polyak.rl.networks import Actor, Critic
from polyak.rl.noise import make_noise
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


class TD3(Agent):
    """Twin Delayed DDPG."""

    def __init__(
        self,
        config: TD3Config,
        obs_dim: int,
        action_dim: int,
        rng: np.random.Generator,
        device: torch.device,
    ) -> None:
        self.config, self.device = config, device
        self.actor = Actor(obs_dim, action_dim, config.net_arch, config.final_init).to(device)
        self.critic = TwinCritic(
            obs_dim, action_dim, config.net_arch, config.action_layer, config.final_init
        ).to(device)
        self.dtype = next(self.actor.parameters()).dtype
        self.actor_target = polyak.TargetNetwork(self.actor, tau=config.tau)
        self.critic_target = polyak.TargetNetwork(self.critic, tau=config.tau)
        self.actor_opt = polyak.Optimizer(adam(self.actor.parameters(), config.actor_lr))
        self.critic_opt = polyak.Optimizer(
            adam(self.critic.parameters(), config.critic_lr, weight_decay=config.critic_l2)
        )
        self.actor_step, self.critic_step = polyak.GlobalStep(), polyak.GlobalStep()
        self.noise = make_noise(
            config.noise_type, action_dim, rng, config.noise_std, config.ou_theta, config.ou_dt
        )
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(rng.integers(2**63)))

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        return act_deterministic(self, self.actor, obs, self.noise if explore else None)

    def on_episode_start(self) -> None:
        if self.noise is not None:
            self.noise.reset()

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        eps = torch.randn(
            batch.actions.shape, generator=self.generator, device=self.device, dtype=self.dtype
        )
        eps = (eps * cfg.target_policy_noise).clamp(-cfg.target_noise_clip, cfg.target_noise_clip)
        next_actions = (self.actor_target.module(batch.next_obs) + eps).clamp(-1.0, 1.0)
        q1_next, q2_next = self.critic_target.module(batch.next_obs, next_actions)
        q_next = torch.minimum(q1_next, q2_next)
        y = polyak.stop_gradient(batch.rewards + cfg.gamma * (1.0 - batch.terminated) * q_next)
        q1, q2 = self.critic(batch.obs, batch.actions)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.critic_opt.minimize(critic_loss, global_step=self.critic_step)

        losses = {"critic_loss": critic_loss.detach()}
        if int(self.critic_step) % cfg.policy_delay == 0:
            losses["actor_loss"] = deterministic_policy_gradient_step(
                self.actor, self.critic.q1, self.actor_opt, batch.obs, self.actor_step
            )
            self.actor_target.update()
            self.critic_target.update()
        return losses

    def networks(self) -> dict[str, nn.Module]:
        return {
            "actor": self.actor,
            "critic": self.critic,
            "actor_target": self.actor_target.module,
            "critic_target": self.critic_target.module,
        }

    def stateful(self) -> dict:
        out = {
            "actor_target": self.actor_target,
            "critic_target": self.critic_target,
            "actor_opt": self.actor_opt,
            "critic_opt": self.critic_opt,
            "actor_step": self.actor_step,
            "critic_step": self.critic_step,
            "generator": _GeneratorState(self.generator),
        }
        if self.noise is not None:
            out["noise"] = self.noise
        return out
