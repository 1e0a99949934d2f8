"""Cost of polyak.Optimizer against the hand-written torch loop (docs/performance.md, "Optimizer").

    python benchmarks/bench_optimizer.py [--case mlp48 dqn] [--rounds 41] [--device cpu]

Two models, each trained by every variant on its own copy (same initial weights, same batch):

- ``mlp48``: ``nn.Sequential(48 x (Linear(256, 256), LayerNorm(256)))`` (3.2 M parameters, 192
  tensors), batch 64, loss ``model(x).square().mean()``, Adam (lr 1e-4, torch's default
  implementation for the device), global-norm clipping at 1.0.
- ``dqn``: the DQN CartPole network ``4-256-256-2`` (ReLU), batch 64, Huber loss on the
  Q-values of the taken actions, Adam lr 2.3e-3 ``fused=True`` (as ``polyak.rl`` builds it),
  global-norm clipping at 10: thousands of tiny steps, where per-step Python overhead shows.

Variants (``c`` the clip norm):

- ``torch``: ``loss.backward(); clip_grad_norm_(params, c, foreach=True); opt.step();
  opt.zero_grad()``, the reference of every ratio;
- ``minimize``: ``opt.minimize(loss)`` with ``polyak.transforms.clip_by_global_norm(c)``;
- ``compute+apply``: ``opt.apply_gradients(opt.compute_gradients(loss))``, same transform;
- ``minimize (flat)``: ``minimize`` after ``polyak.flatten_parameters_(model)``: clipping runs
  one kernel per buffer, and so does the optimizer step where it can be twinned (SGD/Adam/AdamW,
  not CPU ``fused``: that stays per tensor, see ``polyak.grad.stepping``). ``--dqn-flat-adam
  foreach`` gives the flattened ``dqn`` models Adam ``foreach=True`` instead of ``fused=True``;
- ``compute+apply (flat)``: the same on the flattened model;
- ``torch (flat)``: the hand-written loop on a flattened model, with the flat variants' optimizer
  the flat variants' weights are checked against it.

Method: every round runs every variant once, in an order whose start rotates every round; a
variant times ``--inner`` consecutive steps with ``time.perf_counter_ns`` (``gc`` off). Reported:
the median time per step over the rounds and the **median of the per-round ratios** to
``torch`` (both sides of a ratio ran in the same round, under the same machine load), with the
25-75 % range of those ratios. After timing, the weights check that every variant did the
work: polyak's four variants must end bit-identical to each other, the two torch loops too,
and the two families within 25 % of the distance the weights travelled (their clip formulas
differ in the last bits, TF's ``c * min(1/N, 1/c)`` against torch's ``c / (N + 1e-6)``, and
training amplifies that).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import polyak


def mlp48() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(48) for m in (nn.Linear(256, 256), nn.LayerNorm(256))])


def dqn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2)
    )


def case(name: str, device: torch.device, batch: int, fused_flat: bool = True):
    """(model factory, loss(model), optimizer factory(params, flat), clip norm, steps/batch)."""
    g = torch.Generator().manual_seed(1)
    pool = 16  # batches, cycled: a loss that never reaches zero (no denormal slow-down)
    if name == "mlp48":
        xs = torch.randn(pool, batch, 256, generator=g).to(device)
        ys = torch.randn(pool, batch, 256, generator=g).to(device)

        def loss(m: nn.Module, i: int) -> torch.Tensor:
            return (m(xs[i % pool]) - ys[i % pool]).square().mean()

        def make_opt(params, flat: bool) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=1e-4)

        return mlp48, loss, make_opt, 1.0, 4
    if name == "dqn":
        s = torch.randn(pool, batch, 4, generator=g).to(device)
        a = torch.randint(0, 2, (pool, batch, 1), generator=g).to(device)
        y = torch.randn(pool, batch, generator=g).to(device)

        def loss(m: nn.Module, i: int) -> torch.Tensor:
            j = i % pool
            return nn.functional.smooth_l1_loss(m(s[j]).gather(1, a[j]).squeeze(1), y[j])

        def make_opt(params, flat: bool) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=2.3e-3, fused=not flat or fused_flat)

        return dqn_net, loss, make_opt, 10.0, 40
    raise ValueError(name)


def variants(name: str, device: torch.device, batch: int, fused_flat: bool = True):
    make_model, loss, make_opt, clip, inner = case(name, device, batch, fused_flat)

    def hand_written(flat: bool):
        model = make_model().to(device)
        if flat:
            polyak.flatten_parameters_(model)
        opt = make_opt(model.parameters(), flat)
        params = list(model.parameters())
        count = iter(range(10**9))

        def step() -> None:
            loss(model, next(count)).backward()
            nn.utils.clip_grad_norm_(params, clip, foreach=True)
            opt.step()
            opt.zero_grad()

        return model, step

    def wrapped(flat: bool, how: str):
        model = make_model().to(device)
        if flat:
            polyak.flatten_parameters_(model)
        opt = polyak.Optimizer(
            make_opt(model.parameters(), flat), [polyak.transforms.clip_by_global_norm(clip)]
        )
        count = iter(range(10**9))
        if how == "minimize":
            return model, lambda: opt.minimize(loss(model, next(count)))
        return model, lambda: opt.apply_gradients(opt.compute_gradients(loss(model, next(count))))

    runs: dict[str, tuple[nn.Module, Callable[[], None]]] = {
        "torch": hand_written(False),
        "minimize": wrapped(False, "minimize"),
        "compute+apply": wrapped(False, "apply"),
        "minimize (flat)": wrapped(True, "minimize"),
        "compute+apply (flat)": wrapped(True, "apply"),
        "torch (flat)": hand_written(True),
    }
    return runs, inner


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def run_case(name: str, device: torch.device, args) -> None:
    runs, inner = variants(name, device, args.batch, args.dqn_flat_adam == "fused")
    inner = args.inner or inner

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = [p.detach().clone() for p in runs["torch"][0].parameters()]
    for _, fn in runs.values():  # warm up: allocator, optimizer state, flat twins, caches
        for _ in range(5):
            fn()
    sync()
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(args.rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                fn = runs[n][1]
                sync()
                t0 = time.perf_counter_ns()
                for _ in range(inner):
                    fn()
                sync()
                times[n].append((time.perf_counter_ns() - t0) / inner / 1e3)
    finally:
        gc.enable()
    # Every variant took the same number of steps on the same batches. polyak's variants
    # (flat or not) must agree bit for bit, as must the two torch loops; polyak and torch differ
    # by the clip formula's last bits, amplified by training: within 25 % of how far they moved.
    final = {n: [p.detach() for p in m.parameters()] for n, (m, _) in runs.items()}
    for n, ws in final.items():
        same = final["torch" if n.startswith("torch") else "minimize"]
        if not all(torch.equal(a, b) for a, b in zip(ws, same)):
            raise SystemExit(f"{name}/{n}: weights are not bit-identical to its reference")
    moved = max((a - b).abs().max().item() for a, b in zip(final["torch"], start))
    gap = max((a - b).abs().max().item() for a, b in zip(final["torch"], final["minimize"]))
    if not gap <= 0.25 * moved:
        raise SystemExit(
            f"{name}: polyak and torch weights differ by {gap:.2e} (moved {moved:.2e})"
        )
    print(
        f"\n{name}: device={device} batch={args.batch} rounds={args.rounds} "
        f"steps/round={inner} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"(weights: polyak-torch gap {gap:.1e}, moved {moved:.1e})"
        + (f" dqn-flat-adam={args.dqn_flat_adam}" if name == "dqn" else "")
    )
    print("| variant | µs/step (median) | ratio to torch (median of rounds) | ratio 25-75 % |")
    print("|---|---:|---:|---|")
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times["torch"])]
        print(
            f"| {n} | {statistics.median(times[n]):,.1f} | {statistics.median(ratios):.3f} | "
            f"{quantile(ratios, 0.25):.3f}-{quantile(ratios, 0.75):.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", nargs="+", default=["mlp48", "dqn"], choices=["mlp48", "dqn"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--inner", type=int, default=0, help="steps per timing (0: per case)")
    parser.add_argument("--dqn-flat-adam", default="fused", choices=["fused", "foreach"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch default); see the docs"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.case:
        run_case(name, torch.device(args.device), args)


if __name__ == "__main__":
    main()
