"""Short end-to-end runs: outputs, determinism, resume after a crash or SIGKILL, refusals."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from polyak.rl import ConfigMismatchError, make_config, train
from polyak.rl.checkpoint import load_checkpoint
from polyak.rl.logging import read_metrics

SMALL = {
    "ddpg": ("Pendulum-v1", {"net_arch": [16, 16], "batch_size": 16, "learning_starts": 50}),
    "td3": ("Pendulum-v1", {"net_arch": [16, 16], "batch_size": 16, "learning_starts": 50}),
    "dqn": (
        "CartPole-v1",
        {"net_arch": [16], "batch_size": 16, "learning_starts": 50, "target_update_interval": 40},
    ),
}


def _config(algo, total=300, **kw):
    env, small = SMALL[algo]
    overrides = {
        **small,
        "eval_every": 150,
        "eval_episodes": 1,
        "checkpoint_every": 70,
        "log_every": 50,
        **kw,
    }
    return make_config(algo, env, "paper", total_steps=total, seed=3, overrides=overrides)


def _agent_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    return {f"{n}.{k}": v for n, sd in ckpt["agent"].items() for k, v in sd.items()}


def _assert_same_agent(a: Path, b: Path) -> None:
    ta, tb = _agent_tensors(a), _agent_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("algo", ["ddpg", "td3", "dqn"])
def test_run_dir_contents_and_bitwise_reproducible(tmp_path, algo):
    cfg = _config(algo)
    summary = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False)
    run = tmp_path / "a"
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "summary.json"):
        assert (run / name).exists(), name
    assert (run / "learning_curve.png").stat().st_size > 0
    assert {"algo", "env", "total_steps", "seed", "final_eval_return", "steps_per_second"} <= set(
        summary
    )
    assert (
        json.loads((run / "summary.json").read_text())["final_eval_return"]
        == (summary["final_eval_return"])
    )
    rows = read_metrics(run / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["eval_return"]] == [150, 300]
    assert any(r["episode_return"] for r in rows)
    # The checkpoint loads without unpickling code, and holds the networks under "agent".
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["loop"]["step"] == 300 and set(ckpt["agent"])
    # Same command and seed: identical agent and identical metrics.
    _assert_same_agent(tmp_path / "a", tmp_path / "b")
    assert (run / "metrics.csv").read_bytes() == (tmp_path / "b" / "metrics.csv").read_bytes()


def test_eval_every_zero_keeps_only_the_final_evaluation(tmp_path):
    train(_config("dqn", total=120, eval_every=0), tmp_path, progress=False)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["eval_return"]] == [120]


@pytest.mark.parametrize(("algo", "crash_at"), [("ddpg", 163), ("td3", 251), ("dqn", 101)])
def test_resume_after_crash_equals_uninterrupted(tmp_path, crash_at_replay_write, algo, crash_at):
    """A crash mid-episode (and at a checkpoint step) resumes to the same agent tensors."""
    cfg = _config(algo, noise_type="ou") if algo == "ddpg" else _config(algo)
    train(cfg, tmp_path / "ref", progress=False)

    assert crash_at_replay_write(cfg, tmp_path / "run", crash_at) < 300
    train(cfg, tmp_path / "run", progress=False)
    _assert_same_agent(tmp_path / "ref", tmp_path / "run")
    ref_metrics = (tmp_path / "ref" / "metrics.csv").read_bytes()
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == ref_metrics


def test_different_config_is_refused_naming_keys(tmp_path):
    cfg = _config("dqn", total=60)
    train(cfg, tmp_path, progress=False)
    other = _config("dqn", total=60, batch_size=8, gamma=0.5)
    with pytest.raises(ConfigMismatchError, match=r"batch_size: 16 -> 8[\s\S]*gamma: 0.99 -> 0.5"):
        train(other, tmp_path, progress=False)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "polyak", *args]


def test_sigkill_at_any_moment_then_resume_matches_uninterrupted(tmp_path):
    sets = {
        "net_arch": "16",
        "batch_size": "16",
        "learning_starts": "100",
        "checkpoint_every": "97",
        "eval_every": "0",
        "eval_episodes": "1",
        "target_update_interval": "50",
    }
    ref = tmp_path / "ref"  # the uninterrupted run, in this process (same config, same code)
    cfg = make_config(
        "dqn", "CartPole-v1", "paper", total_steps=4000, seed=1, overrides=_parse(sets)
    )
    train(cfg, ref, progress=False)

    run = tmp_path / "run"
    args = ["train", "dqn", "--env", "CartPole-v1", "--total-steps", "4000", "--seed", "1"]
    args += ["--no-progress", "--run-dir", str(run)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    time.sleep(0.4)  # somewhere in the run: between saves, or inside one
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed; make it longer"
    step = load_checkpoint(run / "checkpoint.pt")["loop"]["step"]
    assert 0 < step < 4000

    done = subprocess.run(_cli(*args), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert b"resuming" in done.stdout
    _assert_same_agent(ref, run)
    assert (run / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    assert not list(run.glob(".checkpoint.pt.tmp-*"))


def _parse(sets: dict[str, str]) -> dict:
    from polyak.rl.config import DQNConfig, parse_overrides

    return parse_overrides(DQNConfig, [f"{k}={v}" for k, v in sets.items()])


def test_eval_ema_run_is_reproducible_and_resumes_bitwise(tmp_path, crash_at_replay_write):
    """``eval_ema_decay``: the average is in the checkpoint (networks and training state), two
    runs are identical, and a crash mid-run resumes to the uninterrupted run's tensors."""
    cfg = _config("dqn", eval_ema_decay=0.9)
    train(cfg, tmp_path / "ref", progress=False)
    train(cfg, tmp_path / "again", progress=False)
    _assert_same_agent(tmp_path / "ref", tmp_path / "again")
    ref_metrics = (tmp_path / "ref" / "metrics.csv").read_bytes()
    assert (tmp_path / "again" / "metrics.csv").read_bytes() == ref_metrics
    ckpt = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    assert "q_eval" in ckpt["agent"] and "eval_ema" in ckpt["training"]
    assert ckpt["training"]["eval_ema"]["step"] > 0
    assert not torch.equal(
        ckpt["agent"]["q_eval"]["layers.0.weight"], ckpt["agent"]["q"]["layers.0.weight"]
    )

    assert 0 < crash_at_replay_write(cfg, tmp_path / "run", 163) < 300
    train(cfg, tmp_path / "run", progress=False)
    _assert_same_agent(tmp_path / "ref", tmp_path / "run")
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == ref_metrics


