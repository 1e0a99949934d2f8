"""polyak.rl.replay: storage, ring wrap, burst sampling, state dicts, the memory check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from rl_helpers import filled_replay

from polyak.rl import replay as replay_mod
from polyak.rl.replay import ReplayBuffer, minibatch


def test_replay_stores_terminated_and_truncated_separately_and_wraps():
    rb = ReplayBuffer(3, obs_dim=2, action_dim=0, rng=np.random.default_rng(0))
    for i in range(4):  # the 4th overwrites row 0
        rb.add(np.full(2, i), i % 2, float(i), np.full(2, i + 0.5), i == 1, i == 2)
    assert len(rb) == 3 and rb.pos == 1
    b = rb.sample(64)
    assert b.actions.dtype == torch.int64
    rewards = b.rewards.tolist()
    assert set(rewards) == {1.0, 2.0, 3.0}  # 0 was overwritten
    for r, term, trunc, a, o, no in zip(
        rewards, b.terminated, b.truncated, b.actions, b.obs, b.next_obs, strict=True
    ):
        assert term == (r == 1.0) and trunc == (r == 2.0)
        assert a == int(r) % 2 and torch.all(o == r) and torch.all(no == r + 0.5)


def test_replay_state_dict_roundtrip():
    rng = np.random.default_rng(0)
    rb = ReplayBuffer(10, obs_dim=3, action_dim=2, rng=rng)
    for i in range(7):
        rb.add(np.ones(3) * i, np.array([0.5, -0.5]), 1.0, np.zeros(3), False, True)
    other = ReplayBuffer(10, obs_dim=3, action_dim=2, rng=np.random.default_rng(0))
    other.load_state_dict(rb.state_dict())
    assert (other.pos, other.size) == (7, 7)
    assert np.array_equal(other._data, rb._data)


def test_sample_burst_draws_all_indices_at_once_and_n1_is_sample():
    a, b = filled_replay(), filled_replay()
    for x, y in zip(a.sample(8), b.sample_burst(1, 8), strict=True):
        assert torch.equal(x, y)
    # One draw of shape (n, batch): minibatch k is row k of the index matrix.
    idx = np.random.default_rng(0).integers(0, 50, size=(5, 8))
    burst = filled_replay().sample_burst(5, 8)
    assert burst.obs.shape == (40, 3) and burst.actions.shape == (40,)
    for k in range(5):
        mb = minibatch(burst, k, 8)
        assert mb.rewards.tolist() == [float(i) for i in idx[k]]
        assert mb.actions.tolist() == [int(i) % 3 for i in idx[k]]
        assert torch.equal(mb.next_obs[:, 0], mb.rewards + 0.5)
        assert mb.terminated.tolist() == [float(i % 7 == 0) for i in idx[k]]


def test_replay_memory_is_checked_up_front(monkeypatch):
    monkeypatch.setattr(replay_mod, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"MiB of memory is available.*buffer_size"):
        ReplayBuffer(1000, obs_dim=3, action_dim=1, rng=np.random.default_rng(0))
    ReplayBuffer(10, obs_dim=3, action_dim=1, rng=np.random.default_rng(0))  # 10*10*4 fits
