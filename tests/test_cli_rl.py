"""The ``polyak train | eval | plot`` command line, run in-process on tiny configurations."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gymnasium")

from polyak.cli import main

TINY = [
    *("--set", "net_arch=8", "--set", "batch_size=8", "--set", "learning_starts=20"),
    *("--set", "eval_episodes=2", "--set", "checkpoint_every=50", "--set", "eval_every=40"),
]


def _train(run_dir, *extra: str, seed: int = 0) -> int:
    return main(
        [
            "train",
            "dqn",
            "--env",
            "CartPole-v1",
            "--total-steps",
            "80",
            "--seed",
            str(seed),
            "--run-dir",
            str(run_dir),
            "--no-progress",
            *TINY,
            *extra,
        ]
    )


def test_train_eval_plot(tmp_path, capsys):
    assert _train(tmp_path / "s0") == 0
    assert _train(tmp_path / "s1", seed=1) == 0
    out = capsys.readouterr().out
    assert "final evaluation return" in out and "summary.json" in out
    summary = json.loads((tmp_path / "s0" / "summary.json").read_text())
    assert summary["algo"] == "dqn" and summary["total_steps"] == 80 and summary["seed"] == 0

    assert main(["eval", str(tmp_path / "s0"), "--episodes", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 3 and len(result["returns"]) == 3 and result["step"] == 80

    out_png = tmp_path / "both.png"
    assert main(["plot", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(out_png)]) == 0
    assert out_png.stat().st_size > 0

    # Same command again: resumes the finished run, same final evaluation.
    assert _train(tmp_path / "s0") == 0
    assert "resuming" in capsys.readouterr().out
    again = json.loads((tmp_path / "s0" / "summary.json").read_text())
    assert again["final_eval_return"] == summary["final_eval_return"]


def test_train_refuses_a_run_dir_with_another_config(tmp_path, capsys):
    assert _train(tmp_path) == 0
    capsys.readouterr()
    assert _train(tmp_path, "--set", "gamma=0.5") == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "gamma: 0.99 -> 0.5" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "nope=1"], "unknown key"),
        (["--set", "gamma"], "KEY=VALUE"),
    ],
)
def test_bad_overrides_are_reported(tmp_path, capsys, argv, message):
    assert _train(tmp_path, *argv) == 2
    assert message in capsys.readouterr().err


def test_dqn_on_continuous_env_is_reported(tmp_path, capsys):
    code = main(
        ["train", "dqn", "--env", "Pendulum-v1", "--total-steps", "10", "--run-dir", str(tmp_path)]
    )
    assert code == 2
    assert "needs a Discrete action space" in capsys.readouterr().err


def test_eval_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match=r"no checkpoint\.pt"):
        main(["eval", str(tmp_path)])


def test_eval_of_an_eval_ema_run_acts_with_the_averaged_network(tmp_path, capsys):
    """``polyak eval`` on a run with ``eval_ema_decay`` loads and acts with ``q_eval``: it
    reproduces the final evaluation, and follows the checkpoint's ``q_eval`` (made to always
    push left, then always right) while its online network stays as trained."""
    import torch

    run = tmp_path / "ema"
    assert _train(run, "--set", "eval_ema_decay=0.9") == 0
    summary = json.loads((run / "summary.json").read_text())
    args = ["eval", str(run), "--episodes", "2", "--seed", "1000000"]  # the run's eval seed
    capsys.readouterr()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["returns"] == summary["final_eval_returns"]

    ckpt_path = run / "checkpoint.pt"
    original = torch.load(ckpt_path, weights_only=True)
    returns = []
    for bias in ([100.0, -100.0], [-100.0, 100.0]):
        ckpt = torch.load(ckpt_path, weights_only=True)
        q_eval = ckpt["agent"]["q_eval"]
        last = max(k for k in q_eval if k.endswith(".weight")).rsplit(".", 1)[0]
        q_eval[f"{last}.weight"].zero_()
        q_eval[f"{last}.bias"].copy_(torch.tensor(bias))
        torch.save(ckpt, ckpt_path)
        assert main(args) == 0
        returns.append(json.loads(capsys.readouterr().out)["returns"])
    torch.save(original, ckpt_path)
    assert returns[0] != returns[1]  # the online network alone would give one answer


def test_train_with_keep_best_names_the_delivered_policy(tmp_path, capsys):
    assert _train(tmp_path, "--set", "keep_best=true") == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    step = summary["final_policy_step"]
    assert f"final policy:   {tmp_path / 'policy.pt'}, the weights of step {step}" in out
    assert main(["eval", str(tmp_path), "--episodes", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["policy"] == str(tmp_path / "policy.pt") and result["step"] == step
