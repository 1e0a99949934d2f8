"""The ``polyak`` command line: ``polyak train | eval | plot | posthoc``.

    polyak train {ddpg,td3,dqn} --env ID --total-steps N --seed S --run-dir DIR
                 [--preset paper|zoo] [--set KEY=VALUE [KEY=VALUE ...]] ...
    polyak eval DIR [--episodes K]      (the run's policy.pt if it has one, else its checkpoint)
    polyak plot DIR [DIR ...] -o out.png
    polyak posthoc SNAPSHOT_DIR --sigma-rel S [--step N] -o out.safetensors|out.pt

``train`` on a directory that already has a checkpoint resumes it (same command, same config);
a directory made with a different configuration is refused with the differing keys, and so is
one that another ``train`` is using. Every value is checked before anything is written
(``polyak.rl.validation``); errors are one line per problem, without a traceback.
The RL commands need the ``rl`` extra (gymnasium, numpy, rich); ``plot`` needs ``plot``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]


def _require_rl() -> None:
    try:
        import gymnasium  # noqa: F401
        import rich  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"polyak: the RL commands need the 'rl' extra ({exc.name} is missing): "
            "pip install 'polyak[rl]'"
        ) from None


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum`` (``2e4`` allowed, ``1.5`` refused)."""

    def parse(text: str) -> int:
        from polyak.rl.config import parse_int

        try:
            value = parse_int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= {minimum}")
        return value

    return parse


def _number(value: float | None) -> str:
    return "null (not finite; see the warnings)" if value is None else f"{value:.1f}"


