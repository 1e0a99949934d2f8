"""polyak.rl.plot: what the learning-curve figure draws, read back from the matplotlib objects."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra
pytest.importorskip("matplotlib")

import matplotlib.pyplot as plt
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer

from polyak.rl.plot import draw_runs, load_run, plot_runs, smooth

HEADER = "step,episode_return,episode_length,eval_return,critic_loss,actor_loss"
SPREAD = ",eval_return_std,eval_return_min,eval_return_max"


def _write_run(path, episodes, evals, losses, *, spread=True, learning_starts=20):
    """A run directory: ``episodes`` [(step, return)], ``evals`` [(step, mean, min, max)],
    ``losses`` [(step, critic, actor)], in the sparse layout of MetricsLogger."""
    path.mkdir(parents=True)
    cfg = {"algo": "ddpg", "env": "Pendulum-v1", "preset": "zoo"}
    (path / "config.json").write_text(json.dumps({**cfg, "learning_starts": learning_starts}))
    rows = []
    for step, ret in episodes:
        rows.append((step, f"{step},{ret},10,,,", ",,,"))
    for step, critic, actor in losses:
        rows.append((step, f"{step},,,,{critic},{actor}", ",,,"))
    for step, mean, low, high in evals:
        rows.append((step, f"{step},,,{mean},,", f",1.0,{low},{high}"))
    rows.sort(key=lambda r: r[0])  # stable: the loop's order within a step does not matter here
    lines = [HEADER + (SPREAD if spread else "")]
    lines += [line + (extra if spread else "") for _, line, extra in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _by_gid(ax, gid):
    return [a for a in (*ax.lines, *ax.collections) if a.get_gid() == gid]


def _axes(fig):
    return {ax.get_label(): ax for ax in fig.axes}


def _errorbar(ax) -> ErrorbarContainer:
    (container,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    return container


def _bar_ends(container: ErrorbarContainer) -> np.ndarray:
    """``[[low, high], ...]`` of each vertical error bar."""
    (bars,) = container.lines[2]
    return np.array([[seg[0][1], seg[1][1]] for seg in bars.get_segments()])


EPISODES = [(10, -5.0), (20, -3.0), (30, -4.0), (40, -1.0), (50, 2.0)]
EVALS = [(25, -2.0, -6.0, 1.0), (50, 1.5, 0.5, 3.0)]
LOSSES = [(30, 0.5, 10.0), (40, 0.25, 12.0), (50, 0.125, 11.0)]


def test_one_run_draws_raw_and_smoothed_returns_evaluation_bars_and_two_loss_axes(tmp_path):
    run = _write_run(tmp_path / "run", EPISODES, EVALS, LOSSES)
    fig = draw_runs([run], smooth_window=2)
    axes = _axes(fig)
    assert set(axes) == {"returns", "losses", "losses (right)"}
    returns, losses, right = axes["returns"], axes["losses"], axes["losses (right)"]

    (raw,) = _by_gid(returns, "episode_return_raw")
    (smoothed,) = _by_gid(returns, "episode_return_smoothed")
    assert raw.get_xdata().tolist() == [10, 20, 30, 40, 50]
    assert raw.get_ydata().tolist() == [-5.0, -3.0, -4.0, -1.0, 2.0]
    assert smoothed.get_ydata().tolist() == [-5.0, -4.0, -3.5, -2.5, 0.5]  # last two episodes
    assert raw.get_alpha() < 1 and smoothed.get_linewidth() > raw.get_linewidth()
    assert not _by_gid(returns, "episode_return_band")

    bars = _errorbar(returns)
    assert bars.lines[0].get_gid() == "eval_return" and bars.has_yerr
    x, y = bars.lines[0].get_data()
    assert x.tolist() == [25, 50] and y.tolist() == [-2.0, 1.5]
    assert _bar_ends(bars).tolist() == [[-6.0, 1.0], [0.5, 3.0]]  # worst to best episode

    (critic,) = _by_gid(losses, "loss:critic_loss")
    (actor,) = _by_gid(right, "loss:actor_loss")
    assert critic.get_ydata().tolist() == [0.5, 0.25, 0.125]
    assert actor.get_ydata().tolist() == [10.0, 12.0, 11.0]
    assert right.get_shared_x_axes().joined(right, losses)
    assert all(len(_by_gid(ax, "learning_starts")) == 1 for ax in (returns, losses))
    assert _by_gid(losses, "learning_starts")[0].get_xdata()[0] == 20


def test_several_runs_draw_mean_and_min_max_band_over_runs(tmp_path):
    a = _write_run(tmp_path / "a", EPISODES, EVALS, LOSSES)
    shifted = [(s, r + 2.0) for s, r in EPISODES]
    b = _write_run(
        tmp_path / "b",
        shifted,
        [(25, 0.0, -1.0, 1.0), (50, 3.5, 3.0, 4.0)],
        [(s, c * 3, x - 2) for s, c, x in LOSSES],
    )
    fig = draw_runs([a, b], smooth_window=2)
    returns, losses = _axes(fig)["returns"], _axes(fig)["losses"]
    assert not _by_gid(returns, "episode_return_raw")
    (mean,) = _by_gid(returns, "episode_return_smoothed")
    (band,) = _by_gid(returns, "episode_return_band")
    assert isinstance(band, PolyCollection)
    smoothed_a = np.array([-5.0, -4.0, -3.5, -2.5, 0.5])
    np.testing.assert_allclose(mean.get_ydata(), smoothed_a + 1.0)  # b is a shifted by 2
    band_y = band.get_paths()[0].vertices[:, 1]
    assert band_y.min() == smoothed_a.min() and band_y.max() == smoothed_a.max() + 2.0

    bars = _errorbar(returns)
    assert bars.lines[0].get_ydata().tolist() == [-1.0, 2.5]  # mean over runs
    assert _bar_ends(bars).tolist() == [[-2.0, 0.0], [1.5, 3.5]]  # lowest to highest run

    (critic,) = _by_gid(losses, "loss:critic_loss")
    np.testing.assert_allclose(critic.get_ydata(), [1.0, 0.5, 0.25])
    assert len(_by_gid(losses, "loss_band:critic_loss")) == 1


def test_groups_get_one_color_each(tmp_path):
    a = _write_run(tmp_path / "a", EPISODES, EVALS, LOSSES)
    b = _write_run(tmp_path / "b", EPISODES, EVALS, LOSSES)
    fig = draw_runs([], groups=[[a], [b]])
    lines = _by_gid(_axes(fig)["returns"], "episode_return_smoothed")
    assert [line.get_color() for line in lines] == ["C0", "C1"]


def test_runs_logged_before_the_eval_spread_get_markers_without_bars(tmp_path):
    run = _write_run(tmp_path / "old", EPISODES, EVALS, LOSSES, spread=False)
    assert np.isnan(load_run(run).eval_low).all()
    fig = draw_runs([run])
    bars = _errorbar(_axes(fig)["returns"])
    assert not bars.has_yerr and bars.lines[0].get_ydata().tolist() == [-2.0, 1.5]


def test_plot_runs_writes_the_png(tmp_path):
    run = _write_run(tmp_path / "run", EPISODES, EVALS, LOSSES)
    open_before = plt.get_fignums()
    out = plot_runs([run], tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == open_before  # its figure is closed


@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
    st.integers(1, 12),
)
def test_smooth_is_the_trailing_mean(values, window):
    got = smooth(np.array(values), window)
    expected = [np.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-6)


def test_smooth_refuses_an_empty_window():
    with pytest.raises(ValueError, match="window must be >= 1"):
        smooth(np.ones(3), 0)
