"""Cost of one DQN gradient step (zoo CartPole-v1 shapes), polyak against bare torch.

    python benchmarks/bench_rl_dqn_step.py [--repeats 15]

One burst of 128 minibatches of 64 (``ReplayBuffer.sample_burst``) is trained three ways, in CPU
seconds per gradient step, one thread: ``DQN.train_burst`` (polyak: batched target, then
``Optimizer.minimize`` with global-norm clipping at 10, Adam, the evaluation average); a bare torch
loop doing the same arithmetic (batched target, forward, ``smooth_l1_loss``, ``backward``,
``clip_grad_norm_``, fused ``Adam.step``) on the same network; and forward + backward alone.
The difference between the first two is what polyak adds on top of torch's kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from polyak.rl.dqn import DQN
from polyak.rl.presets import make_config
from polyak.rl.replay import ReplayBuffer


def timed(fn) -> float:
    """CPU seconds of one call."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = make_config("dqn", "CartPole-v1", "zoo")
    agent = DQN(cfg, 4, 2, np.random.default_rng(0), torch.device("cpu"))
    replay = ReplayBuffer(5000, 4, 0, rng=np.random.default_rng(0))
    g = np.random.default_rng(1)
    for _ in range(5000):
        replay.add(g.normal(size=4), int(g.integers(2)), 1.0, g.normal(size=4), False, False)
    n, b = cfg.gradient_steps, cfg.batch_size
    burst = replay.sample_burst(n, b)

    q, q_target = agent.q, agent.q_target.module
    params = list(q.parameters())
    opt = torch.optim.Adam(params, cfg.learning_rate, fused=True)

    def bare() -> None:
        with torch.no_grad():
            q_next = q_target(burst.next_obs).max(1).values
            y_all = burst.rewards + cfg.gamma * (1 - burst.terminated) * q_next
        for k in range(n):
            rows = slice(k * b, (k + 1) * b)
            q_sa = q(burst.obs[rows]).gather(1, burst.actions[rows].unsqueeze(1)).squeeze(1)
            loss = F.smooth_l1_loss(q_sa, y_all[rows])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()

    def forward_backward() -> None:
        for k in range(n):
            rows = slice(k * b, (k + 1) * b)
            q_sa = q(burst.obs[rows]).gather(1, burst.actions[rows].unsqueeze(1)).squeeze(1)
            F.smooth_l1_loss(q_sa, burst.rewards[rows]).backward()

    # Interleaved rounds, medians: the VM's speed drifts between runs seconds apart.
    variants = {"polyak": lambda: agent.train_burst(burst, n), "bare": bare, "fb": forward_backward}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up: allocations, optimizer state
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn) / n * 1e3)
    polyak_ms, bare_ms, fb_ms = (statistics.median(times[k]) for k in variants)
    print(
        f"per gradient step (CPU ms, median of {args.repeats} interleaved rounds): "
        f"polyak {polyak_ms:.3f}, bare torch {bare_ms:.3f}, forward+backward only {fb_ms:.3f}"
    )

if __name__ == "__main__":
    main()