def _cmd_train(args: argparse.Namespace) -> int:
    _require_rl()
    from polyak.rl.config import config_class, parse_overrides
    from polyak.rl.loop import train
    from polyak.rl.presets import make_config

    overrides = parse_overrides(config_class(args.algo), args.set or [])
    config = make_config(
        args.algo,
        args.env,
        args.preset,
        total_steps=args.total_steps,
        seed=args.seed,
        overrides=overrides,
    )
    run_dir = Path(args.run_dir)
    resuming = (run_dir / "checkpoint.pt").exists()
    print(
        f"{'resuming' if resuming else 'training'} {config.algo} on {config.env} "
        f"({config.preset} preset, {config.total_steps} steps, seed {config.seed}) in {run_dir}",
        flush=True,
    )
    summary = train(config, run_dir, progress=not args.no_progress)
    for warning in summary["warnings"]:
        print(f"polyak train: warning: {warning}", file=sys.stderr)
    sps = summary["steps_per_second"]
    print(
        f"final evaluation return {_number(summary['final_eval_return'])} "
        f"(mean of {len(summary['final_eval_returns'])} episodes)"
        + (f", {sps:.0f} steps/s" if sps else "")
    )
    if "final_policy_step" in summary:
        print(
            f"final policy:   {run_dir / 'policy.pt'}, the weights of step "
            f"{summary['final_policy_step']} (best evaluation; the last weights' return on the "
            f"same episodes: {_number(summary['last_eval_return'])})"
        )
    print(f"summary:        {run_dir / 'summary.json'}")
    curve = run_dir / "learning_curve.png"
    print(f"learning curve: {curve}" if curve.exists() else "learning curve: (needs matplotlib)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    _require_rl()
    import dataclasses

    import numpy as np

    from polyak.rl.checkpoint import CheckpointError, load_checkpoint, restoring
    from polyak.rl.config import config_from_dict
    from polyak.rl.loop import evaluate, make_agent, read_checkpoint
    from polyak.rl.rundir import finite_or_null
    from polyak.rl.spaces import make_env
    from polyak.rl.validation import validate_config

    run_dir = Path(args.run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if not ckpt_path.exists():
        raise SystemExit(f"polyak eval: no checkpoint.pt in {run_dir}")
    ckpt = read_checkpoint(ckpt_path)
    try:
        config = config_from_dict(ckpt["config"])
        validate_config(config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{ckpt_path} holds an invalid config: {exc}") from None
    if args.device:
        config = dataclasses.replace(config, device=args.device)
        validate_config(config)
    env = make_env(config.env)
    try:
        agent, codec, _ = make_agent(config, env, np.random.default_rng(config.seed))
    finally:
        env.close()
    with restoring(ckpt_path):
        agent.load_networks(ckpt["agent"])
        step = ckpt["loop"]["step"]
    policy_path = run_dir / "policy.pt"
    delivered = policy_path.exists()  # a finished keep_best run delivers the policy it chose
    if delivered:
        chosen = load_checkpoint(policy_path)
        with restoring(policy_path):
            agent.policy_network().load_state_dict(chosen["policy"])
            step = chosen["step"]
    episodes = args.episodes or config.eval_episodes
    returns = evaluate(agent, codec, config.env, episodes, args.seed)
    result = {
        "run_dir": str(run_dir),
        "policy": str(policy_path if delivered else ckpt_path),
        "step": step,
        "episodes": episodes,
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "returns": returns,
    }
    warnings: list[str] = []
    result = {key: finite_or_null(value, key, warnings) for key, value in result.items()}
    result["warnings"] = warnings
    print(json.dumps(result, indent=2, allow_nan=False))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from polyak.rl.plot import plot_runs

    try:
        out = plot_runs(args.run_dirs, args.output)
    except ImportError as exc:
        raise SystemExit(f"polyak plot: {exc}") from None
    print(f"wrote {out}")
    return 0


def _cmd_posthoc(args: argparse.Namespace) -> int:
    import torch

    from polyak.averaging.posthoc import posthoc_command

    print(
        posthoc_command(
            args.snapshot_dir,
            args.output,
            sigma_rel=args.sigma_rel,
            gamma=args.gamma,
            step=args.step,
            max_error=None if args.max_error < 0 else args.max_error,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
        )
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported on one line (the usage is one ``-h`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="polyak", description="Train, evaluate and plot polyak's reference RL agents."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) an agent")
    p.add_argument("algo", choices=["ddpg", "td3", "dqn"])
    p.add_argument("--env", required=True, help="gymnasium environment id, e.g. Pendulum-v1")
    p.add_argument(
        "--total-steps",
        type=_count(1),
        default=None,
        help="environment steps (default: the zoo's n_timesteps with --preset zoo)",
    )
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--run-dir", required=True, help="output directory (resumed if it exists)")
    p.add_argument("--preset", choices=["paper", "zoo"], default="paper")
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="override config fields, e.g. --set eval_every=0 net_arch=64,64 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a run's policy deterministically (policy.pt if any, else the checkpoint)",
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--episodes", type=_count(1), default=None, help="default: the run's eval_episodes"
    )
    p.add_argument("--seed", type=_count(0), default=0, help="episode k is reset with seed + k")
    p.add_argument("--device", default=None, help="override the run's device")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="plot learning curves (mean and spread over runs)")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser(
        "posthoc",
        help="synthesize a post-hoc EMA from a PostHocEMA snapshot directory (EDM2)",
        description="Synthesize the power-function EMA of a given sigma_rel (or gamma) from the "
        "snapshots of polyak.PostHocEMA, by EDM2's least squares; needs only the directory.",
    )
    p.add_argument("snapshot_dir")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sigma-rel", type=float, help="relative width, e.g. 0.07")
    target.add_argument("--gamma", type=float, help="power-function exponent instead")
    p.add_argument("--step", type=int, default=None, help="snapshot step (default: latest)")
    p.add_argument(
        "-o", "--output", required=True, help="out.safetensors (needs safetensors) or out.pt"
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        default=None,
        help="cast floating tensors (default: the averages' dtype)",
    )
    p.add_argument(
        "--max-error",
        type=float,
        default=0.05,
        help="largest relative error of the averaging profile accepted (negative: any)",
    )
    p.set_defaults(func=_cmd_posthoc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; its errors are printed without a traceback.

    Exit status 2 for what the command was given (a bad value, environment, run directory or
    checkpoint: ``ValueError`` and the out-of-memory refusal), 1 for an operating-system error
    during the run (a full disk, a file removed under it), 130 for Ctrl-C.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, MemoryError) as exc:  # config errors, space errors, resume refusals
        print(f"polyak {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"polyak {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        # Ctrl-C in the middle of a checkpoint write can surface as the writer's own error
        # while the KeyboardInterrupt is handled (torch.save closing a half-written archive).
        if not _caused_by_interrupt(exc):
            raise
        print("interrupted; re-run the same command to resume from the last checkpoint")
        return 130


def _caused_by_interrupt(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


if __name__ == "__main__":
    raise SystemExit(main())
