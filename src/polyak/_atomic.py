"""Files written atomically: a temp file in the same directory, flushed and fsync'ed, then
renamed over the target with ``os.replace`` (atomic on POSIX). A process killed at any instant
leaves either the previous file or the new one, never a torn file; what it can leave is a
temp file, named ``.<name>.tmp-<pid>``, which readers ignore and :func:`remove_stale_temps`
deletes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "TEMP_MARK",
    "remove_dead_writers_temps",
    "remove_stale_temps",
    "save_atomic",
    "write_atomic",
]

TEMP_MARK = ".tmp-"


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
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


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def remove_stale_temps(path: str | os.PathLike[str]) -> None:
    """Delete temp files left by a process killed in the middle of writing ``path``."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}{TEMP_MARK}*"):
        tmp.unlink(missing_ok=True)


def remove_dead_writers_temps(directory: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Delete the temp files of ``.<prefix>*`` files in ``directory`` whose writer process
    is gone (on this host), leaving those that a live process is still writing; returns the
    paths removed."""
    removed = []
    for tmp in Path(directory).glob(f".{prefix}*{TEMP_MARK}*"):
        pid = tmp.name.rsplit(TEMP_MARK, 1)[1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a temp file of ours that outlived its write: a crash of an earlier call
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
