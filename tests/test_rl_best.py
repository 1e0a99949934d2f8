"""keep_best: the delivered policy is the best-validated one, reported on held-out episodes."""

from __future__ import annotations

import io
import json
import math
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("gymnasium")

import gymnasium as gym
import numpy as np

from polyak.cli import main as cli_main
from polyak.rl import evaluate, make_config, train
from polyak.rl import loop as loop_mod
from polyak.rl.best import BestPolicy
from polyak.rl.checkpoint import load_checkpoint, save_atomic
from polyak.rl.logging import read_metrics

TOTAL = 4000


def _config(total_steps=TOTAL, **kw):
    # A short CartPole run that learns, then gets worse: its best evaluation (step 2500) is
    # not its last, so the delivered policy is an earlier copy.
    overrides = {
        "net_arch": [32, 32],
        "learning_starts": 300,
        "train_freq": 16,
        "gradient_steps": 8,
        "target_update_interval": 50,
        "eps_fraction": 0.2,
        "eval_every": 500,
        "eval_episodes": 2,
        "checkpoint_every": 700,
        "eval_ema_decay": 0.0,
        "keep_best": True,
        **kw,
    }
    return make_config(
        "dqn", "CartPole-v1", "zoo", total_steps=total_steps, seed=1, overrides=overrides
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("keep_best") / "ref"
    return run_dir, train(_config(), run_dir, progress=False)


def _evaluate_weights(run_dir: Path, policy: dict[str, torch.Tensor] | None) -> float:
    """Rebuild the run's agent from its checkpoint, optionally load ``policy`` into its policy
    network, and evaluate it on keep_best's held-out episodes."""
    cfg = _config()
    env = gym.make(cfg.env)
    agent, codec, _ = loop_mod.make_agent(cfg, env, np.random.default_rng(0))
    env.close()
    agent.load_networks(load_checkpoint(run_dir / "checkpoint.pt")["agent"])
    if policy is not None:
        agent.policy_network().load_state_dict(policy)
    return float(np.mean(evaluate(agent, codec, cfg.env, cfg.eval_episodes, cfg.seed + 2_000_000)))


def test_delivers_the_best_validated_policy_and_reports_it_on_held_out_episodes(reference):
    run_dir, summary = reference
    evals = [
        (float(r["eval_return"]), int(r["step"]))
        for r in read_metrics(run_dir / "metrics.csv")
        if r["eval_return"]
    ]
    assert [s for _, s in evals] == list(range(500, TOTAL + 1, 500))
    best_return, best_step = max(evals)  # the highest return, ties to the latest step
    assert best_step < TOTAL, "the fixture run must peak before its end to test the copy"
    assert summary["final_policy_step"] == best_step
    assert summary["final_policy_validation_return"] == best_return
    assert summary["final_eval_seed"] == 1 + 2_000_000

    chosen = torch.load(run_dir / "policy.pt", weights_only=True)
    assert chosen["step"] == best_step
    last = load_checkpoint(run_dir / "checkpoint.pt")["agent"]["q"]
    assert chosen["policy"].keys() == last.keys()
    assert not all(torch.equal(chosen["policy"][k], last[k]) for k in last)
    # The reported returns are those of the chosen and of the last weights, on the test episodes.
    assert summary["final_eval_return"] == _evaluate_weights(run_dir, chosen["policy"])
    assert summary["last_eval_return"] == _evaluate_weights(run_dir, None)

    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["eval", str(run_dir), "--seed", str(1 + 2_000_000)]) == 0
    result = json.loads(out.getvalue())
    assert result["policy"].endswith("policy.pt") and result["step"] == best_step
    assert result["mean_return"] == summary["final_eval_return"]


def test_training_is_the_same_with_and_without_keep_best(reference, tmp_path):
    run_dir, _ = reference
    plain = train(_config(keep_best=False), tmp_path, progress=False)
    assert "final_policy_step" not in plain and not (tmp_path / "policy.pt").exists()
    assert plain["final_eval_seed"] == 1 + 1_000_000
    assert (tmp_path / "metrics.csv").read_bytes() == (run_dir / "metrics.csv").read_bytes()
    ours = load_checkpoint(run_dir / "checkpoint.pt")["agent"]
    theirs = load_checkpoint(tmp_path / "checkpoint.pt")["agent"]
    for name, state in ours.items():
        for key, value in state.items():
            assert torch.equal(value, theirs[name][key]), f"{name}.{key}"


