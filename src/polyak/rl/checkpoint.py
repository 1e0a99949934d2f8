"""Atomic checkpoint files and the random-number-generator states they carry.

A checkpoint is a plain nested dict of tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it without unpickling any code. It is written
with :func:`save_atomic` (temp file, fsync, ``os.replace``): a process killed at any instant
leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from polyak._atomic import remove_stale_temps, save_atomic

__all__ = [
    "CheckpointError",
    "get_rng_state",
    "load_checkpoint",
    "remove_stale_temps",
    "restoring",
    "save_atomic",
    "set_rng_state",
]


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable (truncated, not a torch file, pickled code)
    or not the checkpoint expected (another kind of file, another run)."""


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``; modules move it to their device.

    A file that does not load (truncated, empty, not written by ``torch.save``, or holding
    pickled objects other than tensors and containers) raises :class:`CheckpointError` naming
    the file; so does one that holds something other than a dict.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load reports a damaged file as whatever its reader hit first (RuntimeError from the
    # zip reader, EOFError, KeyError, UnpicklingError, ...): any failure means "unreadable".
    except Exception as exc:
        reason = _first_line(exc)
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}"
            + (f": {reason}" if reason else "")
            + "); it may be truncated or another kind of file. Move it away to start the run "
            "over, or use another --run-dir"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint (a dict)")
    return obj


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, at most 200 characters ("" when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


@contextlib.contextmanager
def restoring(path: str | os.PathLike[str]) -> Iterator[None]:
    """Around code that loads the entries of the checkpoint at ``path`` into modules: an entry
    that is missing or does not fit (a ``KeyError``, a shape mismatch in ``load_state_dict``,
    ...) becomes a :class:`CheckpointError` naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        detail = _first_line(exc)
        raise CheckpointError(
            f"{path} does not fit this run ({type(exc).__name__}: {detail}); it was not written "
            "for this configuration. Move it away to start the run over, or use another --run-dir"
        ) from None


def get_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The NumPy generator's and torch's global CPU generator's states, checkpointable."""
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
