"""Learning curves from ``metrics.csv``: one run, or the mean and spread of several seeds.

Two panels share the step axis:

- **returns**: the training episode returns (one run: faint raw returns and, bold, their mean
  over the last ``smooth_window`` episodes; several runs: the mean over runs of that smoothed
  curve, in a band from the minimum to the maximum over runs), and the evaluations as markers
  (one run: the mean over its episodes, a bar from the worst to the best episode; several runs:
  the mean over runs, a bar from the lowest to the highest run);
- **losses**: the logged losses (several runs: mean and min-max band); a second loss (DDPG's and
  TD3's ``actor_loss``) has its own scale, on the right.

A dotted vertical line marks ``learning_starts`` (from ``config.json``) when all runs share it.
Several runs are put on a common step grid: each run's curve is a step function, the latest
value at each grid step. Runs logged before the evaluation spread was get markers without
bars. Needs matplotlib (the ``plot`` extra).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from polyak.rl.config import config_from_dict
from polyak.rl.logging import read_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["RunCurves", "draw_runs", "load_curve", "load_run", "plot_runs", "smooth"]

Curve = tuple[np.ndarray, np.ndarray]  # (steps, values)


def load_curve(run_dir: str | os.PathLike[str], column: str) -> Curve:
    """``(steps, values)`` of the rows of ``run_dir/metrics.csv`` that have ``column``."""
    return _column(read_metrics(Path(run_dir) / "metrics.csv"), column)


def _column(rows: list[dict[str, str]], column: str) -> Curve:
    rows = [r for r in rows if r.get(column)]
    steps = np.array([int(r["step"]) for r in rows], dtype=np.int64)
    values = np.array([float(r[column]) for r in rows], dtype=np.float64)
    return steps, values


@dataclass
class RunCurves:
    """What the plot reads from one run directory."""

    run_dir: Path
    config: dict[str, Any]  # config.json, or {} when absent
    episodes: Curve  # training episode returns at the steps where the episodes ended
    evals: Curve  # mean evaluation return
    eval_low: np.ndarray  # worst and best episode of each evaluation (NaN if not logged)
    eval_high: np.ndarray
    losses: dict[str, Curve] = field(default_factory=dict)


def load_run(run_dir: str | os.PathLike[str]) -> RunCurves:
    """The curves of ``run_dir/metrics.csv`` (losses: every column after the base ones)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.csv")
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    eval_rows = [r for r in rows if r.get("eval_return")]

    def spread(column: str) -> np.ndarray:
        return np.array([float(r.get(column) or "nan") for r in eval_rows], dtype=np.float64)

    base = {"step", "episode_return", "episode_length"}
    loss_keys = [k for k in (rows[0] if rows else {}) if k not in base and "eval_return" not in k]
    return RunCurves(
        run_dir=run_dir,
        config=config,
        episodes=_column(rows, "episode_return"),
        evals=_column(rows, "eval_return"),
        eval_low=spread("eval_return_min"),
        eval_high=spread("eval_return_max"),
        losses={k: c for k in loss_keys if len((c := _column(rows, k))[0])},
    )


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start): same length."""
    if window < 1:
        raise ValueError(f"smooth: window must be >= 1, got {window}")
    sums = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


def _on_grid(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray]:
    """``(grid, values[run, grid])``: each curve as a step function on the union of steps."""
    grid = np.unique(np.concatenate([s for s, _ in curves]))
    stacked = np.stack(
        [v[np.clip(np.searchsorted(s, grid, side="right") - 1, 0, None)] for s, v in curves]
    )
    return grid, stacked


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


@dataclass
class _Style:
    """How one group is drawn: its color, and its name in the legend (empty: the only group,
    named in the title instead)."""

    color: str
    name: str

    def label(self, what: str) -> str:
        return f"{self.name}: {what}" if self.name else what


def _draw_returns(ax: Axes, runs: Sequence[RunCurves], style: _Style, window: int) -> None:
    curves = [(s, smooth(v, window)) for s, v in (r.episodes for r in runs) if len(s)]
    if not curves:
        return
    line = {"color": style.color, "lw": 2.2, "gid": "episode_return_smoothed"}
    if len(runs) == 1:
        steps, raw = runs[0].episodes
        ax.plot(
            steps,
            raw,
            color=style.color,
            alpha=0.3,
            lw=0.8,
            gid="episode_return_raw",
            label=style.label("training episode return"),
        )
        ax.plot(*curves[0], **line, label=style.label(f"mean of the last {window} episodes"))
        return
    grid, stacked = _on_grid(curves)
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    ax.fill_between(grid, low, high, color=style.color, alpha=0.2, lw=0, gid="episode_return_band")
    ax.plot(
        grid,
        stacked.mean(axis=0),
        **line,
        label=style.label(
            f"training return (mean of the last {window} episodes): mean and min-max over runs"
        ),
    )


def _draw_evaluations(ax: Axes, runs: Sequence[RunCurves], style: _Style) -> None:
    if len(runs) == 1:
        steps, mean = runs[0].evals
        low, high = runs[0].eval_low, runs[0].eval_high
        what = "evaluation: mean, bar from worst to best episode"
    else:
        # The evaluation steps that every run has (the same schedule in runs of one config).
        common = sorted(set.intersection(*(set(r.evals[0].tolist()) for r in runs)))
        steps = np.array(common, dtype=np.int64)
        at = np.stack([values[np.searchsorted(s, steps)] for s, values in (r.evals for r in runs)])
        mean, low, high = at.mean(axis=0), at.min(axis=0), at.max(axis=0)
        what = "evaluation: mean over runs, bar from lowest to highest run"
    if not len(steps):
        return
    bars = np.isfinite(low) & np.isfinite(high)
    yerr = np.where(bars, [mean - low, high - mean], 0.0) if bars.any() else None
    ax.errorbar(
        steps,
        mean,
        yerr=yerr,
        fmt="o",
        ms=6,
        mfc="white",
        mew=1.6,
        color=style.color,
        elinewidth=1.2,
        capsize=4,
        zorder=3,
        gid="eval_return",
        label=style.label(what),
    )


def _draw_loss(ax: Axes, runs: Sequence[RunCurves], key: str, color: str, ls: str) -> None:
    curves = [r.losses[key] for r in runs if key in r.losses]
    if not curves:
        return
    grid, stacked = _on_grid(curves)
    if len(curves) > 1:
        ax.fill_between(
            grid,
            stacked.min(axis=0),
            stacked.max(axis=0),
            color=color,
            alpha=0.2,
            lw=0,
            gid=f"loss_band:{key}",
        )
    ax.plot(grid, stacked.mean(axis=0), color=color, ls=ls, lw=1.5, gid=f"loss:{key}", label=key)


def draw_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    *,
    groups: Sequence[Sequence[str | os.PathLike[str]]] | None = None,
    smooth_window: int = 10,
) -> Figure:
    """The figure of the runs or of ``groups`` of runs, one color per experiment or group.

    ``ValueError`` for runs on different environments, a directory that is not a run, or a
    group that mixes experiments.

    Axes, by label: ``"returns"``, ``"losses"``, and ``"losses (right)"`` when a second loss is
    logged. Artists carry a ``gid``: ``episode_return_raw`` / ``episode_return_smoothed`` /
    ``episode_return_band``, ``eval_return`` (an errorbar), ``loss:<key>`` / ``loss_band:<key>``,
    ``learning_starts``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'polyak[plot]'") from exc
    all_groups, labels = _group(
        [Path(d) for d in run_dirs], [[Path(d) for d in g] for g in groups] if groups else None
    )
    loaded = [[load_run(d) for d in dirs] for dirs in all_groups]

    fig, (ax_ret, ax_loss) = plt.subplots(
        2, 1, sharex=True, figsize=(8, 6.4), dpi=120, height_ratios=(2.2, 1.0)
    )
    ax_ret.set_label("returns")
    ax_loss.set_label("losses")
    # Two losses (DDPG, TD3) have unrelated scales: the second gets its own axis, on the right.
    loss_keys = list(dict.fromkeys(k for runs in loaded for r in runs for k in r.losses))[:2]
    loss_axes = [ax_loss]
    if len(loss_keys) == 2:
        loss_axes.append(ax_loss.twinx())
        loss_axes[1].set_label("losses (right)")
    one = len(loaded) == 1
    if one:
        ax_ret.set_title(labels[0], fontsize=10)
    for i, runs in enumerate(loaded):
        style = _Style(f"C{i}", "" if one else labels[i])
        _draw_returns(ax_ret, runs, style, smooth_window)
        _draw_evaluations(ax_ret, runs, style)
        for k, (key, ax) in enumerate(zip(loss_keys, loss_axes, strict=False)):
            # One group: a color per loss; several: the group's color, a line style per loss.
            _draw_loss(ax, runs, key, f"C{k + 3}" if one else style.color, ("-", "--")[k])
    for k, (key, ax) in enumerate(zip(loss_keys, loss_axes, strict=False)):
        if one:
            ax.set_ylabel(key, color=f"C{k + 3}")
        else:
            ax.set_ylabel(f"{key} ({('solid', 'dashed')[k]})")

    starts = {r.config.get("learning_starts") for runs in loaded for r in runs}
    if len(starts) == 1 and (start := starts.pop()):
        for ax in (ax_ret, ax_loss):
            ax.axvline(start, color="0.4", ls=":", lw=1, gid="learning_starts")
        ax_ret.annotate(
            "learning starts",
            (start, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="0.3",
        )
    ax_ret.set_ylabel("return")
    ax_ret.grid(alpha=0.3)
    ax_ret.legend(loc="best", fontsize=7.5)
    ax_loss.set_xlabel("environment steps")
    ax_loss.grid(alpha=0.3)
    if loss_keys:  # one legend for both loss axes, one entry per loss
        entries = {
            label: handle
            for ax in loss_axes
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)
        }
        ax_loss.legend(list(entries.values()), list(entries), loc="upper left", fontsize=7.5)
    fig.tight_layout()
    return fig


def plot_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    groups: Sequence[Sequence[str | os.PathLike[str]]] | None = None,
    smooth_window: int = 10,
) -> Path:
    """Draw the runs (one group) or ``groups`` of runs (see :func:`draw_runs`) into ``out``."""
    fig = draw_runs(run_dirs, groups=groups, smooth_window=smooth_window)
    import matplotlib.pyplot as plt  # present: draw_runs checked

    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
