"""Uniform experience replay, preallocated for its whole capacity.

Each transition is one row of a ``[capacity, width]`` array::

    [ obs (d) | action (a) | reward | next_obs (d) | terminated | truncated ]

so sampling a batch is one gather over rows and one host-to-device copy, instead of one per
field. The memory is known up front (``capacity * width * itemsize``) and checked against what
the machine has free before anything is allocated, so a buffer that cannot fit fails at once with
the numbers, not hours later with the OOM killer.

``terminated`` and ``truncated`` are stored separately: a time-limit end (truncated) does not mean
the state has no future, so its target still bootstraps from ``next_obs``; only a true terminal
state (terminated) drops the bootstrap term. The agents use ``1 - terminated`` as the mask.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["Batch", "ReplayBuffer", "available_memory", "minibatch"]


class Batch(NamedTuple):
    """A sampled minibatch, on the buffer's device. Discrete actions come back as ``int64``."""

    obs: torch.Tensor  # [B, d]
    actions: torch.Tensor  # [B, a] float, or [B] int64 for discrete actions
    rewards: torch.Tensor  # [B]
    next_obs: torch.Tensor  # [B, d]
    terminated: torch.Tensor  # [B] float 0/1: no bootstrap
    truncated: torch.Tensor  # [B] float 0/1: time-limit end, still bootstraps


def minibatch(burst: Batch, k: int, batch_size: int) -> Batch:
    """Minibatch ``k`` of a burst from :meth:`ReplayBuffer.sample_burst` (row views, no copy)."""
    rows = slice(k * batch_size, (k + 1) * batch_size)
    return Batch(*(field[rows] for field in burst))


def available_memory() -> int:
    """Bytes of host memory available to a new allocation (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ReplayBuffer:
    """A ring buffer of ``capacity`` transitions, sampled uniformly with a NumPy ``Generator``.

    ``action_dim=0`` means a discrete action (one integer, stored exactly as a float up to 2**24).
    Rows live in host memory; ``sample`` returns tensors on ``device`` in ``dtype``.
    """

    def __init__(
        self,
        capacity: int,
        obs_dim: int,
        action_dim: int,
        *,
        rng: np.random.Generator,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}")
        self.capacity, self.obs_dim, self.action_dim = capacity, obs_dim, action_dim
        self.discrete = action_dim == 0
        a = 1 if self.discrete else action_dim
        # Column offsets of the row layout described in the module docstring.
        self._act = slice(obs_dim, obs_dim + a)
        self._rew = obs_dim + a
        self._next = slice(self._rew + 1, self._rew + 1 + obs_dim)
        self._term = self._rew + 1 + obs_dim
        self.width = self.row_width(obs_dim, action_dim)
        self.rng, self.device, self.dtype = rng, torch.device(device), dtype
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self.nbytes = capacity * self.width * np_dtype.itemsize
        free = available_memory()
        if self.nbytes > free:
            raise MemoryError(
                f"ReplayBuffer: {capacity} transitions x {self.width} values x "
                f"{np_dtype.itemsize} bytes = {self.nbytes / 2**20:.1f} MiB, but only "
                f"{free / 2**20:.1f} MiB of memory is available; lower buffer_size "
                "(--set buffer_size=N)."
            )
        # np.zeros, not np.empty: rows beyond `size` are never read, but zeros keep the
        # checkpointed prefix and any debugging dump deterministic.
        self._data = np.zeros((capacity, self.width), dtype=np_dtype)
        self.pos = 0
        self.size = 0

    @staticmethod
    def row_width(obs_dim: int, action_dim: int) -> int:
        """Values per transition: ``obs, action (1 if discrete), reward, next_obs, terminated,
        truncated``."""
        return 2 * obs_dim + max(action_dim, 1) + 3

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: np.ndarray,
        action: np.ndarray | int,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
        truncated: bool,
    ) -> None:
        """Store one transition, overwriting the oldest once full."""
        row = self._data[self.pos]
        row[: self.obs_dim] = obs
        row[self._act] = action
        row[self._rew] = reward
        row[self._next] = next_obs
        row[self._term] = terminated
        row[self._term + 1] = truncated
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement."""
        return self.sample_burst(1, batch_size)

    def sample_burst(self, n: int, batch_size: int) -> Batch:
        """The ``n`` minibatches of a training burst, stacked: ``n * batch_size`` rows.

        All indices are drawn in one call, ``rng.integers(0, size, size=(n, batch_size))``
        (row ``k`` is minibatch ``k``), then gathered and copied to the device once; split the
        result with :func:`minibatch`. ``n=1`` is :meth:`sample`, draw for draw. The indices are
        drawn from the buffer as it is when the burst starts, which is what drawing them one
        minibatch at a time gives too: nothing is added to the buffer during a burst.
        """
        if self.size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        idx = self.rng.integers(0, self.size, size=(n, batch_size))
        rows = self._data[idx.reshape(-1)]
        t = torch.from_numpy(rows).to(self.device)
        actions = t[:, self._act]
        return Batch(
            obs=t[:, : self.obs_dim],
            actions=actions[:, 0].long() if self.discrete else actions,
            rewards=t[:, self._rew],
            next_obs=t[:, self._next],
            terminated=t[:, self._term],
            truncated=t[:, self._term + 1],
        )

    def state_dict(self) -> dict[str, Any]:
        """The filled rows as a tensor and the write position (loads with ``weights_only``)."""
        return {
            "data": torch.from_numpy(self._data[: self.size].copy()),
            "pos": self.pos,
            "size": self.size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state["data"]
        if data.ndim != 2 or data.shape[1] != self.width or data.shape[0] > self.capacity:
            raise ValueError(
                f"ReplayBuffer.load_state_dict: rows of shape {tuple(data.shape)} do not fit a "
                f"buffer of {self.capacity} x {self.width}"
            )
        self._data[: data.shape[0]] = data.numpy()
        self.pos, self.size = int(state["pos"]), int(state["size"])
