"""EMA update speed: polyak.ExponentialMovingAverage against timm, ema-pytorch, torch-ema and
torch.optim.swa_utils.AveragedModel, plus the memory roofline (one ``lerp_`` over all elements).

    python benchmarks/bench_ema.py            # full run: results/ema.json + results/ema.png
    python benchmarks/bench_ema.py --quick    # a smoke run (fewer/smaller models, short timings)

Method (see docs/performance.md, section "EMA"):

- Every contender averages the same model with the same decay at every call: timm
  ``ModelEmaV3(model, decay).update(model)``; ema-pytorch ``EMA(model, beta=decay,
  update_every=1, update_after_step=0, min_value=decay, use_foreach=True)`` (``min_value=decay``
  pins its warmup schedule to ``decay``; its first two calls are copies, so they are made before
  the clock starts); torch-ema ``ExponentialMovingAverage(params, decay,
  use_num_updates=False)`` (otherwise it uses TF's ``num_updates`` warmup);
  ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)`` (its first
  call is a copy, also made before the clock starts); polyak ``ExponentialMovingAverage(decay)``
  with ``track(model)`` then ``update()``, on the model as it is and on a copy flattened with
  ``polyak.flatten_parameters_``; and the flattened one again with ``num_updates=GlobalStep(10**6)``
  (TF's rule ``min(decay, (1+n)/(10+n))`` then gives ``decay`` itself, so the work is the same).
- After all contenders are built, the model's weights are moved (``m1 = m0 + noise``) so that
  every shadow must travel from ``m0`` towards ``m1``. After the timed runs (``k`` calls each)
  the shadows must agree with timm's and with the closed form ``m1 + (m0 - m1) * decay**k``
  (float64) within float32 rounding accumulated over ``1/(1-decay)`` steps. Then a strict
  check: the weights move again, every contender gets 20 more (untimed) calls, and its shadows
  must match ``m2 + (s - m2) * decay**20`` from its own starting shadows ``s`` to within 20 steps
  of float32 rounding; a single skipped call or another decay is 10x or more above that tolerance.
- Contenders run round-robin (the starting contender rotates each round), each timing a batch
  of ``inner`` consecutive updates; medians over rounds; speed-ups vs timm are the medians of the
  per-round ratios (same round, so the same machine load). ``gc`` is off while timing.
- timm is loaded from its ``timm/utils/model_ema.py`` file alone: ``import timm`` imports
  torchvision, which does not import beside this torch build. That file only needs torch.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import polyak
from polyak import GlobalStep

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# ---------------------------------------------------------------------------- contenders


def load_timm_model_ema():
    """timm's ``utils/model_ema.py`` as a standalone module (without importing ``timm``)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("timm is not installed: pip install --no-deps timm (see the Makefile)")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    mod_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


class Contender:
    """A named update callable, and how to read its shadows (in ``model.parameters()`` order)."""

    def __init__(
        self,
        name: str,
        update: Callable[[], None],
        shadows: Callable[[], list[torch.Tensor]] | None,
        model: str,
    ) -> None:
        self.name = name
        self.update = update
        self.shadows = shadows  # None: not an EMA (the roofline)
        self.model = model  # "as is" or "flat": which online model it reads
        self.calls = 0  # calls after the weights were moved

    def __call__(self) -> None:
        self.update()
        self.calls += 1