def test_rerunning_a_finished_run_logs_the_final_evaluation_once(tmp_path):
    cfg = _config("dqn", total=120)
    first = train(cfg, tmp_path, progress=False)
    before = (tmp_path / "metrics.csv").read_bytes()
    again = train(cfg, tmp_path, progress=False)
    assert again["final_eval_return"] == first["final_eval_return"]
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["eval_return"]] == [120]
    assert (tmp_path / "metrics.csv").read_bytes() == before


def test_run_made_before_a_new_config_field_resumes_at_its_default(tmp_path):
    """A ``config.json`` without a later-added key (``eval_ema_decay``) still matches when the
    new config has that key at its default, and is refused when it does not."""
    cfg = _config("dqn", total=60)
    train(cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["eval_ema_decay"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    train(cfg, tmp_path, progress=False)
    with pytest.raises(ConfigMismatchError, match=r"eval_ema_decay: 0.0 -> 0.5"):
        train(_config("dqn", total=60, eval_ema_decay=0.5), tmp_path, progress=False)


def test_train_on_a_given_agent_is_the_run_train_builds(tmp_path):
    """``train(config, dir, agent=build_agent(config, cls=...))`` (an instrumented subclass)
    takes the same draws as ``train`` building its own agent: same weights, same metrics; the
    instance is the one trained."""
    from polyak.rl.dqn import DQN
    from polyak.rl.loop import build_agent

    class CountingDQN(DQN):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trained = 0

        def train_burst(self, burst, n):
            self.trained += n
            return super().train_burst(burst, n)

    cfg = _config("dqn", total=200)
    train(cfg, tmp_path / "own", progress=False)
    agent = build_agent(cfg, cls=CountingDQN)
    summary = train(cfg, tmp_path / "given", agent=agent, progress=False)
    _assert_same_agent(tmp_path / "own", tmp_path / "given")
    own, given = (tmp_path / d / "metrics.csv" for d in ("own", "given"))
    assert own.read_bytes() == given.read_bytes()
    bursts = 200 // cfg.train_freq - cfg.learning_starts // cfg.train_freq
    assert agent.trained == bursts * cfg.gradient_steps > 0
    assert (
        summary["final_eval_return"]
        == json.loads((tmp_path / "own" / "summary.json").read_text())["final_eval_return"]
    )


def test_train_refuses_an_agent_of_another_algorithm_before_writing(tmp_path):
    from polyak.rl.loop import build_agent

    ddpg = build_agent(_config("ddpg", total=100))
    with pytest.raises(TypeError, match="agent must be a DQN for algo='dqn'"):
        train(_config("dqn", total=100), tmp_path / "run", agent=ddpg, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError, match="cls must be DDPG or a subclass"):
        build_agent(_config("ddpg", total=100), cls=dict)


def test_loop_state_round_trips_through_its_state_dict():
    """The checkpoint's "loop" entry: what the step loop carries, saved and loaded as is."""
    from polyak.rl.loop import Clock, LoopState

    class Codec:
        dim, dtype = 2, np.float32

    state = LoopState(
        obs=np.array([0.5, -1.0, 2.0], dtype=np.float32),
        step=7,
        episodes=2,
        episode_return=-3.25,
        episode_length=4,
        last_losses={"critic_loss": torch.tensor(0.5)},
        clock=Clock(1.5, 2.5),
        episode_env_rng={"state": 1},
        episode_actions=[np.array([0.1, 0.2], dtype=np.float32)] * 4,
        nonfinite={"actor_loss": [1, 5]},
    )
    buf = io.BytesIO()
    torch.save(state.state_dict(Codec()), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    back = LoopState.from_state_dict(saved, Codec())
    assert np.array_equal(back.obs, state.obs) and back.obs.dtype == np.float32
    for name in ("step", "episodes", "episode_return", "episode_length", "episode_env_rng"):
        assert getattr(back, name) == getattr(state, name), name
    assert (back.clock.wall, back.clock.cpu) == (1.5, 2.5)
    assert torch.equal(back.last_losses["critic_loss"], torch.tensor(0.5))
    assert len(back.episode_actions) == 4
    assert all(np.array_equal(a, b) for a, b in zip(back.episode_actions, state.episode_actions))
    assert back.nonfinite == {"actor_loss": [1, 5]}
