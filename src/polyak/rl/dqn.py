"""DQN (Mnih et al. 2015), with the seed's ``stop_gradient`` target.

Per gradient step, on a batch ``(s, a, r, s', terminated)``::

    y = stop_gradient(r + gamma * (1 - terminated) * max_a' Q'(s', a'))
    L = mean(huber(Q(s, a) - y))          # huber = the paper's error clipping to [-1, 1]

Double DQN (van Hasselt et al. 2016) picks the next action with the online network and values
it with the target: ``max_a' Q'(s', a')`` becomes ``Q'(s', argmax_a' Q(s', a'))``.

TF equivalent: ``y = tf.stop_gradient(r + gamma * tf.reduce_max(q_target, 1))``,
``cost = tf.losses.huber_loss(y, q_sa)``, ``optimizer.minimize(cost, global_step)``.

The target network ``Q'`` is a ``polyak.TargetNetwork``: a hard copy every
``target_update_interval`` environment steps (``TargetNetwork(q, every=N)``, as Stable-Baselines3
counts it), or, with ``target_update_interval=0``, a soft update ``Q' <- (1 - tau) Q' + tau Q``
after every gradient step. Only ``terminated`` cuts the bootstrap: a time-limit end (truncated)
still has a future. Exploration is epsilon-greedy with epsilon annealed linearly from
``eps_initial`` to ``eps_final`` over the first ``eps_fraction * total_steps`` steps.

Averaged evaluation weights (``eval_ema_decay > 0``; on in the zoo CartPole-v1 preset, off
otherwise): a ``polyak.ExponentialMovingAverage`` of the online network's weights, stepped after
every gradient step (with ``eval_ema_num_updates``, TF's ``num_updates`` rule on the
gradient-step count: decay ``min(eval_ema_decay, (1 + n) / (10 + n))``), whose
``average_module`` (``q_eval``, sharing memory with the shadows) is the network that greedy
actions (``act(explore=False)``: every evaluation) use. Training targets, the loss and
exploration keep using the online network. The average is checkpointed with the
rest of the training state.

Speed (same results as step-by-step training, tested): ``train_burst`` computes the targets of a
whole training burst at once (in 512-row pieces on CPU) when the target is hard and vanilla (it
cannot change during a burst); the online network is ``polyak.flatten_parameters_``-ed (one
buffer for the target copy and the average; one for the gradients too when Adam is not fused);
greedy actions on CPU run in NumPy on views of the weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import polyak
from polyak.rl.agent import Agent, adam
from polyak.rl.config import DQNConfig
from polyak.rl.networks import QNetwork
from polyak.rl.replay import Batch, minibatch
from polyak.rl.validation import validate_config

__all__ = ["DQN", "linear_epsilon"]

# Rows per forward pass of the batched target on CPU. The whole burst at once (8192 rows for the
# zoo's CartPole) makes multi-MB activations that miss the caches and page-fault as fresh
# allocations: 57 ms per burst against 19 ms in 512-row pieces, which stay in cache
# (benchmarks/bench_rl_dqn_step.py). Same arithmetic per row, so the same targets.
_CPU_TARGET_ROWS = 512


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
        self.q = QNetwork(obs_dim, n_actions, config.net_arch, config.final_init).to(device)
        inner = adam(self.q.parameters(), config.learning_rate)
        # One contiguous buffer for the weights: the target copy and the evaluation average are
        # one kernel each. Gradients get one too unless Adam is fused: it takes all tensors in
        # one kernel anyway, and autograd's own gradients then need no zeroing and no copy.
        polyak.flatten_parameters_(self.q, grads=not inner.defaults["fused"])
        self.dtype = next(self.q.parameters()).dtype
        self.hard_target = config.target_update_interval > 0
        if self.hard_target:
            self.q_target = polyak.TargetNetwork(self.q, every=config.target_update_interval)
        else:
            self.q_target = polyak.TargetNetwork(self.q, tau=config.tau)
        transforms = []
        if config.max_grad_norm > 0:
            transforms.append(polyak.transforms.clip_by_global_norm(config.max_grad_norm))
        self.opt = polyak.Optimizer(inner, transforms=transforms)
        self.step = polyak.GlobalStep()  # gradient steps
        # The network of greedy (evaluation) actions: the online one, or the EMA of its weights.
        self.eval_ema: polyak.ExponentialMovingAverage | None = None
        self.q_eval: nn.Module = self.q
        if config.eval_ema_decay != 0.0:
            self.eval_ema = polyak.ExponentialMovingAverage(
                config.eval_ema_decay,
                num_updates=self.step if config.eval_ema_num_updates else None,
            )
            self.eval_ema.track(self.q)  # starts equal to the online network
            self.q_eval = self.eval_ema.average_module(self.q)
        # NumPy views of a network's layers for the CPU acting path: id(net) -> (key, layers).
        self._host: dict[int, tuple[tuple[int, ...], list[tuple[np.ndarray, np.ndarray]]]] = {}
        self.env_step = polyak.GlobalStep()  # environment steps seen, for the epsilon schedule

    @property
    def epsilon(self) -> float:
        return linear_epsilon(int(self.env_step), self.config)

    def act(self, obs: np.ndarray, explore: bool) -> int:
        # Draw the coin first and skip the network on a random action: fewer forward passes.
        if explore and self.rng.random() < self.epsilon:
            return int(self.rng.integers(self.n_actions))
        net = self.q if explore else self.q_eval
        layers = self._host_layers(net)
        if layers is None:
            with torch.inference_mode():
                return int(net(self.obs_tensor(obs)).argmax())
        # One observation through the MLP in NumPy, on views of the live parameters: a few
        # microseconds where torch's per-op dispatch costs about 80 (acting is most of the
        # time of an environment step).
        x = np.asarray(obs, dtype=np.float32)
        last = len(layers) - 1
        for i, (w, b) in enumerate(layers):
            x = w @ x + b
            if i < last:
                np.maximum(x, 0.0, out=x)
        return int(x.argmax())

    def _host_layers(self, net: nn.Module) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """NumPy views ``(W, b)`` of ``net``'s layers (the online network or ``q_eval``), if it
        lives in float32 host memory; rebuilt whenever a parameter's storage changed (views
        never go stale)."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        # The layers' own tensors, not net.parameters(): walking the module tree cost more than
        # the matrix-vector products this guards.
        modules = net.layers  # type: ignore[union-attr]
        key = tuple(t.data_ptr() for layer in modules for t in (layer.weight, layer.bias))
        cached = self._host.get(id(net))
        if cached is None or cached[0] != key:
            layers = [
                (layer.weight.detach().numpy(), layer.bias.detach().numpy()) for layer in modules
            ]
            cached = self._host[id(net)] = (key, layers)
        return cached[1]

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

    def train_burst(self, burst: Batch, n: int) -> dict[str, torch.Tensor]:
        """``n`` gradient steps; with a hard target and no Double DQN, all ``n`` minibatches'
        targets are computed up front, batched (in 512-row pieces on CPU).

        That is exact, not an approximation: hard copies happen in ``on_env_step``, between
        bursts, so ``Q'`` is the same network for every step of a burst, and the vanilla target
        ``max_a' Q'(s', a')`` does not involve the online network that the burst trains. (Double
        DQN's ``argmax_a' Q(s', a')`` and soft targets change with every step: per-step path.)
        """
        if not self.hard_target or self.config.double_dqn:
            return super().train_burst(burst, n)
        rows = burst.obs.shape[0]
        batch_size = rows // n
        chunk = _CPU_TARGET_ROWS if self.device.type == "cpu" else rows
        with torch.no_grad():
            targets = torch.cat(
                [self.td_target(minibatch(burst, k, chunk)) for k in range(-(-rows // chunk))]
            )
        losses: dict[str, torch.Tensor] = {}
        for k in range(n):
            sl = slice(k * batch_size, (k + 1) * batch_size)
            losses = self._gradient_step(burst.obs[sl], burst.actions[sl], targets[sl])
        return losses

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self._gradient_step(batch.obs, batch.actions, self.td_target(batch))

    def _gradient_step(
        self, obs: torch.Tensor, actions: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        q_sa = self.q(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q_sa, y) if self.config.loss == "huber" else F.mse_loss(q_sa, y)
        self.opt.minimize(loss, global_step=self.step)
        if not self.hard_target:
            self.q_target.update()
        if self.eval_ema is not None:
            self.eval_ema.update()
        return {"loss": loss.detach()}

    def on_env_step(self, step: int) -> None:
        self.env_step.value = step
        if self.hard_target:
            self.q_target.update()  # counts environment steps; copies on every N-th call

    def networks(self) -> dict[str, nn.Module]:
        nets = {"q": self.q, "q_target": self.q_target.module}
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
