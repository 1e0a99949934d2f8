"""Training speed of polyak's RL agents against Stable-Baselines3 2.x, same hyperparameters.

    python benchmarks/bench_rl.py [--algo ddpg dqn] [--steps N] [--threads 1] [--repeats 2]
                                  [--out benchmarks/results/rl_speed.json]

For each algorithm, the zoo preset's configuration (DDPG on Pendulum-v1, DQN on CartPole-v1) is
trained by ``polyak.rl.train`` and by SB3's ``DDPG``/``DQN`` built from the *same* config
(:func:`sb3_kwargs` maps every field: learning rate, buffer, warm-up, batch, tau, gamma, training
frequency and gradient steps, noise, target interval, exploration, gradient clipping, net_arch).
Each training runs in a fresh interpreter with ``torch.set_num_threads(threads)``, sides
alternating (polyak, SB3, polyak, SB3, ...); reported: the median steps/s of each side over the
repeats, and the ratio of each polyak run to the SB3 run right after it (pairs run under the
same machine conditions) with its median.

Timed, in wall-clock and in CPU seconds of the process (the latter is steadier on a shared
machine): the environment-step loop with its training (polyak: the loop's own timer, which leaves
out the final evaluation and the checkpoint write; SB3: ``model.learn``). ``--steps N`` shortens
a run and scales ``learning_starts`` by the same factor so the share of training steps is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENVS = {"ddpg": "Pendulum-v1", "td3": "Pendulum-v1", "dqn": "CartPole-v1"}


def make_bench_config(algo: str, steps: int | None, threads: int):
    from polyak.rl.presets import make_config

    cfg = make_config(algo, ENVS[algo], "zoo")
    if steps is not None:
        cfg.learning_starts = round(cfg.learning_starts * steps / cfg.total_steps)
        cfg.total_steps = steps
    cfg.threads = threads
    cfg.eval_every = 0
    cfg.eval_episodes = 1
    cfg.checkpoint_every = cfg.total_steps
    return cfg


def sb3_kwargs(cfg) -> dict:
    """Stable-Baselines3 constructor arguments equal to the polyak config ``cfg``."""
    import numpy as np

    common = {
        "buffer_size": cfg.buffer_size,
        "learning_starts": cfg.learning_starts,
        "batch_size": cfg.batch_size,
        "tau": cfg.tau,
        "gamma": cfg.gamma,
        "train_freq": cfg.train_freq,
        "gradient_steps": cfg.gradient_steps,
        "policy_kwargs": {"net_arch": list(cfg.net_arch)},
        "seed": cfg.seed,
        "device": cfg.device,
    }
    if cfg.algo == "dqn":
        return {
            **common,
            "learning_rate": cfg.learning_rate,
            "target_update_interval": cfg.target_update_interval,
            "exploration_fraction": cfg.eps_fraction,
            "exploration_initial_eps": cfg.eps_initial,
            "exploration_final_eps": cfg.eps_final,
            "max_grad_norm": cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"),
        }
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise

    if cfg.actor_lr != cfg.critic_lr or cfg.critic_l2:
        raise ValueError("SB3 has one learning rate and no critic L2; use the zoo preset")
    zeros, std = np.zeros(1), np.full(1, cfg.noise_std)
    noise = {
        "normal": lambda: NormalActionNoise(zeros, std),
        "ou": lambda: OrnsteinUhlenbeckActionNoise(zeros, std, cfg.ou_theta, cfg.ou_dt),
        "none": lambda: None,
    }[cfg.noise_type]()
    return {**common, "learning_rate": cfg.actor_lr, "action_noise": noise}


def run_one(side: str, algo: str, steps: int | None, threads: int) -> dict[str, float]:
    """Train once in this process; environment steps per wall-clock and per CPU second."""
    import torch

    torch.set_num_threads(threads)
    cfg = make_bench_config(algo, steps, threads)
    if side == "polyak":
        from polyak.rl import train

        with tempfile.TemporaryDirectory() as run_dir:
            summary = train(cfg, run_dir, progress=False)
        return {
            "wall": summary["steps_per_second"],
            "cpu": cfg.total_steps / summary["train_cpu_seconds"],
        }
    import gymnasium as gym
    import stable_baselines3 as sb3

    model = getattr(sb3, algo.upper())("MlpPolicy", gym.make(cfg.env), **sb3_kwargs(cfg))
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(cfg.total_steps)
    return {
        "wall": cfg.total_steps / (time.perf_counter() - t0),
        "cpu": cfg.total_steps / (time.process_time() - c0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", nargs="+", default=["ddpg", "dqn"], choices=sorted(ENVS))
    p.add_argument("--steps", type=int, default=None, help="default: the zoo's n_timesteps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--_child", nargs=2, metavar=("SIDE", "ALGO"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(run_one(args._child[0], args._child[1], args.steps, args.threads)))
        return

    import stable_baselines3
    import torch

    results = []
    for algo in args.algo:
        cfg = make_bench_config(algo, args.steps, args.threads)
        rates: dict[str, list[dict[str, float]]] = {"polyak": [], "sb3": []}
        for _ in range(args.repeats):
            for side in ("polyak", "sb3"):
                cmd = [sys.executable, __file__, "--_child", side, algo]
                cmd += ["--threads", str(args.threads)]
                if args.steps is not None:
                    cmd += ["--steps", str(args.steps)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rates[side].append(json.loads(out.strip().splitlines()[-1]))
                r = rates[side][-1]
                print(f"  {algo} {side}: {r['wall']:.0f} steps/s ({r['cpu']:.0f} per CPU s)")
        row = {
            "algo": algo,
            "env": cfg.env,
            "total_steps": cfg.total_steps,
            "learning_starts": cfg.learning_starts,
            "threads": args.threads,
            "runs": rates,
        }
        for clock in ("wall", "cpu"):
            for side in ("polyak", "sb3"):
                row[f"{side}_{clock}"] = statistics.median(r[clock] for r in rates[side])
            row[f"speedup_{clock}"] = row[f"polyak_{clock}"] / row[f"sb3_{clock}"]
            # Each polyak run against the SB3 run right after it: the two share the machine's
            # state of the moment, which on a shared VM drifts by more than the effect measured.
            pairs = [a[clock] / b[clock] for a, b in zip(rates["polyak"], rates["sb3"])]
            row[f"pair_speedups_{clock}"] = pairs
            row[f"median_pair_speedup_{clock}"] = statistics.median(pairs)
        results.append(row)
        print(
            f"{algo} {cfg.env} {cfg.total_steps} steps, {args.threads} thread(s): polyak "
            f"{row['polyak_wall']:.0f} steps/s, SB3 {row['sb3_wall']:.0f} steps/s, speedup "
            f"{row['speedup_wall']:.2f}x (per CPU second: {row['speedup_cpu']:.2f}x); pairs "
            f"{', '.join(f'{x:.2f}' for x in row['pair_speedups_wall'])}, median "
            f"{row['median_pair_speedup_wall']:.2f}x",
            flush=True,
        )
    meta = {
        "torch": torch.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "python": sys.version.split()[0],
    }
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
