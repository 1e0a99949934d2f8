"""polyak.rl.logging: the metrics.csv layout, the evaluation spread, resume truncation."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from polyak.rl import make_config, train
from polyak.rl.logging import MetricsLogger, eval_columns, read_metrics


def test_columns_keep_their_positions_and_the_eval_spread_comes_last(tmp_path):
    logger = MetricsLogger(tmp_path, ["critic_loss", "actor_loss"], resume_step=0)
    logger.log(5, **eval_columns([1.0, 4.0, 7.0]))
    logger.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        header, row = list(csv.reader(f))
    assert header == [
        "step",
        "episode_return",
        "episode_length",
        "eval_return",
        "critic_loss",
        "actor_loss",
        "eval_return_std",
        "eval_return_min",
        "eval_return_max",
    ]
    assert row == ["5", "", "", "4", "", "", f"{np.std([1.0, 4.0, 7.0]):.9g}", "1", "7"]


def test_eval_columns_are_mean_population_std_min_max():
    returns = [-150.5, -120.25, -300.0, -99.0]
    assert eval_columns(returns) == {
        "eval_return": float(np.mean(returns)),
        "eval_return_std": float(np.sqrt(np.mean((np.array(returns) - np.mean(returns)) ** 2))),
        "eval_return_min": -300.0,
        "eval_return_max": -99.0,
    }


def test_a_run_logs_the_spread_of_every_evaluation(tmp_path):
    """The final evaluation row holds the spread of the summary's ``final_eval_returns``."""
    overrides = {
        "net_arch": [16],
        "batch_size": 16,
        "learning_starts": 50,
        "target_update_interval": 40,
        "eval_every": 100,
        "eval_episodes": 3,
    }
    cfg = make_config("dqn", "CartPole-v1", "paper", total_steps=200, seed=3, overrides=overrides)
    summary = train(cfg, tmp_path, progress=False)
    evals = [r for r in read_metrics(tmp_path / "metrics.csv") if r["eval_return"]]
    assert [int(r["step"]) for r in evals] == [100, 200]
    for r in evals:
        assert float(r["eval_return_min"]) <= float(r["eval_return"])
        assert float(r["eval_return"]) <= float(r["eval_return_max"])
        assert float(r["eval_return_std"]) >= 0
    final, returns = evals[-1], summary["final_eval_returns"]
    assert float(final["eval_return"]) == pytest.approx(summary["final_eval_return"], rel=1e-8)
    assert final["eval_return_std"] == f"{summary['final_eval_std']:.9g}"
    assert (final["eval_return_min"], final["eval_return_max"]) == (
        f"{min(returns):.9g}",
        f"{max(returns):.9g}",
    )
