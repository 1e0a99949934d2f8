"""polyak.rl.networks: the critic with the action joining at a hidden layer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from polyak.rl.networks import Critic


@pytest.mark.parametrize("action_layer", [0, 1])
def test_critic_equals_concatenation_form(action_layer):
    torch.manual_seed(0)
    critic = Critic(3, 2, [8, 6], action_layer=action_layer)
    s, a = torch.randn(5, 3), torch.randn(5, 2)
    x = s
    for i, layer in enumerate(critic.layers):
        if i == action_layer:  # one Linear over [x, a] with W = [W_x, W_a]
            w = torch.cat([layer.weight, critic.action_in.weight], dim=1)
            x = torch.cat([x, a], dim=1) @ w.T + layer.bias
        else:
            x = layer(x)
        if i < len(critic.layers) - 1:
            x = torch.relu(x)
    torch.testing.assert_close(critic(s, a), x.squeeze(-1))
