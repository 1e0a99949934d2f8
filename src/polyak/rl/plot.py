"""Learning curves from ``metrics.csv``: one run, or the mean and spread of several seeds.

Curves use the evaluation returns (``eval_return``) when the runs have more than the final
evaluation, and the training episode returns otherwise. Several runs are put on a common step
grid (each run's curve is a step function: the latest value at each grid step) and drawn as the
mean with a band from the minimum to the maximum over runs. Needs matplotlib (the ``plot`` extra).

Only repetitions of one experiment are averaged: runs whose configurations (``config.json``)
differ in more than ``seed``, ``device`` and ``threads`` get a curve each, labelled with the keys
that tell them apart. Runs on different environments (returns on different scales) are refused,
naming each run's environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyak.rl.config import config_from_dict
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


# Keys in which runs of one experiment may differ: they change the random draws or the
# arithmetic's order, not what is being measured.
_REPETITION_KEYS = ("seed", "device", "threads")


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The full configuration of the run in ``run_dir`` (missing keys at their defaults)."""
    if not (run_dir / "metrics.csv").is_file():
        raise ValueError(f"{run_dir} is not a run directory of polyak train (no metrics.csv)")
    path = run_dir / "config.json"
    try:
        return dataclasses.asdict(config_from_dict(json.loads(path.read_text())))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path} is missing or not a config ({type(exc).__name__}: {exc}); plotting needs "
            "it to know which runs are seeds of one experiment"
        ) from None


def _experiment(config: dict[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in config.items() if k not in _REPETITION_KEYS}, sort_keys=True
    )


def _group(
    run_dirs: Sequence[Path], groups: Sequence[Sequence[Path]] | None
) -> tuple[list[list[Path]], list[str]]:
    """The curves (lists of runs) and a label for each; refuses runs on different environments,
    and given ``groups`` that mix experiments."""
    dirs = [d for g in groups for d in g] if groups else list(run_dirs)
    configs = {d: _run_config(d) for d in dirs}
    envs = {c["env"] for c in configs.values()}
    if len(envs) > 1:
        runs = ", ".join(f"{d} ({configs[d]['env']})" for d in dirs)
        raise ValueError(
            f"the runs are on {len(envs)} different environments, whose returns do not share an "
            f"axis: {runs}; plot each environment's runs separately"
        )
    if groups is None:
        by_experiment: dict[str, list[Path]] = {}
        for d in dirs:
            by_experiment.setdefault(_experiment(configs[d]), []).append(d)
        curves = list(by_experiment.values())
    else:
        curves = [list(g) for g in groups]
        for g in curves:
            if len({_experiment(configs[d]) for d in g}) > 1:
                keys = _differing_keys([configs[d] for d in g])
                raise ValueError(
                    f"a group mixes runs of different experiments ({', '.join(map(str, g))} "
                    f"differ in {', '.join(keys)}); a group averages seeds of one configuration"
                )
    differing = _differing_keys([configs[g[0]] for g in curves])
    labels = []
    for g in curves:
        cfg = configs[g[0]]
        label = f"{cfg['algo']} {cfg['env']} ({cfg['preset']}"
        label += "".join(f", {k}={json.dumps(cfg[k])}" for k in differing if k not in ("algo",))
        labels.append(f"{label}), {len(g)} run(s)")
    return curves, labels


def _differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    keys = sorted({k for c in configs for k in c} - set(_REPETITION_KEYS))
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def plot_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    groups: Sequence[Sequence[str | os.PathLike[str]]] | None = None,
) -> Path:
    """Draw the runs into ``out``: a curve (mean and min-max band) per experiment, or per
    group of ``groups``. ``ValueError`` for runs on different environments, a directory that is
    not a run, or a group that mixes experiments."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'polyak[plot]'") from exc
    all_groups, labels = _group(
        [Path(d) for d in run_dirs], [[Path(d) for d in g] for g in groups] if groups else None
    )
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    column = _pick_column([d for g in all_groups for d in g])
    for dirs, label in zip(all_groups, labels):
        curves = [load_curve(d, column) for d in dirs]
        curves = [c for c in curves if len(c[0])]
        if not curves:
            continue
        grid = np.unique(np.concatenate([s for s, _ in curves]))
        stacked = np.stack(
            [v[np.clip(np.searchsorted(s, grid, side="right") - 1, 0, None)] for s, v in curves]
        )
        mean = stacked.mean(axis=0)
        (line,) = ax.plot(grid, mean, label=label)
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
