"""DQN (Mnih et al. 2015), with TF's ``stop_gradient`` target.

Per gradient step, on a batch ``(s, a, r, s', terminated)``::

    y = stop_gradient(r + gamma * (1 - terminated) * max_a' Q'(s', a'))
    L = mean(huber(Q(s, a) - y))          # huber = the paper's error clipping to [-1, 1]

Double DQN (van Hasselt et al. 2016) picks the next action with the online network and values
it with the target: ``max_a' Q'(s', a')`` becomes ``Q'(s', argmax_a' Q(s', a'))``.

TF equivalent: ``y = tf.stop_gradient(r + gamma * tf.reduce_max(q_target, 1))``,
``cost = tf.losses.huber_loss(y, q_sa)``, ``optimizer.minimize(cost, global_step)``.

The target network ``Q'`` is a ``polyak.TargetNetwork``: a hard copy every
``target_update_interval`` environment steps (``TargetNetwork(q, every=N)``, counted as
Stable-Baselines3 counts it), or, with ``target_update_interval=0``, a soft update
``Q' <- (1 - tau) Q' + tau Q`` after every gradient step. Only ``terminated`` cuts the
bootstrap: a time-limit end (truncated) still has a future. Exploration is epsilon-greedy with
epsilon annealed linearly from ``eps_initial`` to ``eps_final`` over the first
``eps_fraction * total_steps`` steps.

Averaged evaluation weights (``eval_ema_decay > 0``; on in the zoo CartPole-v1 preset, off
otherwise): a ``polyak.ExponentialMovingAverage`` of the online network's weights, stepped after
every gradient step (with ``eval_ema_num_updates``, TF's ``num_updates`` rule on the
gradient-step count: decay ``min(eval_ema_decay, (1 + n) / (10 + n))``), whose
``average_module`` (``q_eval``, sharing memory with the shadows) is the network that greedy
actions (``act(explore=False)``: every evaluation) use. Training targets, the loss and
exploration keep using the online network. The average is checkpointed with the rest of the
training state.

Speed, with the same bits as the plain code (tested): greedy actions and a burst's batched
targets come from :mod:`polyak.rl.fast`; the online network is ``polyak.flatten_parameters_``-ed,
so the target copy and the evaluation average are one kernel each.
"""

from __future__ import annotations

from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import polyak
from polyak.rl import fast
from polyak.rl.agent import Agent, adam
from polyak.rl.config import DQNConfig
from polyak.rl.networks import QNetwork
from polyak.rl.replay import Batch
from polyak.rl.validation import validate_config

__all__ = ["DQN", "linear_epsilon"]


def linear_epsilon(step: int, config: DQNConfig) -> float:
    """Epsilon after ``step`` environment steps: linear to ``eps_final``, then constant."""
    horizon = config.eps_fraction * config.total_steps
    progress = 1.0 if horizon <= 0 else min(step / horizon, 1.0)
    return config.eps_initial + progress * (config.eps_final - config.eps_initial)