def build_contenders(model: nn.Module, flat: nn.Module, decay: float, timm_ema) -> list[Contender]:
    from ema_pytorch import EMA
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torch_ema import ExponentialMovingAverage as TorchEMA

    out: list[Contender] = []

    ema = polyak.ExponentialMovingAverage(decay)
    ema.track(model)
    params = list(model.parameters())
    out.append(Contender("polyak", ema.update, lambda: [ema.average(p) for p in params], "as is"))

    ema_f = polyak.ExponentialMovingAverage(decay)
    ema_f.track(flat)
    fparams = list(flat.parameters())
    out.append(
        Contender(
            "polyak (flat)", ema_f.update, lambda: [ema_f.average(p) for p in fparams], "flat"
        )
    )

    ema_g = polyak.ExponentialMovingAverage(decay, num_updates=GlobalStep(10**6))
    ema_g.track(flat)
    if float(ema_g.decay) != float(ema_f.decay):
        raise AssertionError(f"GlobalStep decay {ema_g.decay} != {ema_f.decay}")
    out.append(
        Contender(
            "polyak (flat, GlobalStep)",
            ema_g.update,
            lambda: [ema_g.average(p) for p in fparams],
            "flat",
        )
    )

    v3 = timm_ema.ModelEmaV3(model, decay=decay)
    out.append(
        Contender(
            "timm ModelEmaV3",
            lambda: v3.update(model),
            lambda: list(v3.module.parameters()),
            "as is",
        )
    )

    epe = EMA(
        model,
        beta=decay,
        update_every=1,
        update_after_step=0,
        min_value=decay,  # warmup schedule clamped to [decay, decay]: constant decay
        use_foreach=True,
        include_online_model=False,
    )
    epe.update()  # step 0: initial copy
    epe.update()  # step 1: epoch 0 -> decay 0 (a copy); from step 2 on: decay = beta
    if abs(epe.get_current_decay() - decay) > 1e-7:  # it computes in float32
        raise AssertionError(f"ema-pytorch decay {epe.get_current_decay()} != {decay}")
    out.append(
        Contender("ema-pytorch", epe.update, lambda: list(epe.ema_model.parameters()), "as is")
    )

    tema = TorchEMA(model.parameters(), decay=decay, use_num_updates=False)
    out.append(Contender("torch-ema", tema.update, lambda: list(tema.shadow_params), "as is"))

    am = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    am.update_parameters(model)  # n_averaged == 0: a copy
    out.append(
        Contender(
            "AveragedModel",
            lambda: am.update_parameters(model),
            lambda: list(am.module.parameters()),
            "as is",
        )
    )

    n = sum(p.numel() for p in params)
    a = torch.randn(n)
    b = torch.randn(n)
    weight = 1.0 - decay
    out.append(Contender("lerp roofline", lambda: a.lerp_(b, weight), None, "-"))
    return out


# ---------------------------------------------------------------------------- models


class Critic(nn.Module):
    """The DDPG paper's critic for Pendulum: 3-400-300-1, the action joins at the 2nd layer."""

    def __init__(self, obs_dim: int = 3, action_dim: int = 1) -> None:
        super().__init__()
        self.l1 = nn.Linear(obs_dim, 400)
        self.l2 = nn.Linear(400 + action_dim, 300)
        self.l3 = nn.Linear(300, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(obs))
        h = torch.relu(self.l2(torch.cat([h, action], dim=-1)))
        return self.l3(h)


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width)]
    return nn.Sequential(*layers)


def models(quick: bool) -> list[tuple[str, Callable[[], nn.Module], bool]]:
    """(name, factory, is a target model)."""
    if quick:
        return [
            ("ddpg-critic", Critic, True),
            ("mlp-48x256", lambda: mlp(256, 48), True),
            ("mlp-8x1024", lambda: mlp(1024, 8), False),
        ]
    return [
        ("mlp-4x64", lambda: mlp(64, 4), False),
        ("ddpg-critic", Critic, True),
        ("mlp-8x256", lambda: mlp(256, 8), False),
        ("mlp-48x256", lambda: mlp(256, 48), True),
        ("mlp-8x1024", lambda: mlp(1024, 8), False),
        ("mlp-8x2048", lambda: mlp(2048, 8), False),
        ("mlp-8x3584", lambda: mlp(3584, 8), False),  # 102.8M parameters, 411 MB per copy
    ]


# ---------------------------------------------------------------------------- timing


VERIFY_CALLS = 20  # untimed calls of the strict equivalence check