def test_crash_and_resume_delivers_the_same_policy(reference, tmp_path, crash_at_replay_write):
    """The choice so far is in the checkpoint: a run killed after its best evaluation (2500)
    and resumed from the checkpoint of step 2800 delivers the uninterrupted run's policy."""
    ref_dir, ref_summary = reference
    assert crash_at_replay_write(_config(), tmp_path, 3200) == 2800
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["loop"]["step"] == 2800 and ckpt["best"]["step"] == ref_summary["final_policy_step"]

    stale = tmp_path / ".policy.pt.tmp-12345"  # as a kill inside policy.pt's atomic save leaves
    stale.write_bytes(b"torn")
    summary = train(_config(), tmp_path, progress=False)
    assert not stale.exists()
    for key in ("final_eval_return", "final_policy_step", "last_eval_return"):
        assert summary[key] == ref_summary[key], key
    ours = torch.load(tmp_path / "policy.pt", weights_only=True)["policy"]
    theirs = torch.load(ref_dir / "policy.pt", weights_only=True)["policy"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_checkpoint_from_before_keep_best_resumes(tmp_path):
    cfg = _config(total_steps=700, keep_best=False)
    train(cfg, tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    del ckpt["best"]
    save_atomic(ckpt, tmp_path / "checkpoint.pt")
    assert train(cfg, tmp_path, progress=False)["final_eval_return"] > 0


@pytest.mark.parametrize(("eval_ema_decay", "eval_every"), [(0.0, 500), (0.99, 500), (0.99, 0)])
def test_a_tie_with_the_last_weights_delivers_the_last_policy_network(
    tmp_path, eval_ema_decay, eval_every
):
    """This short paper-preset run does not learn yet: every evaluation ties (one action always
    wins). Ties go to the latest, so the last weights are delivered, and they are the policy
    network's: the averaged network with ``eval_ema_decay``. With ``eval_every=0`` the last
    weights are the only candidate."""
    overrides = {
        "net_arch": [32],
        "learning_starts": 200,
        "eval_every": eval_every,
        "eval_episodes": 3,
        "target_update_interval": 100,
        "eval_ema_decay": eval_ema_decay,
        "keep_best": True,
    }
    cfg = make_config("dqn", "CartPole-v1", "paper", total_steps=3000, seed=3, overrides=overrides)
    summary = train(cfg, tmp_path, progress=False)
    evals = [r["eval_return"] for r in read_metrics(tmp_path / "metrics.csv") if r["eval_return"]]
    assert len(evals) == (6 if eval_every else 1) and len(set(evals)) == 1
    assert summary["final_policy_step"] == 3000
    assert summary["final_eval_return"] == summary["last_eval_return"]
    policy = torch.load(tmp_path / "policy.pt", weights_only=True)["policy"]
    agent = load_checkpoint(tmp_path / "checkpoint.pt")["agent"]
    delivered = agent["q_eval" if eval_ema_decay else "q"]
    assert all(torch.equal(policy[k], delivered[k]) for k in delivered)
    if eval_ema_decay:  # the average, not the online network
        assert not all(torch.equal(policy[k], agent["q"][k]) for k in policy)


@pytest.mark.parametrize("algo", ["ddpg", "td3"])
def test_continuous_agents_deliver_their_actor(tmp_path, algo):
    small = {"net_arch": [16, 16], "batch_size": 16, "learning_starts": 50, "eval_episodes": 1}
    cfg = make_config(
        algo,
        "Pendulum-v1",
        "paper",
        total_steps=300,
        overrides={**small, "eval_every": 0, "keep_best": True},
    )
    summary = train(cfg, tmp_path, progress=False)
    assert summary["final_policy_step"] == 300
    policy = torch.load(tmp_path / "policy.pt", weights_only=True)["policy"]
    agent = load_checkpoint(tmp_path / "checkpoint.pt")["agent"]
    assert all(torch.equal(policy[k], agent["actor"][k]) for k in agent["actor"])
    assert not all(torch.equal(policy[k], agent["actor_target"][k]) for k in policy)


def test_rerunning_a_finished_run_delivers_the_same_policy(reference, tmp_path):
    run_dir, summary = reference
    copy = tmp_path / "again"
    shutil.copytree(run_dir, copy)
    again = train(_config(), copy, progress=False)
    for key in ("final_eval_return", "final_policy_step", "last_eval_return"):
        assert again[key] == summary[key], key
    assert (copy / "policy.pt").read_bytes() == (run_dir / "policy.pt").read_bytes()


def _net(value: float) -> torch.nn.Linear:
    net = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(net.weight, value)
    return net


@given(st.lists(st.one_of(st.integers(0, 5).map(float), st.just(math.nan)), min_size=1))
def test_best_policy_keeps_the_latest_maximum(returns):
    best = BestPolicy()
    for step, value in enumerate(returns):
        best.offer(step, value, _net(step))
    finite = [(v, s) for s, v in enumerate(returns) if not math.isnan(v)]
    # The highest return, ties to the latest; NaNs only when nothing else came.
    expected = max(finite)[1] if finite else len(returns) - 1
    assert best.step == expected
    assert torch.equal(best.policy["weight"], torch.full((1, 2), float(expected)))


def test_best_policy_copies_the_weights_and_round_trips():
    net, best = _net(1.0), BestPolicy()
    assert best.offer(10, 3.0, net)
    torch.nn.init.constant_(net.weight, 2.0)  # training goes on in place
    assert not best.offer(20, 2.0, net)
    assert torch.equal(best.policy["weight"], torch.ones(1, 2))
    again = BestPolicy()
    again.load_state_dict(best.state_dict())
    assert (again.step, again.validation_return) == (10, 3.0)
    assert torch.equal(again.policy["weight"], best.policy["weight"])
