"""Stable-Baselines3's own DQN on CartPole-v1 with the zoo configuration, evaluated as polyak is.

    python benchmarks/sb3_rl_quality.py [--seeds 0 1 2] [--steps 50000]
                                        [--out benchmarks/results/rl_sb3_dqn_CartPole-v1.json]

The model is built from polyak's zoo preset by ``bench_rl.sb3_kwargs`` (the same mapping the
speed benchmark uses: lr 2.3e-3, batch 64, buffer 100000, learning_starts 1000, gamma 0.99,
target_update_interval 10, train_freq 256, gradient_steps 128, exploration_fraction 0.16,
exploration_final_eps 0.04, net_arch [256, 256], max_grad_norm 10), seeded with ``seed``, one
thread. Every 5000 steps and at the end the greedy policy (``predict(deterministic=True)``) is
evaluated exactly as ``polyak.rl.loop.evaluate`` does: 10 episodes on a fresh environment, episode
``k`` reset with seed ``seed + 1000000 + k``. Evaluation touches no training generator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_rl import make_bench_config, sb3_kwargs


def evaluate(model, env_id: str, episodes: int, seed: int) -> list[float]:
    env = gym.make(env_id)
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(int(action))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def run(seed: int, steps: int, eval_every: int) -> dict:
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(1)
    cfg = make_bench_config("dqn", None, 1)
    cfg.seed = seed
    curve: dict[int, float] = {}

    class Eval(BaseCallback):
        def _on_step(self) -> bool:
            n = self.num_timesteps
            if n % eval_every == 0 and n < steps:
                curve[n] = float(np.mean(evaluate(self.model, cfg.env, 10, seed + 1_000_000)))
            return True

    model = DQN("MlpPolicy", gym.make(cfg.env), **sb3_kwargs(cfg))
    model.learn(steps, callback=Eval())
    final = evaluate(model, cfg.env, 10, seed + 1_000_000)
    curve[steps] = float(np.mean(final))
    return {
        "seed": seed,
        "final_eval_return": float(np.mean(final)),
        "final_eval_returns": final,
        "curve": curve,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=50_000)
    p.add_argument("--eval-every", type=int, default=5000)
    default_out = Path("benchmarks/results/rl_sb3_dqn_CartPole-v1.json")
    p.add_argument("--out", type=Path, default=default_out)
    args = p.parse_args()
    import stable_baselines3

    out = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    for seed in args.seeds:
        r = run(seed, args.steps, args.eval_every)
        print(json.dumps(r), flush=True)
        out["runs"][str(seed)] = r
        finals = [v["final_eval_return"] for v in out["runs"].values()]
        out["meta"] = {
            "stable_baselines3": stable_baselines3.__version__,
            "torch": torch.__version__,
            "total_steps": args.steps,
            "mean": statistics.mean(finals),
        }
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