def time_batch(c: Contender, inner: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(inner):
        c()
    return (time.perf_counter_ns() - t0) / inner / 1e3  # microseconds per update


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_model(
    name: str,
    factory: Callable[[], nn.Module],
    decay: float,
    timm_ema,
    batch_s: float,
    model_s: float,
    min_rounds: int,
    max_rounds: int,
) -> dict:
    torch.manual_seed(0)
    model = factory()
    for p in model.parameters():
        p.requires_grad_(True)
    flat = polyak.flatten_parameters_(copy.deepcopy(model))
    contenders = build_contenders(model, flat, decay, timm_ema)
    m0 = [p.detach().clone() for p in model.parameters()]
    # Move the weights: every shadow (= m0) now has to travel towards m1.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p, q in zip(model.parameters(), flat.parameters()):
            p.add_(torch.randn(p.shape, generator=gen))
            q.copy_(p)
    m1 = [p.detach().clone() for p in model.parameters()]
    n_params = sum(t.numel() for t in m0)
    n_tensors = len(m0)

    # Calibrate: the batch size makes the slowest contender's batch about batch_s long.
    single = {}
    for c in contenders:
        c()
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter_ns()
            c()
            best = min(best, (time.perf_counter_ns() - t0) / 1e9)
        single[c.name] = best
    slowest = max(single.values())
    inner = max(1, min(1000, round(batch_s / slowest)))
    round_s = sum(single.values()) * inner
    rounds = max(min_rounds, min(max_rounds, int(model_s / max(round_s, 1e-9))))

    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    gc.collect()
    gc.disable()
    try:
        for c in contenders:  # one untimed warm-up batch each
            time_batch(c, inner)
        k = len(contenders)
        for r in range(rounds):
            for j in range(k):
                c = contenders[(r + j) % k]
                times[c.name].append(time_batch(c, inner))
    finally:
        gc.enable()

    # Equivalence, two checks (see the module docstring).
    calls = {c.calls for c in contenders}
    assert len(calls) == 1, f"{name}: contenders made different numbers of calls: {calls}"
    steps = calls.pop()
    scale = max(t.abs().max().item() for t in m0 + m1)
    ema_only = [c for c in contenders if c.shadows is not None]
    ref = next(c for c in contenders if c.name == "timm ModelEmaV3").shadows()
    # 1. After the timed runs: shadows agree with each other and with the closed form. Float32
    #    rounding accumulates over about 1/(1-decay) steps, hence the tolerance.
    dk = decay**steps
    exact = [(a1.double() + (a0.double() - a1.double()) * dk).float() for a0, a1 in zip(m0, m1)]
    loose = 8 * scale * torch.finfo(torch.float32).eps / (1 - decay)
    check: dict[str, dict] = {}
    for c in ema_only:
        shadows = c.shadows()
        assert len(shadows) == n_tensors, f"{name}/{c.name}: {len(shadows)} shadows"
        dev_exact = max((s - e).abs().max().item() for s, e in zip(shadows, exact))
        dev_ref = max((s - r_).abs().max().item() for s, r_ in zip(shadows, ref))
        check[c.name] = {
            "after_timing_dev_closed_form": dev_exact,
            "after_timing_dev_timm": dev_ref,
        }
        if max(dev_exact, dev_ref) > loose:
            raise AssertionError(
                f"{name}: {c.name} does not compute the same average after {steps} calls "
                f"(max |shadow - closed form| = {dev_exact:.2e}, max |shadow - timm| = "
                f"{dev_ref:.2e} > {loose:.2e})"
            )
    # 2. Strict: move the weights again and make VERIFY_CALLS more calls; one skipped call or
    #    another decay moves a shadow by about (1 - decay) * |weight move|, far above `strict`.
    start = {c.name: [t.clone() for t in c.shadows()] for c in ema_only}  # float32: exact
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p, q in zip(model.parameters(), flat.parameters()):
            p.add_(torch.randn(p.shape, generator=gen))
            q.copy_(p)
    m2 = [p.detach().clone() for p in model.parameters()]
    for c in ema_only:
        for _ in range(VERIFY_CALLS):
            c()
    dv = decay**VERIFY_CALLS
    strict = VERIFY_CALLS * scale * torch.finfo(torch.float32).eps
    skipped = (
        (1 - decay)
        * dv
        / decay
        * min((a - s).abs().max().item() for a, s in zip(m2, start["timm ModelEmaV3"]))
    )
    for c in ema_only:
        dev = max(
            (s.double() - (a.double() + (s0.double() - a.double()) * dv)).abs().max().item()
            for s, s0, a in zip(c.shadows(), start[c.name], m2)
        )
        check[c.name]["verify_calls"] = VERIFY_CALLS
        check[c.name]["verify_dev_closed_form"] = dev
        if dev > strict:
            raise AssertionError(
                f"{name}: {c.name}: {VERIFY_CALLS} calls after moving the weights do not give "
                f"the closed form (max dev {dev:.2e} > {strict:.2e}); one skipped call would "
                f"give about {skipped:.2e}"
            )
    del start, m2
    travelled = (1 - dk) * max((a1 - a0).abs().max().item() for a0, a1 in zip(m0, m1))

    timm_t = times["timm ModelEmaV3"]
    lerp_t = times["lerp roofline"]
    result = {
        "model": name,
        "params": n_params,
        "tensors": n_tensors,
        "inner": inner,
        "rounds": rounds,
        "decay": decay,
        "calls_per_contender": steps,
        "max_shadow_displacement": travelled,
        "check_tolerances": {"after_timing": loose, "verify": strict, "one_skipped_call": skipped},
        "contenders": {},
    }
    for c in contenders:
        t = times[c.name]
        result["contenders"][c.name] = {
            "median_us": median(t),
            "p25_us": quantile(t, 0.25),
            "p75_us": quantile(t, 0.75),
            "speedup_vs_timm": median([a / b for a, b in zip(timm_t, t)]),
            "time_vs_lerp": median([b / a for a, b in zip(lerp_t, t)]),
            "check": check.get(c.name),
        }
    del contenders, model, flat
    gc.collect()
    return result


# ---------------------------------------------------------------------------- report


TARGETS = {
    "polyak >= 1.5x timm (as is)": ("polyak", "speedup_vs_timm", ">=", 1.5),
    "polyak flat >= 3x timm": ("polyak (flat)", "speedup_vs_timm", ">=", 3.0),
    "polyak flat <= 1.15x lerp": ("polyak (flat)", "time_vs_lerp", "<=", 1.15),
}


def evaluate_targets(results: list[dict], target_models: set[str]) -> dict:
    out = {}
    for label, (who, key, op, bound) in TARGETS.items():
        for r in results:
            if r["model"] not in target_models:
                continue
            value = r["contenders"][who][key]
            ok = value >= bound if op == ">=" else value <= bound
            out[f"{label} [{r['model']}]"] = {"value": value, "met": ok}
    return out


def plot(results: list[dict], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted(results, key=lambda r: r["params"])
    names = list(rs[0]["contenders"])
    xs = [r["params"] for r in rs]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5))
    for n in names:
        style: dict = {"linestyle": "--", "color": "black"} if n == "lerp roofline" else {}
        if n.startswith("polyak"):
            style["linewidth"] = 2.2
        ys = [r["contenders"][n]["median_us"] for r in rs]
        ax.plot(xs, ys, marker="o", markersize=4, label=n, **style)
        rel = [r["contenders"][n]["time_vs_lerp"] for r in rs]
        bx.plot(xs, rel, marker="o", markersize=4, label=n, **style)
    for r in rs:
        bx.annotate(
            r["model"],
            (r["params"], 1.0),
            textcoords="offset points",
            xytext=(0, -14),
            fontsize=7,
            ha="center",
            rotation=-25,
        )
    ax.set_ylabel("median time per update (µs)")
    bx.set_ylabel("time per update / time of one lerp_ (same round)")
    bx.axhline(1.15, color="grey", linewidth=0.8, linestyle=":")
    for axis in (ax, bx):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters (fp32)")
        axis.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(
        f"EMA update, decay {rs[0].get('decay', '')}, CPU, torch {torch.__version__}, "
        f"{threads} thread(s): median over interleaved rounds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(report: dict) -> str:
    """The docs table: median µs per update and speed-up vs timm, per model and contender."""
    rs = sorted(report["results"], key=lambda r: r["params"])
    names = list(rs[0]["contenders"])
    lines = [
        "| contender | "
        + " | ".join(f"{r['model']} ({r['params'] / 1e6:.3g}M)" for r in rs)
        + " |",
        "|---|" + "---:|" * len(rs),
    ]
    for n in names:
        cells = []
        for r in rs:
            c = r["contenders"][n]
            cells.append(f"{c['median_us']:,.1f} µs ({c['speedup_vs_timm']:.2f}×)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append(
        "| rounds × updates per batch | "
        + " | ".join(f"{r['rounds']} × {r['inner']}" for r in rs)
        + " |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few models, short timings")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (all)")
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--models", nargs="*", help="only these models (by name)")
    parser.add_argument("--batch-ms", type=float, default=None, help="target batch length")
    parser.add_argument("--model-s", type=float, default=None, help="timing budget per model")
    parser.add_argument("--out", type=Path, default=RESULTS / "ema.json")
    parser.add_argument("--plot", type=Path, default=None, help="default: <out>.png")
    parser.add_argument(
        "--table", type=Path, help="print the Markdown table of a results file and exit"
    )
    args = parser.parse_args(argv)
    if args.table:
        report = json.loads(args.table.read_text())
        print(markdown_table(report))
        for label, t in report["targets"].items():
            print(f"- {'met' if t['met'] else '**missed**'}: {label}: {t['value']:.2f}")
        return 0

    torch.set_num_threads(args.threads)
    timm_ema = load_timm_model_ema()
    batch_s = (args.batch_ms or (3.0 if args.quick else 10.0)) / 1e3
    model_s = args.model_s or (4.0 if args.quick else 25.0)
    min_rounds, max_rounds = (5, 25) if args.quick else (15, 101)

    chosen = models(args.quick)
    if args.models:
        chosen = [m for m in models(False) + models(True) if m[0] in args.models]
        chosen = list({m[0]: m for m in chosen}.values())
    results = []
    for name, factory, is_target in chosen:
        t0 = time.perf_counter()
        # The target models get twice the budget and rounds: their ratios are the ones judged.
        k = 2 if is_target else 1
        r = run_model(
            name, factory, args.decay, timm_ema, batch_s, k * model_s, min_rounds, k * max_rounds
        )
        results.append(r)
        line = ", ".join(
            f"{n} {c['median_us']:.1f}us ({c['speedup_vs_timm']:.2f}x)"
            for n, c in r["contenders"].items()
        )
        worst = max(
            c["check"]["verify_dev_closed_form"] for c in r["contenders"].values() if c["check"]
        )
        print(
            f"{name} [{r['params']:,} params, {r['tensors']} tensors, {r['rounds']}x"
            f"{r['inner']}, {time.perf_counter() - t0:.0f}s, max dev {worst:.1e}]: "
            f"{line}",
            flush=True,
        )

    targets = evaluate_targets(results, {n for n, _, t in chosen if t})
    for label, t in targets.items():
        print(f"  {'MET ' if t['met'] else 'MISS'} {label}: {t['value']:.3f}")

    cmd = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "main()"
    report = {
        "command": cmd,
        "machine": {
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "versions": {
            "polyak": polyak.__version__,
            "timm": package_version("timm"),
            "ema-pytorch": package_version("ema-pytorch"),
            "torch-ema": package_version("torch-ema"),
        },
        "decay": args.decay,
        "quick": args.quick,
        "results": results,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot_path = args.plot or args.out.with_suffix(".png")
    plot(results, plot_path, torch.get_num_threads())
    print(f"wrote {args.out} and {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