class DQN(Agent):
    """Deep Q-Network with hard or soft targets and an optional Double-DQN target."""

    def __init__(
        self,
        config: DQNConfig,
        obs_dim: int,
        n_actions: int,
        rng: np.random.Generator,
        device: torch.device,
    ) -> None:
        validate_config(config)
        self.config, self.device, self.rng, self.n_actions = config, device, rng, n_actions

        # Q and its optimizer. The weights go into one contiguous buffer, so the target copy
        # and the evaluation average are one kernel each; the gradients too unless Adam is
        # fused (it takes all tensors in one kernel anyway, and autograd's own gradients then
        # need no zeroing and no copy).
        self.q = QNetwork(obs_dim, n_actions, config.net_arch, config.final_init).to(device)
        inner = adam(self.q.parameters(), config.learning_rate)
        polyak.flatten_parameters_(self.q, grads=not inner.defaults["fused"])
        self.dtype = next(self.q.parameters()).dtype
        transforms = []
        if config.max_grad_norm > 0:
            transforms.append(polyak.transforms.clip_by_global_norm(config.max_grad_norm))
        self.opt = polyak.Optimizer(inner, transforms=transforms)
        self.step = polyak.GlobalStep()  # gradient steps

        # Q': hard copies counted in environment steps, or soft updates after gradient steps.
        self.hard_target = config.target_update_interval > 0
        if self.hard_target:
            self.q_target = polyak.TargetNetwork(self.q, every=config.target_update_interval)
        else:
            self.q_target = polyak.TargetNetwork(self.q, tau=config.tau)

        # The network of greedy (evaluation) actions: the online one, or the EMA of its weights.
        self.eval_ema: polyak.ExponentialMovingAverage | None = None
        self.q_eval: QNetwork = self.q
        if config.eval_ema_decay != 0.0:
            self.eval_ema = polyak.ExponentialMovingAverage(
                config.eval_ema_decay,
                num_updates=self.step if config.eval_ema_num_updates else None,
            )
            self.eval_ema.track(self.q)  # starts equal to the online network
            self.q_eval = cast(QNetwork, self.eval_ema.average_module(self.q))

        self.env_step = polyak.GlobalStep()  # environment steps seen, for the epsilon schedule
        self.greedy = fast.GreedyActions(device, self.dtype)

    @property
    def epsilon(self) -> float:
        return linear_epsilon(int(self.env_step), self.config)

    def act(self, obs: np.ndarray, explore: bool) -> int:
        # The coin first: a random action needs no forward pass.
        if explore and self.rng.random() < self.epsilon:
            return int(self.rng.integers(self.n_actions))
        return self.greedy(self.q if explore else self.q_eval, obs)

    def td_target(self, batch: Batch) -> torch.Tensor:
        """``stop_gradient(r + gamma * (1 - terminated) * max_a' Q'(s', a'))`` (or Double DQN)."""
        q_next_all = self.q_target.module(batch.next_obs)
        if self.config.double_dqn:
            best = self.q(batch.next_obs).argmax(dim=1, keepdim=True)
            q_next = q_next_all.gather(1, best).squeeze(1)
        else:
            q_next = q_next_all.max(dim=1).values
        return polyak.stop_gradient(
            batch.rewards + self.config.gamma * (1.0 - batch.terminated) * q_next
        )

    def train_step(self, batch: Batch, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One gradient step on ``L = mean(huber(Q(s, a) - y))``, then the target and the
        evaluation average follow. ``y``: the batch's :meth:`td_target`, if already computed.

        TF: ``optimizer.minimize(tf.losses.huber_loss(y, q_sa), global_step=step)``.
        """
        if y is None:
            y = self.td_target(batch)
        q_sa = self.q(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q_sa, y) if self.config.loss == "huber" else F.mse_loss(q_sa, y)
        self.opt.minimize(loss, global_step=self.step)
        self.update_target(after="gradient_step")
        if self.eval_ema is not None:
            self.eval_ema.update()
        return {"loss": loss.detach()}

    def train_burst(self, burst: Batch, n: int) -> dict[str, torch.Tensor]:
        """``n`` gradient steps. With a hard target and no Double DQN, all ``n`` minibatches'
        targets are computed up front, batched: exact, because ``Q'`` only changes between
        environment steps and the vanilla target does not read the online network that the
        burst trains (Double DQN's ``argmax_a' Q(s', a')`` and soft targets do: per step)."""
        if self.hard_target and not self.config.double_dqn:
            return fast.train_burst_fixed_targets(self.td_target, self.train_step, burst, n)
        return super().train_burst(burst, n)

    def on_env_step(self, step: int) -> None:
        self.env_step.value = step
        self.update_target(after="env_step")

    def update_target(self, after: Literal["env_step", "gradient_step"]) -> None:
        """Called after every ``"env_step"`` and every ``"gradient_step"``: a hard ``Q'`` counts
        environment steps (``TargetNetwork(every=N)`` copies on every N-th call), a soft one
        moves ``Q' <- (1 - tau) Q' + tau Q`` after each gradient step."""
        if after == ("env_step" if self.hard_target else "gradient_step"):
            self.q_target.update()

    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"q": self.q, "q_target": self.q_target.module}
        if self.eval_ema is not None:
            nets["q_eval"] = self.q_eval  # the averaged weights that evaluations use
        return nets

    def policy_network(self) -> nn.Module:
        return self.q_eval

    def stateful(self) -> dict:
        state = {
            "q_target": self.q_target,
            "opt": self.opt,
            "step": self.step,
            "env_step": self.env_step,
        }
        if self.eval_ema is not None:
            state["eval_ema"] = self.eval_ema
        return state
