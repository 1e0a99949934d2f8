"""The run directory: nothing written before a run can start, the lock, unreadable or foreign
files refused by name, and JSON / CSV outputs without NaN or Infinity tokens."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")

import gymnasium as gym
import torch
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

from polyak.rl import ConfigMismatchError, make_config, train
from polyak.rl.checkpoint import CheckpointError, load_checkpoint, save_atomic
from polyak.rl.logging import read_metrics
from polyak.rl.rundir import RunDirError, RunDirLock
from polyak.rl.validation import ConfigError

SMALL = {
    "net_arch": [8],
    "batch_size": 8,
    "learning_starts": 20,
    "target_update_interval": 20,
    "eval_every": 40,
    "eval_episodes": 2,
    "checkpoint_every": 50,
}


def _config(seed: int = 0, env: str = "CartPole-v1", **kw):
    return make_config("dqn", env, total_steps=80, seed=seed, overrides={**SMALL, **kw})


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` (relative path -> bytes)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run (seed 0); tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(_config(), run_dir, progress=False)
    return run_dir


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


# --- nothing is written before the run can start ----------------------------------------------


@pytest.mark.parametrize(
    ("env", "overrides", "error", "message"),
    [
        ("Pendulum-v1", {}, ValueError, "dqn needs a Discrete action space"),
        ("CartPol-v1", {}, ConfigError, r"env='CartPol-v1': .*Did you mean: `CartPole`\?"),
        ("CartPole-v1", {"buffer_size": 2**62}, ConfigError, r"buffer_size=\d+: the run needs"),
        ("CartPole-v1", {"tau": 2.0}, ConfigError, r"tau=2\.0: must be"),
    ],
)
def test_a_failed_first_run_writes_nothing_and_the_corrected_one_runs(
    tmp_path, env, overrides, error, message
):
    run_dir = tmp_path / "run"
    config = _config(env=env) if "tau" not in overrides else _config()
    config = _replace(config, **overrides)
    # Totals large enough that the buffer's rows are the full buffer_size.
    if "buffer_size" in overrides:
        config = _replace(config, total_steps=2**62)
    with pytest.raises(error, match=message):
        train(config, run_dir, progress=False)
    assert not run_dir.exists()
    run_dir.mkdir()
    with pytest.raises(error, match=message):
        train(config, run_dir, progress=False)
    assert snapshot(run_dir) == {}
    train(_config(), run_dir, progress=False)  # the corrected command is not refused
    assert (run_dir / "summary.json").exists()


def _replace(config, **kw):
    import dataclasses

    return dataclasses.replace(config, **kw)


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(RunDirError, match="the run directory is a file, not a directory"):
        train(_config(), path, progress=False)
    with pytest.raises(RunDirError, match="a parent of it, is a file"):
        train(_config(), path / "run", progress=False)
    assert path.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_dir_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="is not writable"):
            train(_config(), tmp_path / "run", progress=False)
    finally:
        tmp_path.chmod(0o700)
    assert not (tmp_path / "run").exists()


def test_a_directory_the_os_refuses_is_refused(tmp_path, monkeypatch):
    """What a read-only directory looks like to ``os.access`` (also as root)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != tmp_path)
    with pytest.raises(RunDirError, match=f"{tmp_path} is not writable"):
        train(_config(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# --- config.json and checkpoint.pt --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"algo": "dqn", "gamma": ', "config.json is not a readable config"),
        ("\xff\xfe", "config.json is not a readable config"),
        ("[1, 2]", "config.json does not hold a config"),
    ],
)
def test_a_corrupt_config_json_is_refused_by_name(copy, text, message):
    (copy / "config.json").write_bytes(text.encode("latin-1"))
    before = snapshot(copy)
    with pytest.raises(RunDirError, match=message):
        train(_config(), copy, progress=False)
    assert snapshot(copy) == before


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("not a checkpoint")
    elif how == "tensor":
        torch.save(torch.zeros(3), path)
    elif how == "foreign":
        torch.save({"model": {"weight": torch.zeros(3)}}, path)
    elif how == "code":
        torch.save({"agent": _Pickled()}, path)
    elif how == "shapes":
        ckpt = load_checkpoint(path)
        ckpt["agent"]["q"] = {k: v[:1] for k, v in ckpt["agent"]["q"].items()}
        torch.save(ckpt, path)
    elif how == "version":
        ckpt = load_checkpoint(path)
        ckpt["version"] = 99
        torch.save(ckpt, path)


class _Pickled:
    pass


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "is not a readable checkpoint"),
        ("empty", "is not a readable checkpoint"),
        ("text", "is not a readable checkpoint"),
        ("code", "is not a readable checkpoint"),
        ("tensor", "holds a Tensor, not a checkpoint"),
        ("foreign", "is not a polyak.rl training checkpoint"),
        ("version", "is a version 99 checkpoint"),
        ("shapes", "does not fit this run"),
    ],
)
def test_an_unusable_checkpoint_is_refused_by_name_and_nothing_changes(copy, how, message):
    _damage(copy / "checkpoint.pt", how)
    before = snapshot(copy)
    with pytest.raises(CheckpointError, match=message) as caught:
        train(_config(), copy, progress=False)
    assert "checkpoint.pt" in str(caught.value)
    assert snapshot(copy) == before


