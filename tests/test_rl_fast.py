"""polyak.rl.fast: the fast paths give the plain path's results (burst targets in row
pieces, NumPy greedy actions on live weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from rl_helpers import filled_replay, make_dqn

from polyak.rl.fast import CPU_TARGET_ROWS, GreedyActions
from polyak.rl.networks import QNetwork
from polyak.rl.replay import minibatch


def test_dqn_burst_targets_in_row_pieces_equal_step_by_step():
    """A burst larger than one target piece (CPU: 512 rows; here 3 pieces, the last one
    partial) gives the per-step targets, hence the same losses and weights."""
    n, b = 20, 64
    assert n * b > CPU_TARGET_ROWS * 2
    burst = filled_replay().sample_burst(n, b)
    fast = make_dqn(target_update_interval=4, learning_rate=0.01)
    slow = make_dqn(target_update_interval=4, learning_rate=0.01)
    losses = fast.train_burst(burst, n)
    for k in range(n):
        expected = slow.train_step(minibatch(burst, k, b))
    torch.testing.assert_close(losses["loss"], expected["loss"])
    for x, y in zip(fast.q.parameters(), slow.q.parameters(), strict=True):
        torch.testing.assert_close(x, y)


def test_dqn_greedy_action_follows_the_live_network():
    """The NumPy acting path reads the current weights: after training and after loading."""
    agent = make_dqn(learning_rate=0.05)
    obs = np.random.default_rng(1).normal(size=(200, 3)).astype(np.float32)

    def check():
        q = agent.q(torch.from_numpy(obs)).detach()
        top2 = q.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # skip near-ties (float rounding may differ)
        acts = torch.tensor([agent.act(o, explore=False) for o in obs])
        assert clear.sum() > 150
        assert torch.equal(acts[clear], q.argmax(1)[clear])

    check()
    burst = filled_replay().sample_burst(3, 8)
    agent.train_burst(burst, 3)
    check()
    other = make_dqn(learning_rate=0.05)
    other.q.load_state_dict({k: v + 0.3 for k, v in agent.q.state_dict().items()})
    agent.q.load_state_dict(other.q.state_dict())
    check()
    with torch.no_grad():  # a parameter whose storage is replaced: the views are rebuilt
        agent.q.layers[0].weight.data = agent.q.layers[0].weight.data.clone() * -1.0
    check()


def test_greedy_actions_off_float32_host_memory_use_the_torch_forward():
    """float64 weights (as any device but the CPU) take the network's own forward."""
    torch.manual_seed(0)
    q = QNetwork(3, 4, [8]).double()
    greedy = GreedyActions(torch.device("cpu"), torch.float64)
    assert greedy.host_layers(q) is None
    obs = np.random.default_rng(0).normal(size=(50, 3))
    expected = q(torch.from_numpy(obs)).argmax(1).tolist()
    assert [greedy(q, o) for o in obs] == expected
