"""Cost of polyak.Optimizer against the hand-written torch loop, on a 48-block MLP.

    python benchmarks/bench_optimizer.py [--device cuda] [--batch 64] [--reps 15] [--steps 10]

Every variant trains its own copy of ``nn.Sequential(48 x (Linear(256, 256), LayerNorm(256)))``
with Adam and global-norm clipping at 1.0. Repetitions are interleaved (each rep runs every
variant once, in an order rotated every rep) and the median time per step is reported with
its ratio to the hand-written loop measured in the same run:

- ``torch``: ``loss.backward(); clip_grad_norm_(params, 1.0, foreach=True); opt.step();
  opt.zero_grad()``
- ``minimize``: ``opt.minimize(loss)`` with ``transforms.clip_by_global_norm(1.0)``
- ``compute+apply``: ``opt.apply_gradients(opt.compute_gradients(loss))``, same transform
- ``minimize (flat)``: ``minimize`` after ``polyak.flatten_parameters_(model)``
- ``torch (flat)``: the hand-written loop on a flattened model (same kernels as ``torch``)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import polyak


def mlp(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    blocks = [m for _ in range(48) for m in (nn.Linear(256, 256), nn.LayerNorm(256))]
    return nn.Sequential(*blocks).to(device)


def variants(device: torch.device, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    def torch_loop(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        params = list(model.parameters())

        def step() -> None:
            model(x).square().mean().backward()
            nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad()

        return step

    def polyak_opt(model: nn.Module) -> polyak.Optimizer:
        inner = torch.optim.Adam(model.parameters(), lr=1e-4)
        return polyak.Optimizer(inner, [polyak.transforms.clip_by_global_norm(1.0)])

    m1, m2, m3 = mlp(device), mlp(device), mlp(device)
    m4, m5 = polyak.flatten_parameters_(mlp(device)), polyak.flatten_parameters_(mlp(device))
    o2, o3, o4 = polyak_opt(m2), polyak_opt(m3), polyak_opt(m4)
    return {
        "torch": torch_loop(m1),
        "minimize": lambda: o2.minimize(m2(x).square().mean()),
        "compute+apply": lambda: o3.apply_gradients(o3.compute_gradients(m3(x).square().mean())),
        "minimize (flat)": lambda: o4.minimize(m4(x).square().mean()),
        "torch (flat)": torch_loop(m5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.batch, 256, device=device)
    runs = variants(device, x)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in runs.values():  # warm up: allocator, optimizer state, flat twins
        for _ in range(3):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(args.reps):
        # Rotate the order each repetition: no variant always runs first (cold caches).
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            fn = runs[name]
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["torch"])
    print(
        f"device={device} batch={args.batch} reps={args.reps} steps/rep={args.steps} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    print(f"{'variant':<18}{'ms/step':>10}{'vs torch':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<18}{med * 1e3:>10.3f}{med / base:>10.3f}")


if __name__ == "__main__":
    main()
