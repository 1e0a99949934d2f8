"""Step time of polyak.optim's TF1 optimizers against torch's nearest built-ins (docs/optim.md).

    python benchmarks/bench_optim_tf.py [--case mlp48 dqn] [--rounds 15] [--inner 0]
        [--device cpu] [--threads 1] [--json benchmarks/results/optim_tf.json]

The models are the cases of ``bench_optimizer.py``: ``mlp48`` (48 x (Linear(256, 256),
LayerNorm), 3.2 M parameters in 192 tensors) and ``dqn`` (4-256-256-2, 67 k parameters in 6
tensors, where a step is mostly per-call overhead). One backward pass of the case's loss gives
the gradients; every variant steps its own copy of the model with those same gradients, so
only ``step()`` is timed. Variants:

- each polyak.optim optimizer, on the model as it is and after ``polyak.flatten_parameters_``
  (``flat``: weights, gradients and slots in one buffer each);
- torch's nearest built-in with ``foreach=True``: SGD (GradientDescent, Momentum, Nesterov),
  Adam, RMSprop, Adagrad (for Adagrad and, having no FTRL, Ftrl), Adadelta;
- for RMSProp, the two TF-style RMSprops on PyPI: timm's ``RMSpropTF`` (its default
  implementation for the device, and ``foreach=True``) and Stable-Baselines3's
  ``RMSpropTFLike`` (a per-tensor loop). They are loaded from their module files alone
  (``import timm`` would import torchvision, which does not import beside this torch build;
  SB3's module needs only torch): ``pip install --no-deps timm stable-baselines3`` suffices.

Three floors for RMSProp on the CPU, NumPy loops over copies of the model's values in polyak's
chunks (not optimizers): ``floor: RMSProp's memory traffic`` reads the four arrays TF's rule
reads (weights, gradients, mean square, momentum) and writes the three it writes, with the
fewest passes that touch them all (three ``maximum``s a chunk), no arithmetic; ``floor: exact
square roots`` takes the correctly rounded square root of every mean square; ``floor: TF's
rule on cached data`` runs polyak's RMSProp update (its NumPy operations, one per rounding of
TF's kernel) as many times as the model has chunks, always on the same chunk, which stays in
cache: the arithmetic with no memory traffic. No implementation of TF's rule steps faster than
the first; every exact one pays the second; every one made of one call per operation (torch,
NumPy: anything short of a compiled fused kernel) pays the third.

Method: every round runs every variant for ``--inner`` consecutive steps (3 on mlp48, 40 on
dqn by default), in an order whose start rotates each round and whose direction alternates
(A B C, C B A, ...), timed with ``time.thread_time_ns`` (``--clock cpu``, the default on the
CPU: the time the stepping thread ran, which other jobs on a shared machine do not inflate;
everything here runs on that one thread) and ``time.perf_counter_ns`` (``--clock wall``; on
CUDA always wall, after a sync), ``gc`` off. Reported: median time per step over the rounds
and the median of the per-round ratios (both sides of a ratio ran in the same round, under the
same load), with the 25-75 % range; the JSON file has both clocks. After timing, the TF-style
RMSprops must agree with polyak's to 1e-5 of the largest weight (the same rule, rounded
differently), and flat and plain polyak runs bit for bit.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import polyak
import polyak.optim as po
from polyak.flat import pack
from polyak.optim._arith import Arith
from polyak.optim._arrays import CHUNK_BYTES, ArrayOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optimizer import case, quantile

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

LR = 1e-4
OURS: dict[str, Factory] = {
    "GradientDescent": lambda ps: po.GradientDescentOptimizer(ps, LR),
    "Momentum": lambda ps: po.MomentumOptimizer(ps, LR, 0.9),
    "Momentum (Nesterov)": lambda ps: po.MomentumOptimizer(ps, LR, 0.9, use_nesterov=True),
    "Adam": lambda ps: po.AdamOptimizer(ps, LR),
    "RMSProp": lambda ps: po.RMSPropOptimizer(ps, LR),
    "RMSProp (momentum 0.9, centered)": lambda ps: po.RMSPropOptimizer(
        ps, LR, momentum=0.9, centered=True
    ),
    "Adagrad": lambda ps: po.AdagradOptimizer(ps, LR),
    "Adadelta": lambda ps: po.AdadeltaOptimizer(ps, 1.0),
    "Ftrl": lambda ps: po.FtrlOptimizer(ps, LR),
}
NEAREST: dict[str, tuple[str, Factory]] = {
    "GradientDescent": ("SGD", lambda ps: torch.optim.SGD(ps, LR, foreach=True)),
    "Momentum": ("SGD momentum", lambda ps: torch.optim.SGD(ps, LR, 0.9, foreach=True)),
    "Momentum (Nesterov)": (
        "SGD nesterov",
        lambda ps: torch.optim.SGD(ps, LR, 0.9, nesterov=True, foreach=True),
    ),
    "Adam": ("Adam", lambda ps: torch.optim.Adam(ps, LR, foreach=True)),
    "RMSProp": ("RMSprop", lambda ps: torch.optim.RMSprop(ps, LR, foreach=True)),
    "RMSProp (momentum 0.9, centered)": (
        "RMSprop centered",
        lambda ps: torch.optim.RMSprop(ps, LR, momentum=0.9, centered=True, foreach=True),
    ),
    "Adagrad": ("Adagrad", lambda ps: torch.optim.Adagrad(ps, LR, foreach=True)),
    "Adadelta": ("Adadelta", lambda ps: torch.optim.Adadelta(ps, 1.0, foreach=True)),
    "Ftrl": ("Adagrad (no FTRL in torch)", lambda ps: torch.optim.Adagrad(ps, LR, foreach=True)),
}


def load_timm_rmsprop_tf() -> type:
    """timm's ``optim/rmsprop_tf.py`` (and the helpers it imports relatively) without running
    ``timm/__init__.py``."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        raise SystemExit("timm is not installed: pip install --no-deps timm")
    package = types.ModuleType("_timm_optim")
    package.__path__ = [str(Path(next(iter(spec.submodule_search_locations))) / "optim")]
    sys.modules["_timm_optim"] = package
    return importlib.import_module("_timm_optim.rmsprop_tf").RMSpropTF


