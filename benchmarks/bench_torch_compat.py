"""What each torch internal in ``polyak._torch_compat`` buys: user cases timed with the internal
and with its public fallback forced, in the same run (docs/performance.md, "torch internals").

    python benchmarks/bench_torch_compat.py [--rounds 15] [--group direct_step foreach ...]

Groups (an entry's fallback is forced by binding it in ``polyak._torch_compat``):

- ``control``: nothing forced, the internal-based variant against a second copy of itself
  (how far from 1.0 a ratio strays by noise and memory placement alone);
- ``direct_step``: ``step_hooks_registered``, ``profiler_enabled``, ``graph_capture_check``,
  ``fused_check_pending``; their fallbacks send every step through ``Optimizer.step``;
- ``foreach``: every ``foreach_*`` entry; the fallbacks loop over tensors;
- ``storage_use_count``: reuse of ``apply_gradients``' gradient copy.

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
import ctypes
import gc
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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
    "direct_step": [
        "step_hooks_registered",
        "profiler_enabled",
        "graph_capture_check",
        "fused_check_pending",
    ],
    "foreach": sorted(n for n in torch_compat.FALLBACKS if n.startswith("foreach_")),
    "storage_use_count": ["storage_use_count"],
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


def dqn_case(steps: int = 0) -> tuple[Callable[[], tuple[Callable[[], None], Callable]], int]:
    """``steps`` gradient steps per burst (0: the preset's 128)."""
    cfg = make_config("dqn", "CartPole-v1", "zoo")
    replay = filled_replay(4, 0, lambda g: int(g.integers(2)))
    n, b = steps or cfg.gradient_steps, cfg.batch_size
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


class Instructions:
    """Instructions executed, counted by valgrind's callgrind: the same count whatever else
    the machine runs. Needs the process to run under callgrind (``--instructions`` re-runs
    this script so) and a two-function C helper, compiled here, that issues callgrind's dump
    request."""

    def __init__(self, out_file: str) -> None:
        self.out_file = out_file
        build = Path(tempfile.mkdtemp())
        (build / "dump.c").write_text(
            "#include <valgrind/callgrind.h>\nvoid dump(void) { CALLGRIND_DUMP_STATS; }\n"
        )
        lib = build / "libdump.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", lib, build / "dump.c"], check=True)
        self._dump = ctypes.CDLL(str(lib)).dump

    def __call__(self) -> float:
        """Instructions since the previous call (callgrind zeroes its counters at a dump)."""
        self._dump()
        newest = max(glob.glob(self.out_file + ".*"), key=lambda f: int(f.rsplit(".", 1)[1]))
        for line in Path(newest).read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                return float(line.split()[1])
        raise RuntimeError(f"no totals in {newest}")


def cpu_seconds() -> float:
    return time.process_time()


def compare(
    group: str,
    case_name: str,
    rounds: int,
    inner: int,
    meter: Callable[[], float],
    warm_up: int = 3,
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
            for _ in range(warm_up):  # state, caches, twins
                step()
        runs[fallback].append((step, weights))
    times: dict[bool, list[float]] = {False: [], True: []}
    gc.collect()
    gc.disable()  # a collection would land in whichever variant happens to run
    try:
        for r in range(rounds):
            for fallback in (False, True) if r % 2 == 0 else (True, False):
                with bound(names, fallback):
                    start = meter()
                    for _ in range(inner):
                        for step, _ in runs[fallback]:
                            step()
                    elapsed = meter() - start if meter is cpu_seconds else meter()
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
    p.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under valgrind's callgrind instead of timing (about 50 times "
        "slower; one round is enough, the counts repeat; kernel time such as page faults "
        "is not counted; DQN bursts of 16 gradient steps)",
    )
    p.add_argument("--_callgrind_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.instructions and not args._callgrind_out:
        out = os.path.join(tempfile.mkdtemp(), "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--", sys.executable]
        rest = [a for a in sys.argv if a != "--instructions"]
        raise SystemExit(
            subprocess.run([*cmd, *rest, "--instructions", "--_callgrind_out", out]).returncode
        )
    torch.set_num_threads(1)
    meter: Callable[[], float] = cpu_seconds
    unit, scale = "µs/step", 1e6
    if args.instructions:
        meter, unit, scale = Instructions(args._callgrind_out), "k instructions/step", 1e-3
    inner = {"dqn": 1, "ddpg": 20, "mlp48": 3, "mlp48 (flat)": 3}
    if args.instructions:  # counts repeat: fewer steps do
        inner = {"dqn": 1, "ddpg": 2, "mlp48": 1, "mlp48 (flat)": 1}
    how = "instructions (callgrind)" if args.instructions else "CPU time"
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds, {how}")
    print(f"| group | case | internal {unit} | fallback {unit} | fallback / internal |")
    print("|---|---|---:|---:|---:|")
    if args.instructions:  # bursts of 16 gradient steps, not 128: 50 times slower here
        CASES["dqn"] = lambda: dqn_case(16)
    for group in args.group:
        for name in args.case:
            fast, slow, ratio = compare(group, name, args.rounds, inner[name], meter)
            print(
                f"| {group} | {name} | {fast * scale:,.0f} | {slow * scale:,.0f} | {ratio:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
