"""The run directory: who may write it (a lock), which run it holds (``config.json``), and its
JSON files (written atomically, never holding NaN or Infinity).

``train`` checks a run directory without writing to it (:func:`check_run_dir`: the path can be
a directory we may write, and any ``config.json`` there is readable and matches the run), builds
everything, and only then takes the directory (:class:`RunDirLock`) and writes ``config.json``
(:func:`write_config`). A ``train`` that fails on a bad value or a busy directory leaves the
directory as it was: a corrected command is never refused because of a failed one.

The lock is ``fcntl.flock`` on ``.lock`` in the run directory, held for the whole run; a second
``train`` on the directory is refused, naming the holder's pid. The kernel drops the lock when
its process ends, however it ends (SIGKILL too), so a lock never outlives its process; and as
only the holder writes, temporary files that the holder finds were left by a writer that is
gone, and may be removed. POSIX only (``fcntl``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from polyak._atomic import write_atomic
from polyak.rl.config import RunConfig, stored_config_diff

__all__ = [
    "ConfigMismatchError",
    "RunDirError",
    "RunDirLock",
    "check_run_dir",
    "check_same_run",
    "finite_or_null",
    "write_config",
    "write_json",
]

LOCK_NAME = ".lock"


class RunDirError(ValueError):
    """The run directory cannot be used: not a directory, not writable, busy, or unreadable."""


class ConfigMismatchError(RunDirError):
    """The run directory holds a run made with a different configuration."""


def check_run_dir(run_dir: Path, config: RunConfig) -> bool:
    """Check, writing nothing, that ``run_dir`` can hold ``config``'s run; True if it has a
    ``config.json`` (which then matches ``config``).

    Raises :class:`RunDirError` if the path (or a parent) is a file, or is not writable, or its
    ``config.json`` is not a readable config; :class:`ConfigMismatchError` naming the keys if
    the ``config.json`` is another run's.
    """
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "the run directory" if existing == run_dir else f"{existing}, a parent of it,"
        raise RunDirError(f"run dir {run_dir}: {what} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(
            f"run dir {run_dir}: {existing} is not writable; use another --run-dir or fix its "
            "permissions"
        )
    path = run_dir / "config.json"
    if not path.exists():
        return False
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDirError(
            f"{path} is not a readable config ({type(exc).__name__}: {exc}); polyak train wrote "
            "it at the start of the run: restore it, or use another --run-dir"
        ) from None
    if not isinstance(stored, dict):
        raise RunDirError(f"{path} does not hold a config (a JSON object); use another --run-dir")
    check_same_run(path, stored, config)
    return True


def check_same_run(source: Path, stored: dict[str, Any], config: RunConfig) -> None:
    """Raise :class:`ConfigMismatchError` naming the differing keys (and both seeds, if they
    differ) unless ``stored``, the config saved in ``source`` (``config.json``, a checkpoint),
    is ``config``: a run directory continues only its own run."""
    diff = stored_config_diff(stored, config)
    if not diff:
        return
    lead = f"{source} was made by a run with a different configuration"
    if stored.get("seed") != config.seed:
        lead = (
            f"{source} was made with seed {stored.get('seed')!r} and this run has seed "
            f"{config.seed}: resuming it would not be the run of seed {config.seed}"
        )
    raise ConfigMismatchError(
        f"{lead}; differing keys:\n  "
        + "\n  ".join(diff)
        + "\nUse another --run-dir, or repeat the original command to resume."
    )


def write_config(run_dir: Path, config: RunConfig) -> None:
    """Write ``config.json`` unless the directory has one (checked by :func:`check_run_dir`)."""
    path = run_dir / "config.json"
    if not path.exists():
        write_json(path, dataclasses.asdict(config))


class RunDirLock:
    """Exclusive use of a run directory by one process, as a context manager.

    Entering creates the directory (and its parents) if needed and locks ``.lock`` in it,
    writing this process's pid there; a directory locked by another process raises
    :class:`RunDirError` with that pid. Leaving removes ``.lock`` and unlocks it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        import fcntl

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise RunDirError(
                        f"run dir {self.run_dir} is in use by another polyak train (pid "
                        f"{holder}); wait for it to end, or use another --run-dir"
                    ) from None
                # The previous holder removes the file before it unlocks: if that happened
                # between our open and our lock, we hold a file nobody else will open. Retry.
                if _same_file(fd, self.path):
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:  # not writable: permissions, a read-only file system
            raise RunDirError(
                f"run dir {self.run_dir} is not writable ({exc.strerror}: {exc.filename}); use "
                "another --run-dir or fix its permissions"
            ) from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: see __enter__
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def finite_or_null(value: Any, name: str, warnings: list[str]) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts and lists) replaced by
    ``None``, each replacement reported in ``warnings`` under its path (``name[2]``,
    ``name.key``). JSON has no NaN or Infinity; Python's ``json`` writes tokens that other
    readers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        warnings.append(f"{name} was {value} (not finite): written as null")
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v, f"{name}.{k}", warnings) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v, f"{name}[{i}]", warnings) for i, v in enumerate(value)]
    return value


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (:func:`polyak._atomic.write_atomic`). Refuses
    NaN and Infinity (``ValueError``): pass the object through :func:`finite_or_null` first."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))