def test_a_checkpoint_of_another_seed_is_refused_naming_both_seeds(copy, tmp_path):
    """config.json gone (or the checkpoint copied in from another run directory): the
    checkpoint's own config still says which run it is."""
    (copy / "config.json").unlink()
    before = snapshot(copy)
    with pytest.raises(ConfigMismatchError, match=r"made with seed 0 and this run has seed 1"):
        train(_config(seed=1), copy, progress=False)
    assert snapshot(copy) == before
    with pytest.raises(ConfigMismatchError, match=r"made by a run with a different config"):
        train(_config(gamma=0.5), copy, progress=False)
    train(_config(), copy, progress=False)  # its own command resumes it
    assert (copy / "config.json").exists()


# --- the lock --------------------------------------------------------------------------------


def test_a_locked_run_dir_is_refused_naming_the_pid_and_its_temp_files_stay(copy):
    live_temp = copy / ".checkpoint.pt.tmp-12345"  # the holder's write in progress
    with RunDirLock(copy):
        live_temp.write_bytes(b"partial")
        before = snapshot(copy)
        with pytest.raises(
            RunDirError, match=f"in use by another polyak train \\(pid {os.getpid()}"
        ):
            train(_config(), copy, progress=False)
        assert snapshot(copy) == before
    assert not (copy / ".lock").exists()
    train(_config(), copy, progress=False)
    assert not live_temp.exists()  # its writer is gone now: removed


def test_the_lock_is_released_when_train_fails(copy, monkeypatch):
    from polyak.rl import loop

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "evaluate", fail)
    with pytest.raises(RuntimeError, match="boom"):
        train(_config(), copy, progress=False)
    assert not (copy / ".lock").exists()
    with RunDirLock(copy):  # free
        pass


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "polyak", *args]


def test_two_identical_train_commands_the_second_is_refused_the_first_goes_on(tmp_path, capsys):
    """The second command (here in this process) is refused with the first's pid and touches
    nothing: the first keeps writing checkpoints until it is interrupted (Ctrl-C), and exits as
    an interrupted run."""
    from polyak.cli import main

    run = tmp_path / "run"
    args = ["train", "dqn", "--env", "CartPole-v1", "--total-steps", "200000", "--no-progress"]
    args += ["--run-dir", str(run), "--set", "net_arch=16", "learning_starts=100"]
    args += ["checkpoint_every=20", "eval_every=0", "eval_episodes=1", "target_update_interval=50"]
    first = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.01)
        assert main(args) == 2
        refusal = capsys.readouterr().err
        assert f"in use by another polyak train (pid {first.pid})" in refusal
        assert len(refusal.splitlines()) == 1
        step = load_checkpoint(run / "checkpoint.pt")["loop"]["step"]
        while load_checkpoint(run / "checkpoint.pt")["loop"]["step"] == step:
            assert first.poll() is None, first.communicate()
            time.sleep(0.01)
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "interrupted" in out, err
    assert "Traceback" not in err
    assert 0 < load_checkpoint(run / "checkpoint.pt")["loop"]["step"] < 200000
    assert not list(run.glob(".*tmp*")) and not (run / ".lock").exists()


# --- no NaN or Infinity tokens in the outputs ---------------------------------------------------


class NaNRewardCartPole(CartPoleEnv):
    """CartPole whose every reward is NaN: NaN returns, losses and evaluations."""

    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        return obs, math.nan, terminated, truncated, info


NAN_ENV = "PolyakTest/NaNRewardCartPole-v0"
if NAN_ENV not in gym.registry:
    gym.register(NAN_ENV, entry_point=NaNRewardCartPole, max_episode_steps=30)


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_nan_values_become_null_and_empty_cells_and_the_run_says_why(tmp_path):
    summary = train(_config(env=NAN_ENV, log_every=10), tmp_path, progress=False)
    on_disk = _strict_json((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["final_eval_return"] is None and summary["final_eval_std"] is None
    assert summary["final_eval_returns"] == [None, None]
    text = "\n".join(summary["warnings"])
    for key in ("final_eval_return", "final_eval_returns[0]", "final_eval_std"):
        assert f"{key} was nan (not finite): written as null" in text
    for column in ("episode_return", "loss", "eval_return"):
        assert "metrics.csv: " in text and f" {column} value(s) were NaN or infinite" in text
    csv_text = (tmp_path / "metrics.csv").read_text().lower()
    assert "nan" not in csv_text and "inf" not in csv_text
    rows = read_metrics(tmp_path / "metrics.csv")
    assert any(r["episode_length"] and not r["episode_return"] for r in rows)
    # The counts survive a resume (they are in the checkpoint): re-running says the same.
    again = train(_config(env=NAN_ENV, log_every=10), tmp_path, progress=False)
    assert again["warnings"] == summary["warnings"]


def test_a_finite_run_has_no_warnings(finished):
    summary = _strict_json((finished / "summary.json").read_text())
    assert summary["warnings"] == []


def test_write_json_refuses_nan(tmp_path):
    from polyak.rl.rundir import write_json

    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"a": math.inf})
    assert not list(tmp_path.iterdir())


def test_save_atomic_round_trip_still_loads_with_weights_only(tmp_path):
    save_atomic({"a": torch.ones(2)}, tmp_path / "c.pt")
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["a"], torch.ones(2))
