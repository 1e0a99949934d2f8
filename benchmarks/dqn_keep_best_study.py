"""Which DQN policy to deliver: the last weights, or the best-validated ones (``keep_best``).

    python benchmarks/dqn_keep_best_study.py --seeds 200 201 ... --out FILE.json [--runs DIR]

Trains ``polyak train dqn --env CartPole-v1 --preset zoo --total-steps 50000`` once per seed
(through ``dqn_eval_average_study.train_with``: the plain run) and, at every evaluation step
(every 5000 environment steps and the last), evaluates the averaged network (the zoo preset's
``q_eval``) and the online network each on two sets of 10 greedy episodes: the run's own
validation episodes (seeds ``seed + 1000000 + k``) and held-out test episodes (seeds
``seed + 2000000 + k``). Read-offs, scored on the test episodes:

- ``last``: the network at 50k steps;
- ``chosen``: the evaluation step with the highest validation mean (ties: the latest), as
  ``keep_best`` chooses (``polyak.rl.best``).

Rule fixed before the runs: adopt ``keep_best`` in the zoo CartPole-v1 preset if the averaged
network's ``chosen`` read-off reaches >= 475 on more seeds than its ``last`` read-off.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dqn_eval_average_study import EvaluatingDQN, train_with

from polyak.rl import make_config

EPISODES = {"validation": 1_000_000, "test": 2_000_000}  # seed offsets


class _StudyDQN(EvaluatingDQN):
    """The zoo DQN, evaluating both networks on both episode sets at each evaluation step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record: dict[str, list] = {"step": []}

    def on_evaluation(self, step: int) -> None:
        self.record["step"].append(step)
        for name, net in (("averaged", self.q_eval), ("online", self.q)):
            for part, offset in EPISODES.items():
                self.record.setdefault(f"{name}/{part}", []).append(self.greedy_return(net, offset))


def read_offs(record: dict[str, list], name: str) -> dict[str, tuple[int, float]]:
    """``last`` and ``chosen`` read-offs of network ``name``: (step, test return)."""
    val, test, steps = record[f"{name}/validation"], record[f"{name}/test"], record["step"]
    i = max(range(len(val)), key=lambda j: (val[j], j))  # highest validation, ties to latest
    return {"last": (steps[-1], test[-1]), "chosen": (steps[i], test[i])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--runs", type=Path, default=Path("runs/keep-best-study"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for seed in args.seeds:
        if str(seed) not in results:
            cfg = make_config("dqn", "CartPole-v1", "zoo", total_steps=50_000, seed=seed)
            results[str(seed)] = train_with(_StudyDQN, cfg, args.runs / f"seed{seed}").record
            args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(seed, {n: read_offs(results[str(seed)], n) for n in ("averaged", "online")})
    for name in ("averaged", "online"):
        for how in ("last", "chosen"):
            test = [read_offs(r, name)[how][1] for r in results.values()]
            print(
                f"{name:8s} {how:6s}: test >= 475 on {sum(t >= 475 for t in test)}"
                f"/{len(test)}, mean {statistics.mean(test):.1f}"
            )


if __name__ == "__main__":
    main()
