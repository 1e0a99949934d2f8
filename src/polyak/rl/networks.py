"""The networks of the agents: plain MLPs with ReLU, sized by ``net_arch``.

Initialization follows the DDPG paper: hidden layers use PyTorch's default
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (the paper's rule), and when ``final_init > 0`` the output
layer is drawn from ``U(-final_init, final_init)`` (3e-3 in the paper) so the first policy and
Q-values are near zero. ``final_init = 0`` keeps the default init, as Stable-Baselines3 does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Actor", "Critic", "QNetwork"]


def _mlp(sizes: Sequence[int]) -> list[nn.Linear]:
    return [nn.Linear(i, o) for i, o in itertools.pairwise(sizes)]


def _relu_mlp(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    # Indexing, not ``layers[:-1]``: slicing a ModuleList builds a new module on every call,
    # which costs more than the forward pass itself for one observation. ``F.linear`` on the
    # layer's own weights is exactly ``layer(x)`` without the module-call machinery (hooks are
    # not used on these layers), whose per-call cost is a visible share of acting on one
    # observation and of a small network's gradient step.
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        x = F.linear(x, layer.weight, layer.bias)
        if i < last:
            x = torch.relu(x)
    return x


def _init_final(layer: nn.Linear, bound: float) -> None:
    if bound > 0:
        nn.init.uniform_(layer.weight, -bound, bound)
        nn.init.uniform_(layer.bias, -bound, bound)


class Actor(nn.Module):
    """Deterministic policy ``mu(s) = tanh(MLP(s))`` in the normalized action box [-1, 1]."""

    def __init__(
        self, obs_dim: int, action_dim: int, net_arch: Sequence[int], final_init: float = 0.0
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_mlp([obs_dim, *net_arch, action_dim]))
        _init_final(self.layers[-1], final_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(_relu_mlp(self.layers, obs))


class Critic(nn.Module):
    """Action-value ``Q(s, a)``; the action joins after ``action_layer`` hidden layers.

    ``action_layer=1`` is the DDPG paper's critic ("actions were not included until the 2nd
    hidden layer of Q"), written as TF1 implementations write it: ``h1 = relu(s W1 + b1)``,
    ``h2 = relu(h1 W2 + a W3 + b2)``, ``Q = h2 W4 + b4``.
    ``action_layer=0`` feeds the action into the first layer (``s W1 + a W3 + b1``), the same
    function as concatenating ``[s, a]`` at the input (TD3, Stable-Baselines3).

    The action has its own weight matrix ``W3`` (``action_in``) rather than being concatenated,
    so ``dQ/da`` (the actor update) back-propagates through ``W3`` alone: no
    ``[batch, hidden, hidden]`` product for the gradient of ``h1`` that nobody needs. ``W2`` and
    ``W3`` are drawn as one ``Linear`` over ``[h1, a]`` would be: ``U(+-1/sqrt(h1 + a_dim))``.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        net_arch: Sequence[int],
        action_layer: int = 1,
        final_init: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= action_layer < max(len(net_arch), 1):
            raise ValueError(
                f"Critic: action_layer must be in [0, {len(net_arch) - 1}] for net_arch "
                f"{list(net_arch)}, got {action_layer}"
            )
        sizes = [obs_dim, *net_arch, 1]
        self.action_layer = action_layer
        self.layers = nn.ModuleList(_mlp(sizes))
        self.action_in = nn.Linear(action_dim, sizes[action_layer + 1], bias=False)
        joined = self.layers[action_layer]
        bound = (sizes[action_layer] + action_dim) ** -0.5
        for tensor in (joined.weight, joined.bias, self.action_in.weight):
            nn.init.uniform_(tensor, -bound, bound)
        _init_final(self.layers[-1], final_init)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``Q(s, a)`` of shape ``[B]``."""
        x = obs
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == self.action_layer:
                x = x + self.action_in(action)
            if i < last:
                x = torch.relu(x)
        return x.squeeze(-1)


class QNetwork(nn.Module):
    """``Q(s, .)``: one value per discrete action, shape ``[B, n_actions]``."""

    def __init__(
        self, obs_dim: int, n_actions: int, net_arch: Sequence[int], final_init: float = 0.0
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_mlp([obs_dim, *net_arch, n_actions]))
        _init_final(self.layers[-1], final_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return _relu_mlp(self.layers, obs)
