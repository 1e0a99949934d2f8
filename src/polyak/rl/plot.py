"""Learning curves from ``metrics.csv``: one run, or the mean and spread of several seeds.

Curves use the evaluation returns (``eval_return``) when the runs have more than the final
evaluation, and the training episode returns otherwise. Several runs are put on a common step
grid (each run's curve is a step function: the latest value at each grid step) and drawn as the
mean with a band from the minimum to the maximum over runs. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from polyak.rl.logging import read_metrics

__all__ = ["load_curve", "plot_runs"]


def load_curve(run_dir: str | os.PathLike[str], column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the rows of ``run_dir/metrics.csv`` that have ``column``."""
    rows = [r for r in read_metrics(Path(run_dir) / "metrics.csv") if r.get(column)]
    steps = np.array([int(r["step"]) for r in rows], dtype=np.int64)
    values = np.array([float(r[column]) for r in rows], dtype=np.float64)
    return steps, values


def _pick_column(run_dirs: Sequence[Path]) -> str:
    evals = [load_curve(d, "eval_return")[0] for d in run_dirs]
    return "eval_return" if all(len(s) > 1 for s in evals) else "episode_return"


def _label(run_dirs: Sequence[Path]) -> str:
    try:
        cfg = json.loads((run_dirs[0] / "config.json").read_text())
    except (OSError, ValueError):
        return str(run_dirs[0])
    return f"{cfg['algo']} {cfg['env']} ({cfg.get('preset', '?')}), {len(run_dirs)} run(s)"


def plot_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    groups: Sequence[Sequence[str | os.PathLike[str]]] | None = None,
) -> Path:
    """Draw the runs (one curve, mean and min-max band) or ``groups`` of runs into ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'polyak[plot]'") from exc
    all_groups = [list(map(Path, g)) for g in (groups or [run_dirs])]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    column = _pick_column([d for g in all_groups for d in g])
    for dirs in all_groups:
        curves = [load_curve(d, column) for d in dirs]
        curves = [c for c in curves if len(c[0])]
        if not curves:
            continue
        grid = np.unique(np.concatenate([s for s, _ in curves]))
        stacked = np.stack(
            [v[np.clip(np.searchsorted(s, grid, side="right") - 1, 0, None)] for s, v in curves]
        )
        mean = stacked.mean(axis=0)
        (line,) = ax.plot(grid, mean, label=_label(dirs))
        if len(curves) > 1:
            ax.fill_between(
                grid, stacked.min(axis=0), stacked.max(axis=0), alpha=0.25, color=line.get_color()
            )
    ax.set_xlabel("environment steps")
    ax.set_ylabel("evaluation return" if column == "eval_return" else "episode return")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
