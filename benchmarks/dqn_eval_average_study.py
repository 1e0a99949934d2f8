"""Which averaged network to evaluate DQN with: one training run, several read-offs.

    python benchmarks/dqn_eval_average_study.py --seeds 100 101 ... [--set KEY=VALUE ...]
                                                [--runs runs/study] [--out FILE.json]

Trains ``polyak train dqn --env CartPole-v1 --preset zoo --total-steps 50000`` (plus ``--set``
overrides) through :func:`polyak.rl.train`, with extra ``polyak.ExponentialMovingAverage``
copies of the online Q-network, each stepped after every gradient step, and at every
evaluation (every 5000 environment steps and the final one) evaluates, with the protocol of
the run itself (10 greedy episodes, seeds ``seed + 1000000 + k``), the online network and each
average. The training run is the plain zoo run: the averages only read the weights. (The run
trains a DQN subclass carrying those averages, built by ``polyak.rl.loop.build_agent`` as the
loop builds its DQN: the same construction and the same random draws.)

This is the selection study of docs/results.md: it runs on seeds that are *not* the reported
ones, and its choice is then run, unchanged, on the reported seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from torch import nn

import polyak
from polyak.rl import loop, make_config
from polyak.rl.config import DQNConfig, parse_overrides
from polyak.rl.dqn import DQN
from polyak.rl.spaces import make_env

# (name, decay, num_updates): the decays span 1000 to 10000 gradient steps (8 to 80 bursts of
# 128, 2000 to 20000 environment steps); the longest uses TF's num_updates warm-up
# (decay min(d, (1 + n) / (10 + n))) so that the initial weights do not keep a share.
AVERAGES = [
    ("ema0.999", 0.999, False),
    ("ema0.9995", 0.9995, False),
    ("ema0.9998", 0.9998, False),
    ("ema0.9999n", 0.9999, True),
]


class EvaluatingDQN(DQN):
    """The zoo DQN calling ``on_evaluation(step)`` at each of the run's evaluation steps (every
    ``eval_every`` and the last), where :meth:`greedy_return` evaluates any network as the
    greedy one, with the run's protocol. Subclasses record what they evaluate there."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        # on_env_step runs before the step's training burst, the loop's evaluation after it:
        # the same networks only if no evaluation step is a training step.
        eval_steps = [*range(cfg.eval_every, cfg.total_steps, cfg.eval_every), cfg.total_steps]
        assert all(s % cfg.train_freq for s in eval_steps), "an evaluation step trains"
        self.codec = None  # set by train_with

    def on_env_step(self, step: int) -> None:
        super().on_env_step(step)
        if step % self.config.eval_every == 0 or step == self.config.total_steps:
            self.on_evaluation(step)

    def on_evaluation(self, step: int) -> None:
        raise NotImplementedError

    def greedy_return(self, net: nn.Module, seed_offset: int = 1_000_000) -> float:
        """Mean return of ``net`` acting greedily on the episodes seeded
        ``seed + seed_offset + k`` (the run's own evaluation episodes by default)."""
        cfg, own = self.config, self.q_eval
        self.q_eval = net
        try:
            returns = loop.evaluate(
                self, self.codec, cfg.env, cfg.eval_episodes, cfg.seed + seed_offset
            )
        finally:
            self.q_eval = own
        return float(np.mean(returns))


class _StudyDQN(EvaluatingDQN):
    """The zoo DQN with extra weight averages, evaluated at the run's evaluation steps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.averages = {}
        for name, decay, warm in AVERAGES:
            ema = polyak.ExponentialMovingAverage(decay, num_updates=self.step if warm else None)
            ema.track(self.q)
            self.averages[name] = ema
        self.curves: dict[str, list[float]] = {"online": []} | {n: [] for n in self.averages}

    def train_step(self, batch, y=None):
        losses = super().train_step(batch, y)
        for ema in self.averages.values():
            ema.update()
        return losses

    def on_evaluation(self, step: int) -> None:
        for name, curve in self.curves.items():
            net = self.q if name == "online" else self.averages[name].average_module(self.q)
            curve.append(self.greedy_return(net))


def train_with(agent_cls: type[DQN], config: DQNConfig, run_dir: Path) -> DQN:
    """``polyak.rl.train(config, run_dir)`` on an ``agent_cls`` (a ``DQN`` subclass taking the
    same arguments) built as the loop builds its ``DQN`` (``loop.build_agent``): the same
    construction and the same random draws, so the training run is the plain one. Returns the
    agent as the run left it (with ``keep_best``, its policy network then holds the delivered
    copy): read what it recorded during training, not its final weights."""
    agent = loop.build_agent(config, cls=agent_cls)
    env = make_env(config.env)
    try:
        agent.codec = loop.ActionCodec(env, config.algo)
    finally:
        env.close()
    loop.train(config, run_dir, agent=agent, progress=False)
    return agent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs", type=Path, default=Path("runs/study"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for seed in args.seeds:
        cfg = make_config(
            "dqn",
            "CartPole-v1",
            "zoo",
            total_steps=50_000,
            seed=seed,
            overrides=parse_overrides(DQNConfig, args.overrides),
        )
        curves = train_with(_StudyDQN, cfg, args.runs / f"seed{seed}").curves
        results[str(seed)] = curves
        print(seed, {k: v[-1] for k, v in curves.items()}, flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    for name in next(iter(results.values())):
        finals = [r[name][-1] for r in results.values()]
        print(
            f"{name:12s} final >= 475 on {sum(f >= 475 for f in finals)}/{len(finals)}, "
            f"mean {statistics.mean(finals):.1f}"
        )


if __name__ == "__main__":
    main()
