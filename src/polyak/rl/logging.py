"""Run logs: ``metrics.csv`` (always), TensorBoard events (when ``tensorboard`` is installed),
and the live progress bar.

``metrics.csv`` is one sparse table, one row per event, empty cells where a column does not
apply::

    step, episode_return, episode_length, eval_return, <the agent's losses>...,
    eval_return_std, eval_return_min, eval_return_max

- an episode end fills ``episode_return`` and ``episode_length``;
- every ``log_every`` steps a row holds the latest losses;
- each evaluation fills ``eval_return`` (mean over its deterministic episodes) and the spread
  of the episodes' returns (:func:`eval_columns`; population std, as ``final_eval_std``). These
  three come last, after the losses, so every earlier column keeps its position.

A value that is NaN or infinite (a diverged loss, an environment's NaN reward) leaves its cell
empty: CSV readers disagree on ``nan``/``inf`` tokens. The logger counts such values per column
(:meth:`MetricsLogger.warnings`; kept in the checkpoint) and the run reports them in
``summary.json``'s ``warnings``. TensorBoard receives the values as they are.

Only values that are a function of the seed go in, no wall-clock times, so two runs of the same
command give identical files. On resume, rows past the checkpoint's step (written by the killed
process after its last checkpoint) are dropped, and TensorBoard purges them too; so is the final
evaluation's row of a finished run, which re-running ``train`` on it evaluates and logs again.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MetricsLogger", "Progress", "eval_columns", "read_metrics"]

BASE_COLUMNS = ("step", "episode_return", "episode_length", "eval_return")
EVAL_SPREAD_COLUMNS = ("eval_return_std", "eval_return_min", "eval_return_max")


def eval_columns(returns: Sequence[float]) -> dict[str, float]:
    """An evaluation's row: the mean of its episodes' returns and their spread."""
    return {
        "eval_return": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "eval_return_min": float(np.min(returns)),
        "eval_return_max": float(np.max(returns)),
    }


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a ``metrics.csv``, skipping a torn last line left by a killed process."""
    with open(path, newline="") as f:
        text = f.read()
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not text.endswith("\n"):
        rows.pop()
    return rows


class MetricsLogger:
    """Appends rows to ``metrics.csv`` and mirrors scalars to TensorBoard when available."""

    def __init__(
        self,
        run_dir: Path,
        loss_keys: Sequence[str],
        resume_step: int,
        final_step: int | None = None,
        nonfinite: dict[str, list[int]] | None = None,
    ) -> None:
        """``final_step``: the run's last step, whose evaluation row (logged after the last
        checkpoint) is dropped on resume, as it is logged again when the run ends.
        ``nonfinite``: the count of the rows kept, from the checkpoint (see :attr:`nonfinite`).
        """
        self.columns = [*BASE_COLUMNS, *loss_keys, *EVAL_SPREAD_COLUMNS]
        # column -> [number of NaN/infinite values left out, step of the first one]
        self.nonfinite: dict[str, list[int]] = {k: list(v) for k, v in (nonfinite or {}).items()}
        self.path = run_dir / "metrics.csv"
        if resume_step > 0 and self.path.exists():
            kept = [
                r
                for r in read_metrics(self.path)
                if int(r["step"]) <= resume_step
                and not (int(r["step"]) == final_step and r.get("eval_return"))
            ]
        else:
            kept = []
        tmp = self.path.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 (closed in close())
        self._writer = csv.DictWriter(self._file, self.columns)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional `tensorboard` extra
            pass
        else:
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, **values: float) -> None:
        cells = {}
        for key, value in values.items():
            if math.isfinite(value):
                cells[key] = f"{value:.9g}"
            else:
                count = self.nonfinite.setdefault(key, [0, step])
                count[0] += 1
        self._writer.writerow({"step": step, **cells})
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)

    def warnings(self) -> list[str]:
        """One line per column that had NaN or infinite values, for ``summary.json``."""
        return [
            f"metrics.csv: {count} {key} value(s) were NaN or infinite (the first at step "
            f"{first}); their cells are empty"
            for key, (count, first) in self.nonfinite.items()
        ]

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A rich progress bar: steps, steps/s, the recent training return, ETA.

    Refreshed at most every 0.2 s from ``update`` so the training loop pays one
    ``time.monotonic()`` call per step.
    """

    def __init__(self, total: int, start: int, description: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self._next_refresh = 0.0
        self._recent: list[float] = []
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7} steps/s"),
            TextColumn("return {task.fields[ret]:>8}"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task(
            description, total=total, completed=start, rate="-", ret="-"
        )
        self._t0, self._s0 = time.monotonic(), start
        self._bar.start()

    def episode(self, ret: float) -> None:
        self._recent = [*self._recent[-9:], ret]

    def update(self, step: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next_refresh and not force:
            return
        self._next_refresh = now + 0.2
        rate = (step - self._s0) / max(now - self._t0, 1e-9)
        ret = f"{sum(self._recent) / len(self._recent):.1f}" if self._recent else "-"
        self._bar.update(self._task, completed=step, rate=f"{rate:.0f}", ret=ret)

    def close(self) -> None:
        if self.enabled:
            self._bar.stop()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
