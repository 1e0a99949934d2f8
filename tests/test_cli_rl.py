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


# --- errors: one or two lines, no traceback, exit status 2, nothing written ------------------


def _refused(capsys, run_dir, argv, message, lines=1):
    """``main(argv)`` exits with 2 and prints ``message`` in ``lines`` lines on stderr, and the
    run directory (which did not exist) still does not."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == lines, err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "gamma=2"], "gamma=2.0: must be a finite number in [0, 1]"),
        (["--set", "gamma=nan"], "gamma=nan: must be a finite number in [0, 1]"),
        (["--set", "net_arch=0"], "net_arch=[0]: must be a list of integers, each >= 1"),
        (["--set", "eps_initial=5"], "eps_initial=5.0: must be a finite number in [0, 1]"),
        (["--set", "eval_episodes=0"], "eval_episodes=0: must be an integer >= 1"),
        (["--set", "train_freq=0"], "train_freq=0: must be an integer >= 1"),
        (["--set", "checkpoint_every=0"], "checkpoint_every=0: must be an integer >= 1"),
        (["--set", "threads=0"], "threads=0: must be an integer >= 1"),
        (["--set", "device=gpu"], "device='gpu': not a torch device; write 'cpu', 'cuda'"),
        (["--set", "tau=2"], "tau=2.0: must be a finite number in [0, 1]"),
        (["--set", "max_grad_norm=inf"], "max_grad_norm=inf: must be a finite number >= 0"),
        (["--set", "env=Pendulum-v1"], "env='Pendulum-v1' cannot be set with --set"),
        (["--set", "seed=4"], "seed=4 cannot be set with --set (overrides): it has its own"),
        (["--set", "total_steps=50"], "total_steps given twice: --total-steps 80 and"),
        (["--set", "buffer_size=1e15", "--total-steps", "1e15"], "buffer_size=1000000000000000"),
        (["--set", "net_arch=1000000,1000000"], "net_arch=[1000000, 1000000]: the run needs"),
    ],
)
def test_bad_values_are_refused_by_name_before_anything_is_written(
    tmp_path, capsys, extra, message
):
    _refused(capsys, tmp_path / "run", _argv(tmp_path / "run", *extra), message)


def test_several_bad_values_are_listed_one_per_line(tmp_path, capsys):
    argv = _argv(tmp_path / "run", "--set", "train_freq=0", "checkpoint_every=0", "threads=0")
    _refused(capsys, tmp_path / "run", argv, "3 invalid settings:", lines=4)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tmp_path, capsys):
    argv = _argv(tmp_path / "run", "--set", "device=cuda")
    _refused(capsys, tmp_path / "run", argv, "device='cuda': cuda is not available")


@pytest.mark.parametrize(
    ("algo", "env", "message"),
    [
        ("dqn", "Pendulum-v1", "dqn needs a Discrete action space; use ddpg or td3"),
        ("ddpg", "CartPole-v1", "ddpg needs continuous (Box) actions; use dqn"),
        ("td3", "CartPole-v1", "td3 needs continuous (Box) actions; use dqn"),
        ("dqn", "CartPol-v1", "env='CartPol-v1': Environment `CartPol` doesn't exist"),
        ("dqn", "NoSuchModule:Env-v0", "env='NoSuchModule:Env-v0': No module named"),
    ],
)
def test_an_environment_the_agent_cannot_use_is_refused_and_the_fix_runs(
    tmp_path, capsys, algo, env, message
):
    run = tmp_path / "run"
    argv = ["train", algo, "--env", env, "--total-steps", "10", "--run-dir", str(run)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not run.exists()
    if algo == "dqn" and env != "Pendulum-v1":
        assert _train(run) == 0  # the corrected command is not refused


@pytest.mark.parametrize("value", ["1.5", "0", "-3", "inf", "x"])
def test_total_steps_must_be_a_whole_number(tmp_path, capsys, value):
    argv = ["train", "dqn", "--env", "CartPole-v1", "--run-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--total-steps", value])
    assert caught.value.code == 2
    assert f"argument --total-steps: '{value}': must be a whole number >= 1" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_set_takes_several_pairs_and_repeats(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "dqn", "--env", "CartPole-v1", "--total-steps", "60", "--no-progress"]
    argv += ["--run-dir", str(run), "--set", "net_arch=8", "batch_size=8", "learning_starts=20"]
    argv += ["--set", "eval_every=0", "eval_episodes=1", "--set", "log_every=7"]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["net_arch"], config["batch_size"], config["learning_starts"]) == ([8], 8, 20)
    assert (config["eval_every"], config["eval_episodes"], config["log_every"]) == (0, 1, 7)


def _argv(run_dir, *extra: str) -> list[str]:
    return [
        *("train", "dqn", "--env", "CartPole-v1", "--total-steps", "80", "--no-progress"),
        *("--run-dir", str(run_dir), *TINY, *extra),
    ]


# --- run directories and checkpoints that cannot be used ------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A finished CartPole DQN run and a finished Pendulum DDPG run."""
    root = tmp_path_factory.mktemp("runs")
    assert _train(root / "cartpole") == 0
    pendulum = ["train", "ddpg", "--env", "Pendulum-v1", "--total-steps", "40", "--no-progress"]
    pendulum += ["--run-dir", str(root / "pendulum"), "--set", "net_arch=8,8", "batch_size=8"]
    pendulum += ["learning_starts=20", "eval_every=20", "eval_episodes=1"]
    assert main(pendulum) == 0
    return root / "cartpole", root / "pendulum"


