"""How far torch's look-alike optimizers end from TF1's on one fixed problem (docs/optim.md).

    python benchmarks/optim_tf_vs_torch.py [--steps 10 200]
        [--json benchmarks/results/optim_tf_vs_torch.json]

The problem: a fixed regression (256 points in 8 dimensions, targets ``sin(x @ w)`` plus noise),
an MLP 8-32-1 (tanh) from a fixed initialisation, full-batch mean squared error. Each pair runs
TF1's optimizer (polyak.optim, which reproduces TensorFlow's trajectories: see
tools/tf1_optimizer_reference.py) and torch's nearest built-in with the same hyper-parameters,
from the same weights, for each number of steps. Reported: the distance between the two final
weight vectors relative to how far TF's moved, ``|w_tf - w_torch| / |w_tf - w_0|``, and both
losses. A distance near 0 means the difference does not matter there; near 1 or more, the two
trained different models.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import polyak.optim as po

Make = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

PAIRS: list[tuple[str, Make, str, Make]] = [
    (
        "GradientDescentOptimizer(0.1)",
        lambda ps: po.GradientDescentOptimizer(ps, 0.1),
        "SGD(lr=0.1)",
        lambda ps: torch.optim.SGD(ps, lr=0.1),
    ),
    (
        "MomentumOptimizer(0.05, 0.9)",
        lambda ps: po.MomentumOptimizer(ps, 0.05, 0.9),
        "SGD(lr=0.05, momentum=0.9)",
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    ),
    (
        "MomentumOptimizer(0.05, 0.9, use_nesterov=True)",
        lambda ps: po.MomentumOptimizer(ps, 0.05, 0.9, use_nesterov=True),
        "SGD(lr=0.05, momentum=0.9, nesterov=True)",
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    ),
    (
        "AdamOptimizer(0.01)",
        lambda ps: po.AdamOptimizer(ps, 0.01),
        "Adam(lr=0.01)",
        lambda ps: torch.optim.Adam(ps, lr=0.01),
    ),
    (
        "AdamOptimizer(0.01, epsilon=1.0)",
        lambda ps: po.AdamOptimizer(ps, 0.01, epsilon=1.0),
        "Adam(lr=0.01, eps=1.0)",
        lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1.0),
    ),
    (
        "RMSPropOptimizer(0.01)",
        lambda ps: po.RMSPropOptimizer(ps, 0.01),
        "RMSprop(lr=0.01, alpha=0.9, eps=1e-10)",
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-10),
    ),
    (
        "RMSPropOptimizer(0.01, momentum=0.9)",
        lambda ps: po.RMSPropOptimizer(ps, 0.01, momentum=0.9),
        "RMSprop(lr=0.01, alpha=0.9, eps=1e-10, momentum=0.9)",
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-10, momentum=0.9),
    ),
    (
        "AdagradOptimizer(0.1)",
        lambda ps: po.AdagradOptimizer(ps, 0.1),
        "Adagrad(lr=0.1)",
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    ),
    (
        "AdagradOptimizer(0.1)",
        lambda ps: po.AdagradOptimizer(ps, 0.1),
        "Adagrad(lr=0.1, initial_accumulator_value=0.1, eps=0)",
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1, eps=0.0),
    ),
    (
        "AdadeltaOptimizer(1.0)",
        lambda ps: po.AdadeltaOptimizer(ps, 1.0),
        "Adadelta(lr=1.0, rho=0.95, eps=1e-8)",
        lambda ps: torch.optim.Adadelta(ps, lr=1.0, rho=0.95, eps=1e-8),
    ),
    (
        "FtrlOptimizer(0.1)",
        lambda ps: po.FtrlOptimizer(ps, 0.1),
        "Adagrad(lr=0.1, initial_accumulator_value=0.1, eps=0)",
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1, eps=0.0),
    ),
]


def problem() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.1 * torch.randn(256, 1, generator=g)
    torch.manual_seed(1)
    return x, y, net().state_dict()


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def train(make: Make, steps: int, x, y, init) -> tuple[torch.Tensor, float]:
    model = net()
    model.load_state_dict(init)
    opt = make(list(model.parameters()))
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    with torch.no_grad():
        loss = (model(x) - y).square().mean().item()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, init = problem()
    w0 = torch.cat([t.reshape(-1) for t in init.values()])
    print(f"torch {torch.__version__}; loss at the start {(net_loss(init, x, y)):.4f}")
    print("| TF1 (polyak.optim) | torch | steps | distance | TF loss | torch loss |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    for tf_name, tf_make, torch_name, torch_make in PAIRS:
        for steps in args.steps:
            w_tf, loss_tf = train(tf_make, steps, x, y, init)
            w_torch, loss_torch = train(torch_make, steps, x, y, init)
            distance = ((w_tf - w_torch).norm() / (w_tf - w0).norm()).item()
            rows.append(
                {
                    "tf": tf_name,
                    "torch": torch_name,
                    "steps": steps,
                    "distance": distance,
                    "tf_loss": loss_tf,
                    "torch_loss": loss_torch,
                }
            )
            print(
                f"| {tf_name} | {torch_name} | {steps} | {distance:.3g} | {loss_tf:.4f} | "
                f"{loss_torch:.4f} |"
            )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n"
        )


def net_loss(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    model = net()
    model.load_state_dict(state)
    with torch.no_grad():
        return (model(x) - y).square().mean().item()


if __name__ == "__main__":
    main()
