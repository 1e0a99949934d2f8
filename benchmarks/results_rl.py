"""Learning results of the reference agents over several seeds (the figures of docs/results.md).

    python benchmarks/results_rl.py [--seeds 0 1 2] [--runs runs/results] [--only ddpg dqn]
                                    [--out benchmarks/results] [--set KEY=VALUE ... --tag NAME]

Trains, one after the other, through the command line exactly as a user would:

- ``polyak train ddpg --env Pendulum-v1 --preset zoo --total-steps 20000 --seed S``
  (target: final evaluation return >= -250; rl-baselines3-zoo reports -152)
- ``polyak train dqn --env CartPole-v1 --preset zoo --total-steps 50000 --seed S``
  (target: >= 475; rl-baselines3-zoo reports 500)

then writes ``rl_results.json`` (per seed: final evaluation return, steps/s) and one plot per
task (mean and min-max band over seeds) into ``--out``. Each run uses one thread; already
finished runs are reused (re-running resumes or just re-evaluates them).

``--set KEY=VALUE`` (repeatable) passes overrides on top of the zoo preset to every run, and
``--tag NAME`` names that variant: run directories ``<algo>-<env>-NAME/seedS``, results key
``"<algo> <env> NAME"``, plot ``rl_<algo>_<env>-NAME.png``. E.g. the Double-DQN variant of
docs/results.md: ``--only dqn --set double_dqn=true --tag double``; the averaged-evaluation
variant: ``--only dqn --seeds 0 1 2 3 4 --set eval_ema_decay=0.999 --tag eval-ema``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

TASKS = {
    "ddpg": ("Pendulum-v1", 20_000, -250.0),
    "dqn": ("CartPole-v1", 50_000, 475.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", type=Path, default=Path("runs/results"))
    p.add_argument("--only", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if args.overrides and not args.tag:
        p.error("--set needs --tag NAME, so the variant's runs and results are kept apart")
    suffix = f"-{args.tag}" if args.tag else ""

    from polyak.rl.plot import plot_runs

    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for algo in args.only:
        env, steps, target = TASKS[algo]
        dirs = []
        for seed in args.seeds:
            run_dir = args.runs / f"{algo}-{env}{suffix}" / f"seed{seed}"
            cmd = [sys.executable, "-m", "polyak", "train", algo, "--env", env]
            cmd += ["--preset", "zoo", "--total-steps", str(steps), "--seed", str(seed)]
            for pair in args.overrides:
                cmd += ["--set", pair]
            cmd += ["--run-dir", str(run_dir), "--no-progress"]
            print(" ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True)
            dirs.append(run_dir)
        summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
        finals = [s["final_eval_return"] for s in summaries]
        sets = "".join(f" --set {pair}" for pair in args.overrides)
        key = f"{algo} {env}" + (f" {args.tag}" if args.tag else "")
        results[key] = {
            "command": f"polyak train {algo} --env {env} --preset zoo --total-steps {steps} "
            f"--seed S{sets}",
            "target": target,
            "seeds": args.seeds,
            "final_eval_return": finals,
            "mean": statistics.mean(finals),
            "min": min(finals),
            "steps_per_second": [s["steps_per_second"] for s in summaries],
            "all_seeds_meet_target": all(f >= target for f in finals),
        }
        for extra in ("final_policy_step", "last_eval_return"):  # keep_best runs
            if all(extra in s for s in summaries):
                results[key][extra] = [s[extra] for s in summaries]
        plot_runs(dirs, args.out / f"rl_{algo}_{env}{suffix}.png")
        print(json.dumps(results[key]), flush=True)
    path = args.out / "rl_results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