def test_plot_refuses_to_average_runs_of_different_environments(two_runs, tmp_path, capsys):
    cartpole, pendulum = two_runs
    out = tmp_path / "mixed.png"
    assert main(["plot", str(cartpole), str(pendulum), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{cartpole} (CartPole-v1), {pendulum} (Pendulum-v1)" in err
    assert "plot each environment's runs separately" in err and not out.exists()


def test_plot_draws_one_curve_per_experiment(two_runs, tmp_path, monkeypatch):
    """Two seeds of one configuration share a curve; a run with another gamma gets its own,
    labelled with it."""
    from matplotlib.axes import Axes

    cartpole, _ = two_runs
    assert _train(tmp_path / "seed1", seed=1) == 0
    assert _train(tmp_path / "gamma", "--set", "gamma=0.5") == 0
    labels = []
    real_plot = Axes.plot
    def plot(self, *a, **kw):
        if kw.get("gid") == "episode_return_smoothed":  # one training-return curve per group
            labels.append(kw["label"].split(": ")[0])
        return real_plot(self, *a, **kw)

    monkeypatch.setattr(Axes, "plot", plot)
    runs = [str(cartpole), str(tmp_path / "seed1"), str(tmp_path / "gamma")]
    assert main(["plot", *runs, "-o", str(tmp_path / "out.png")]) == 0
    assert labels == [
        "dqn CartPole-v1 (paper, gamma=0.99), 2 run(s)",
        "dqn CartPole-v1 (paper, gamma=0.5), 1 run(s)",
    ]


def test_plot_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "is not a run directory of polyak train (no metrics.csv)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "checkpoint.pt is not a readable checkpoint"),
        ("foreign", "checkpoint.pt is not a polyak.rl training checkpoint"),
        ("config", "checkpoint.pt holds an invalid config: gamma=2.0: must be"),
        ("policy", "policy.pt is not a readable checkpoint"),
        ("file", "no checkpoint.pt in"),
    ],
)
def test_eval_of_a_run_dir_it_cannot_use(two_runs, tmp_path, capsys, damage, message):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    ckpt = run / "checkpoint.pt"
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    elif damage == "foreign":
        torch.save({"state_dict": {}}, ckpt)
    elif damage == "config":
        data = torch.load(ckpt, weights_only=True)
        data["config"]["gamma"] = 2.0
        torch.save(data, ckpt)
    elif damage == "policy":
        (run / "policy.pt").write_bytes(b"\0" * 10)
    elif damage == "file":
        run = tmp_path / "a-file"
        run.write_text("x")
    if damage == "file":  # as before: SystemExit with the message
        with pytest.raises(SystemExit, match=message):
            main(["eval", str(run)])
        return
    assert main(["eval", str(run), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.splitlines()) <= 2, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "gpu"], "device='gpu': not a torch device"),
        (["--episodes", "0"], "argument --episodes: '0': must be a whole number >= 1"),
    ],
)
def test_eval_refuses_bad_arguments(two_runs, capsys, argv, message):
    try:
        code = main(["eval", str(two_runs[0]), *argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_error_raised_while_ctrl_c_is_handled_is_an_interruption(monkeypatch, tmp_path, capsys):
    """Ctrl-C inside torch.save can surface as the archive writer's RuntimeError, raised while
    the KeyboardInterrupt is handled: still exit 130 with the resume hint, no traceback."""
    import polyak.cli as cli

    def interrupted_then_broken(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 6272 vs 6168") from None

    def broken(args):
        raise RuntimeError("not an interruption")

    parser = cli.build_parser()
    for func, expected in ((interrupted_then_broken, 130), (broken, None)):
        args = parser.parse_args(["eval", str(tmp_path)])
        monkeypatch.setattr(args, "func", func)
        monkeypatch.setattr(cli, "build_parser", lambda args=args: _Fixed(args))
        if expected is None:
            with pytest.raises(RuntimeError, match="not an interruption"):
                cli.main([])
        else:
            assert cli.main([]) == expected
            assert "re-run the same command to resume" in capsys.readouterr().out


class _Fixed:
    def __init__(self, args):
        self.args = args

    def parse_args(self, argv):
        return self.args
