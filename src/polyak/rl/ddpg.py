"""DDPG (Lillicrap et al. 2016, Algorithm 1), with TF1's weight-update calls.

Per gradient step, on a batch ``(s, a, r, s', terminated)`` of size ``N``:

Critic (regression onto a frozen target)::

    y = stop_gradient(r + gamma * (1 - terminated) * Q'(s', mu'(s')))
    L = mean((Q(s, a) - y)^2)                       # + L2 weight decay on Q's weights

Actor (the deterministic policy gradient, in the two-step ``tf.gradients`` form)::

    dQ/da    = gradients(Q(s, mu(s)), a)            # [N, action_dim], no step on Q's weights
    g_theta  = gradients(mu(s), theta, grad_ys=-dQ/da / N)
             = -1/N sum_i dQ/da_i * dmu(s_i)/dtheta   # = gradient of -mean Q(s, mu(s))
    apply_gradients(zip(g_theta, theta))

TF equivalent: ``q_gradient = tf.gradients(q, action_input)`` then
``tf.gradients(actor_output, actor_params, -q_gradient / N)`` fed to
``optimizer.apply_gradients``. Nothing flows back into the critic's weights: the first call
differentiates with respect to the action only, the second through the actor only.

Targets (Polyak averaging, TF's ``ExponentialMovingAverage(decay=1 - tau)`` applied to the online
networks' variables), after every gradient step::

    theta' <- (1 - tau) theta' + tau theta          # polyak.TargetNetwork(net, tau=tau)

Exploration: ``a = clip(mu(s) + noise, -1, 1)`` in the normalized action box, noise Gaussian or
Ornstein-Uhlenbeck (the paper's). TD3 (``polyak.rl.td3``) subclasses :class:`DDPG` and reuses
:func:`deterministic_policy_gradient_step`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import polyak
from polyak.rl.agent import Agent, adam
from polyak.rl.config import DDPGConfig
from polyak.rl.networks import Actor, Critic
from polyak.rl.noise import make_noise
from polyak.rl.replay import Batch
from polyak.rl.validation import validate_config

__all__ = ["DDPG", "deterministic_policy_gradient_step"]


def deterministic_policy_gradient_step(
    actor: nn.Module,
    critic: nn.Module,
    optimizer: polyak.Optimizer,
    obs: torch.Tensor,
    global_step: polyak.GlobalStep,
) -> torch.Tensor:
    """One actor step, ``theta -= lr * grad(-mean Q(s, mu(s)))``; returns that loss.

    ``dQ/da`` comes from ``polyak.gradients(Q, a)`` and is fed as ``grad_ys`` (the chain rule's
    upstream factor) to ``polyak.gradients(a, theta)``; the result is applied with
    ``Optimizer.apply_gradients``. Divided by ``N`` because the objective is the batch mean.
    """
    params = [p for p in actor.parameters() if p.requires_grad]
    actions = actor(obs)
    q = critic(obs, actions)
    (dq_da,) = polyak.gradients(q, [actions])
    grads = polyak.gradients(actions, params, grad_ys=-dq_da / obs.shape[0])
    optimizer.apply_gradients(list(zip(grads, params, strict=True)), global_step=global_step)
    return -polyak.stop_gradient(q).mean()


class DDPG(Agent):
    """DDPG with the paper's critic (the action joins at the second layer).

    TD3 (:class:`polyak.rl.td3.TD3`) subclasses it: same actor, optimizers, targets and
    exploration, with ``critic_class`` set to a twin critic and its own ``train_step``.
    """

    critic_class: type[nn.Module] = Critic

    def __init__(
        self,
        config: DDPGConfig,
        obs_dim: int,
        action_dim: int,
        rng: np.random.Generator,
        device: torch.device,
    ) -> None:
        validate_config(config)
        self.config, self.device, self.rng = config, device, rng
        self.actor = Actor(obs_dim, action_dim, config.net_arch, config.final_init).to(device)
        self.critic = self.critic_class(
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

    def act(self, obs: np.ndarray, explore: bool) -> np.ndarray:
        """``clip(mu(s) + noise, -1, 1)`` when exploring, ``mu(s)`` otherwise."""
        with torch.no_grad():
            action = self.actor(self.obs_tensor(obs))[0].cpu().numpy()
        if explore and self.noise is not None:
            action = np.clip(action + self.noise(), -1.0, 1.0)
        return action

    def on_episode_start(self) -> None:
        if self.noise is not None:
            self.noise.reset()

    def td_target(self, batch: Batch) -> torch.Tensor:
        """``stop_gradient(r + gamma * (1 - terminated) * Q'(s', mu'(s')))``."""
        next_q = self.critic_target.module(batch.next_obs, self.actor_target.module(batch.next_obs))
        return polyak.stop_gradient(
            batch.rewards + self.config.gamma * (1.0 - batch.terminated) * next_q
        )

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        y = self.td_target(batch)
        critic_loss = F.mse_loss(self.critic(batch.obs, batch.actions), y)
        self.critic_opt.minimize(critic_loss, global_step=self.critic_step)
        actor_loss = deterministic_policy_gradient_step(
            self.actor, self.critic, self.actor_opt, batch.obs, self.actor_step
        )
        self.update_targets()
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss}

    def update_targets(self) -> None:
        """``theta' <- (1 - tau) theta' + tau theta`` for the actor and the critic."""
        self.actor_target.update()
        self.critic_target.update()

    def networks(self) -> dict[str, nn.Module]:
        return {
            "actor": self.actor,
            "critic": self.critic,
            "actor_target": self.actor_target.module,
            "critic_target": self.critic_target.module,
        }

    def policy_network(self) -> nn.Module:
        return self.actor

    def stateful(self) -> dict:
        out = {
            "actor_target": self.actor_target,
            "critic_target": self.critic_target,
            "actor_opt": self.actor_opt,
            "critic_opt": self.critic_opt,
            "actor_step": self.actor_step,
            "critic_step": self.critic_step,
        }
        if self.noise is not None:
            out["noise"] = self.noise
        return out
