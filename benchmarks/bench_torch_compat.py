"""What each torch internal in ``polyak._torch_compat`` buys: user cases timed with the internal
and with its public fallback forced, in the same run (docs/performance.md, "torch internals").

    python benchmarks/bench_torch_compat.py [--rounds 15] [--group control foreach] [--case dqn ...]

Groups (an entry's fallback is forced by binding it in ``polyak._torch_compat``):

- ``control``: nothing forced, the internal-based variant against a second copy of itself
  (how far from 1.0 a ratio strays by noise and memory placement alone);
- ``foreach``: every ``foreach_*`` entry; the fallbacks loop over tensors.

Earlier fast paths were measured with this script and removed for buying under 5 %
(docs/performance.md, "torch internals").

Cases: ``dqn``, one gradient step of ``DQN.train_burst`` (zoo CartPole-v1 preset, bursts of 128
minibatches of 64, as bench_rl_dqn_step.py); ``ddpg``, one ``DDPG.train_step`` (zoo Pendulum-v1
preset, batch of 256: two minimize calls and two target updates); ``mlp48``, one
``opt.apply_gradients(opt.compute_gradients(loss))`` on bench_optimizer.py's mlp48 with
global-norm clipping, plain and after ``flatten_parameters_``. Each variant of a case is built
twice (internal, fallback, fallback, internal) and timed under its own binding, one thread, in
interleaved rounds whose order alternates; reported: the median CPU time per step and the median
of the per-round ratios fallback/internal (above 1: the internal saves time). The weights of
all four instances must end bit-identical.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from bench_optimizer import case

import polyak
from polyak import _torch_compat as torch_compat
from polyak.rl.ddpg import DDPG
from polyak.rl.dqn import DQN
from polyak.rl.presets import make_config
from polyak.rl.replay import ReplayBuffer

GROUPS = {
    "control": [],
    "foreach": sorted(n for n in torch_compat.FALLBACKS if n.startswith("foreach_")),
}


@contextmanager
def bound(names: list[str], fallback: bool) -> Iterator[None]:
    """Entries ``names`` bound to their fallbacks (or internals) inside the block."""
    saved = {n: getattr(torch_compat, n) for n in names}
    try:
        for n in names:
            impl = torch_compat.FALLBACKS[n] if fallback else torch_compat.fast(n)
            if impl is None:
                raise SystemExit(f"{n}: this torch has no usable internal, nothing to compare")
            setattr(torch_compat, n, impl)
        yield
    finally:
        for n, impl in saved.items():
            setattr(torch_compat, n, impl)


def filled_replay(
    obs_dim: int, action_dim: int, act: Callable[[np.random.Generator], object]
) -> ReplayBuffer:
    replay = ReplayBuffer(5000, obs_dim, action_dim, rng=np.random.default_rng(0))
    g = np.random.default_rng(1)
    for _ in range(5000):
        replay.add(g.normal(size=obs_dim), act(g), 1.0, g.normal(size=obs_dim), False, False)
    return replay


def dqn_case() -> tuple[Callable[[], tuple[Callable[[], None], Callable]], int]:
    cfg = make_config("dqn", "CartPole-v1", "zoo")
    replay = filled_replay(4, 0, lambda g: int(g.integers(2)))
    n, b = cfg.gradient_steps, cfg.batch_size
    burst = replay.sample_burst(n, b)

    def build():
        torch.manual_seed(0)
        agent = DQN(cfg, 4, 2, np.random.default_rng(0), torch.device("cpu"))
        return (lambda: agent.train_burst(burst, n)), lambda: list(agent.q.parameters())

    return build, n


def ddpg_case() -> tuple[Callable[[], tuple[Callable[[], None], Callable]], int]:
    cfg = make_config("ddpg", "Pendulum-v1", "zoo")
    replay = filled_replay(3, 1, lambda g: g.uniform(-1, 1, size=1))
    batches = [replay.sample(cfg.batch_size) for _ in range(8)]

    def build():
        torch.manual_seed(0)
        agent = DDPG(cfg, 3, 1, np.random.default_rng(0), torch.device("cpu"))
        count = iter(range(10**9))

        def step() -> None:
            agent.train_step(batches[next(count) % len(batches)])

        return step, lambda: [*agent.actor.parameters(), *agent.critic.parameters()]

    return build, 1


def mlp48_case(flat: bool) -> tuple[Callable[[], tuple[Callable[[], None], Callable]], int]:
    make_model, loss, make_opt, clip, _ = case("mlp48", torch.device("cpu"), 64)

    def build():
        model = make_model()
        if flat:
            polyak.flatten_parameters_(model)
        opt = polyak.Optimizer(
            make_opt(model.parameters(), flat), [polyak.transforms.clip_by_global_norm(clip)]
        )
        count = iter(range(10**9))

        def step() -> None:
            opt.apply_gradients(opt.compute_gradients(loss(model, next(count))))

        return step, lambda: list(model.parameters())

    return build, 1


CASES = {
    "dqn": dqn_case,
    "ddpg": ddpg_case,
    "mlp48": lambda: mlp48_case(False),
    "mlp48 (flat)": lambda: mlp48_case(True),
}


def compare(
    group: str,
    case_name: str,
    rounds: int,
    inner: int,
) -> tuple[float, float, float]:
    names = GROUPS[group]
    build, steps_per_call = CASES[case_name]()
    # Two instances per variant, built in the order internal, fallback, fallback, internal:
    # where an instance lands in memory moves its time by several percent, and the order
    # cancels most of it (the ``control`` group, the internal against itself, shows the rest).
    runs: dict[bool, list] = {False: [], True: []}
    for fallback in (False, True, True, False):
        with bound(names, fallback):
            step, weights = build()
            for _ in range(3):  # warm-up: state, caches, twins
                step()
        runs[fallback].append((step, weights))
    times: dict[bool, list[float]] = {False: [], True: []}
    gc.collect()
    gc.disable()  # a collection would land in whichever variant happens to run
    try:
        for r in range(rounds):
            for fallback in (False, True) if r % 2 == 0 else (True, False):
                with bound(names, fallback):
                    start = time.process_time()
                    for _ in range(inner):
                        for step, _ in runs[fallback]:
                            step()
                    elapsed = time.process_time() - start
                times[fallback].append(elapsed / inner / steps_per_call / 2)
    finally:
        gc.enable()
    weights = [w() for f in (False, True) for _, w in runs[f]]
    if not all(all(torch.equal(a, b) for a, b in zip(weights[0], w)) for w in weights[1:]):
        raise SystemExit(f"{group}/{case_name}: weights differ between internal and fallback")
    ratios = [s / f for f, s in zip(times[False], times[True])]
    fast, slow = statistics.median(times[False]), statistics.median(times[True])
    return fast, slow, statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--group", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    torch.set_num_threads(1)
    inner = {"dqn": 1, "ddpg": 20, "mlp48": 3, "mlp48 (flat)": 3}
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds, CPU time")
    print("| group | case | internal µs/step | fallback µs/step | fallback / internal |")
    print("|---|---|---:|---:|---:|")
    for group in args.group:
        for name in args.case:
            fast, slow, ratio = compare(group, name, args.rounds, inner[name])
            print(
                f"| {group} | {name} | {fast * 1e6:,.0f} | {slow * 1e6:,.0f} | {ratio:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