def load_sb3_rmsprop_tf_like() -> type:
    """Stable-Baselines3's ``common/sb2_compat/rmsprop_tf_like.py`` alone (it imports torch)."""
    spec = importlib.util.find_spec("stable_baselines3")
    if spec is None:
        raise SystemExit("stable-baselines3 is not installed: pip install stable-baselines3")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "common" / "sb2_compat" / "rmsprop_tf_like.py"
    module_spec = importlib.util.spec_from_file_location("_sb3_rmsprop_tf_like", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.RMSpropTFLike


class Variant:
    """A model copy with the shared gradients in place and its optimizer."""

    def __init__(self, make_model, state, grads, factory: Factory, flat: bool, device) -> None:
        self.model = make_model().to(device)
        self.model.load_state_dict(state)
        params = list(self.model.parameters())
        if flat:
            polyak.flatten_parameters_(self.model, grads=False)
            slots = pack([(p.shape, p.dtype, p.device) for p in params])
            for p, slot, g in zip(params, slots, grads):
                p.grad = slot.copy_(g)
        else:  # a copy each: torch's foreach SGD with Nesterov adds to the gradients in place
            for p, g in zip(params, grads):
                p.grad = g.clone()
        self.opt = factory(params)

    def weights(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.model.parameters()]


class Floor:
    """A lower bound on a CPU step of TF's RMSProp over the model's values (see the module
    docstring): ``what`` is ``"traffic"``, ``"sqrt"`` or ``"cached"``. Duck-types ``step()``."""

    def __init__(self, grads: list[torch.Tensor], what: str) -> None:
        n = sum(g.numel() for g in grads)
        flat_grads = torch.cat([g.reshape(-1) for g in grads]).abs()
        self.arrays = [flat_grads.clone().numpy() for _ in range(4)]  # weights, grads, ms, mom
        size = CHUNK_BYTES // 4
        self.chunks = [[a[s : s + size] for a in self.arrays] for s in range(0, n, size)]
        self.scratch = np.empty(size, np.float32)
        self.step = {"traffic": self._traffic, "sqrt": self._sqrt, "cached": self._cached}[what]
        # polyak's own RMSProp update (its private NumPy operations) on the first chunk only
        self.rule = po.RMSPropOptimizer([torch.nn.Parameter(torch.zeros(1))], LR)
        self.ops = ArrayOps(torch.float32)
        first = self.chunks[0]
        self.ops.temps = [np.empty(first[0].size, np.float32) for _ in range(4)]
        self.ops.twins = {id(a): torch.from_numpy(a) for a in (*first, *self.ops.temps)}
        group = self.rule.param_groups[0]
        self.scalars = self.ops.scalars(self.rule._scalars(group, Arith(torch.float32)))

    def _traffic(self) -> None:
        maximum = np.maximum
        for w, g, ms, mom in self.chunks:
            maximum(ms, g, out=ms)
            maximum(mom, ms, out=mom)
            maximum(w, mom, out=w)

    def _sqrt(self) -> None:
        for _, _, ms, _ in self.chunks:
            np.sqrt(ms, out=self.scratch[: ms.size])

    def _cached(self) -> None:
        update, s, ops, chunk = self.rule._update, self.scalars, self.ops, self.chunks[0]
        with np.errstate(all="ignore"):
            for _ in self.chunks:  # as many chunks as the model has, all the first one
                update(s, ops, *chunk)


FLOORS = {
    "floor: RMSProp's memory traffic": "traffic",
    "floor: exact square roots": "sqrt",
    "floor: TF's rule on cached data": "cached",
}


def build(name: str, device: torch.device, batch: int) -> tuple[dict[str, Any], list[tuple]]:
    make_model, loss, *_ = case(name, device, batch)
    base = make_model().to(device)
    loss(base, 0).backward()
    grads = [p.grad.detach().clone() for p in base.parameters()]
    state = base.state_dict()

    def variant(factory: Factory, flat: bool = False) -> Variant:
        return Variant(make_model, state, grads, factory, flat, device)

    variants: dict[str, Variant] = {}
    pairs: list[tuple[str, str, str]] = []  # (table, ours, theirs)
    for name, factory in OURS.items():
        label, torch_factory = NEAREST[name]
        variants[name] = variant(factory)
        variants[f"{name} (flat)"] = variant(factory, flat=True)
        variants[f"torch {label}"] = variant(torch_factory)
        pairs.append(("torch", name, f"torch {label}"))
        pairs.append(("torch", f"{name} (flat)", f"torch {label}"))
    timm_rmsprop, sb3_rmsprop = load_timm_rmsprop_tf(), load_sb3_rmsprop_tf_like()
    variants["timm RMSpropTF"] = variant(lambda ps: timm_rmsprop(ps, lr=LR, eps=1e-10))
    variants["timm RMSpropTF foreach"] = variant(
        lambda ps: timm_rmsprop(ps, lr=LR, eps=1e-10, foreach=True)
    )
    variants["SB3 RMSpropTFLike"] = variant(lambda ps: sb3_rmsprop(ps, lr=LR, alpha=0.9, eps=1e-10))
    floors = list(FLOORS) if device.type == "cpu" else []
    for floor in floors:
        variants[floor] = Floor(grads, FLOORS[floor])  # type: ignore[assignment]
    for other in ("timm RMSpropTF", "timm RMSpropTF foreach", "SB3 RMSpropTFLike"):
        for ours in ("RMSProp", "RMSProp (flat)", *floors):
            pairs.append(("tf-style", ours, other))
    return variants, pairs


def measure(variants: dict[str, Any], rounds: int, inner: int, device) -> dict:
    """Per variant, ``{"wall": [...], "cpu": [...]}``: microseconds per step, one per round."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def opt(v: Any) -> Any:
        return v.opt if isinstance(v, Variant) else v

    for v in variants.values():  # warm up: state, layouts, allocator
        for _ in range(2):
            opt(v).step()
    sync()
    names = list(variants)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            order = names[k:] + names[:k]
            for n in order if r % 2 == 0 else order[::-1]:
                step = opt(variants[n]).step
                sync()
                w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                for _ in range(inner):
                    step()
                sync()
                c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
                times[n]["wall"].append((w1 - w0) / inner / 1e3)
                times[n]["cpu"].append((c1 - c0) / inner / 1e3)
    finally:
        gc.enable()
    return times


def check(variants: dict[str, Variant]) -> dict[str, float]:
    """Gaps between implementations of one rule, relative to the largest weight: rounding
    differences only (each weight moves by ~1e-4 a step and is rounded each time)."""
    ours = variants["RMSProp"].weights()
    scale = max(w.abs().max().item() for w in ours)
    gaps = {}
    for other in ("timm RMSpropTF", "timm RMSpropTF foreach", "SB3 RMSpropTFLike"):
        gap = max((a - b).abs().max().item() for a, b in zip(ours, variants[other].weights()))
        gaps[other] = gap / scale
        if gaps[other] > 1e-5:
            raise SystemExit(f"{other} is {gaps[other]:.1e} (relative) away from polyak's RMSProp")
    for name in OURS:
        plain, flat = variants[name].weights(), variants[f"{name} (flat)"].weights()
        if not all(torch.equal(a, b) for a, b in zip(plain, flat)):
            raise SystemExit(f"{name}: flat and plain runs differ")
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", nargs="+", default=["mlp48", "dqn"], choices=["mlp48", "dqn"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=0, help="steps per timing (0: per case)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu", help="the table's clock (CPU: cpu)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {}
    for name in args.case:
        results[name] = run_case(name, device, args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def run_case(name: str, device: torch.device, args: argparse.Namespace) -> dict:
    variants, pairs = build(name, device, args.batch)
    inner = args.inner or {"mlp48": 3, "dqn": 40}[name]
    times = measure(variants, args.rounds, inner, device)
    gaps = check(variants)
    clock = args.clock if device.type == "cpu" else "wall"
    header = (
        f"{name} step: device={device} rounds={args.rounds} steps/round={inner} "
        f"torch={torch.__version__} numpy={np.__version__} threads={torch.get_num_threads()} "
        f"clock={clock}"
    )
    print(f"\n{header}")
    rows = []
    print("| polyak.optim | µs/step | against | µs/step | ratio (median of rounds) | 25-75 % |")
    print("|---|---:|---|---:|---:|---|")
    for table, ours, theirs in pairs:
        row: dict[str, Any] = {"table": table, "ours": ours, "theirs": theirs}
        for c in ("cpu", "wall"):
            ratios = [a / b for a, b in zip(times[ours][c], times[theirs][c])]
            suffix = "" if c == clock else f"_{c}"
            row.update(
                {
                    f"ours_us{suffix}": statistics.median(times[ours][c]),
                    f"theirs_us{suffix}": statistics.median(times[theirs][c]),
                    f"ratio{suffix}": statistics.median(ratios),
                    f"ratio_25{suffix}": quantile(ratios, 0.25),
                    f"ratio_75{suffix}": quantile(ratios, 0.75),
                }
            )
        rows.append(row)
        print(
            f"| {ours} | {row['ours_us']:,.0f} | {theirs} | {row['theirs_us']:,.0f} | "
            f"{row['ratio']:.3f} | {row['ratio_25']:.3f}-{row['ratio_75']:.3f} |"
        )
    print("largest gap to polyak's RMSProp, relative to the largest weight:", gaps)
    return {"setup": header, "rows": rows, "rmsprop_gaps": gaps}


if __name__ == "__main__":
    main()
