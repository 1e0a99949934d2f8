"""Atomic checkpoint files and the random-number-generator states they carry.

A checkpoint is a plain nested dict of tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it without unpickling any code. It is written
with :func:`save_atomic` (temp file, fsync, ``os.replace``): a process killed at any instant
leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from polyak._atomic import remove_stale_temps, save_atomic

__all__ = [
    "get_rng_state",
    "load_checkpoint",
    "remove_stale_temps",
    "save_atomic",
    "set_rng_state",
]


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``; modules move it to their device."""
    return torch.load(path, map_location="cpu", weights_only=True)


def get_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The NumPy generator's and torch's global CPU generator's states, checkpointable."""
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
