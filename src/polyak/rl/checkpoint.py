"""Atomic checkpoint files and the random-number-generator states they carry.

A checkpoint is a plain nested dict of tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it without unpickling any code. It is written to a
temporary file in the same directory, flushed and fsync'ed, then renamed over the old one with
``os.replace`` (atomic on POSIX): a process killed at any instant leaves either the previous
checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "get_rng_state",
    "load_checkpoint",
    "remove_stale_temps",
    "save_atomic",
    "set_rng_state",
]


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` via a temp file + fsync + ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # Make the rename itself durable (a crash of the machine, not just the process).
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike[str]) -> None:
    """Delete temp files left by a process killed in the middle of :func:`save_atomic`."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``; modules move it to their device."""
    return torch.load(path, map_location="cpu", weights_only=True)


def get_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The NumPy generator's and torch's global CPU generator's states, checkpointable."""
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
