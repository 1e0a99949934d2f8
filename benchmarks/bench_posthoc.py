"""Post-hoc EMA and several averages in one pass: polyak against ema-pytorch, and against the
memory roofline.

    python benchmarks/bench_posthoc.py            # full run: results/posthoc.json
    python benchmarks/bench_posthoc.py --quick    # smoke run (small models, short timings)

Three measurements (docs/performance.md, "Post-hoc EMA"):

1. ``PostHocEMA.update()``: polyak (model as is, and flattened with ``flatten_parameters_``)
   against ema-pytorch's ``PostHocEMA.update()``, both tracking sigma_rel 0.05 and 0.10 and
   averaging at every call (ema-pytorch: ``update_every=1``, its default is 100; no snapshots
   while timing). Models: the 24-block MLP of bench_ema.py (``mlp(256, 24)``, 1.6 M
   parameters, 96 tensors) and ``mlp(3584, 8)`` (103 M parameters). Timed in the same rounds,
   as probes: ema-pytorch's own ``lerp_`` calls without its per-call Python (one foreach per
   average over its tensors), and one ``lerp_`` over the model's weights (the bandwidth).
   Each contender's bytes per parameter and call and its effective bandwidth are reported.
2. K = 1, 2, 3 averages of a flattened model: one ``EMAGroup`` pass and one ``PostHocEMA`` pass
   against K ``ExponentialMovingAverage.update()`` calls, and against the roofline
   ``(4 + 8K)`` bytes per parameter: at the bandwidth of one ``lerp_`` of the model's weights
   into a spare buffer (12 bytes per element) measured in the same rounds, and relative to the
   same code's K = 1 time.
3. Synthesis quality on one trajectory (examples/ema_demo.py's regression, SGD at lr 0.05):
   each library tracks sigma_rel 0.05 and 0.10 with snapshots every 100 steps, then
   synthesizes other sigma_rels at the last step; the reference is the exact power-function
   average of that sigma_rel, summed in float64 from the stored trajectory. Error: RMS of
   (synthesized - exact) over the RMS of (exact - last weights).

Timing: contenders in ABBA order (each round reverses the one before; each pair of rounds
starts one contender further on), each timing a batch of consecutive calls; medians over
rounds; ratios are medians of per-round ratios; ``gc`` off.
Before timing, every contender's averages are checked against the float64 closed form.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_ema import median, mlp, package_version, quantile  # noqa: E402

sys.path.insert(0, str(HERE.parent / "examples"))
from ema_demo import regression_task  # noqa: E402

import polyak  # noqa: E402
from polyak.averaging import EMAGroup  # noqa: E402
from polyak.flat import coalesce  # noqa: E402

RESULTS = HERE / "results"
SIGMA_RELS = (0.05, 0.10)


def timed_rounds(
    contenders: dict[str, Callable[[], None]], batch_s: float, budget_s: float, rounds: tuple
) -> tuple[dict[str, list[float]], int, int]:
    """Median-friendly timings: {name: [seconds per call, one per round]}, inner, rounds.

    ABBA order: odd rounds run the contenders in the reverse order of the round before, and
    each pair of rounds starts one contender further on, so that no contender always runs
    first, last, or right after the same neighbour (a slow one leaves caches and memory
    controllers in another state)."""
    single = {}
    for name, f in contenders.items():
        f()
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter_ns()
            f()
            best = min(best, (time.perf_counter_ns() - t0) / 1e9)
        single[name] = best
    inner = max(1, min(200, round(batch_s / max(single.values()))))
    n = max(rounds[0], min(rounds[1], int(budget_s / (sum(single.values()) * inner))))
    n += n % 2  # whole ABBA pairs
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    gc.collect()
    gc.disable()
    try:
        for r in range(n):
            shift = (r // 2) % len(names)
            order = names[shift:] + names[:shift]
            for name in order[::-1] if r % 2 else order:
                f = contenders[name]
                t0 = time.perf_counter_ns()
                for _ in range(inner):
                    f()
                times[name].append((time.perf_counter_ns() - t0) / 1e9 / inner)
    finally:
        gc.enable()
    return times, inner, n


def summary(times: dict[str, list[float]], base: str) -> dict[str, dict]:
    ref = times[base]
    return {
        name: {
            "median_ms": median(t) * 1e3,
            "p25_ms": quantile(t, 0.25) * 1e3,
            "p75_ms": quantile(t, 0.75) * 1e3,
            f"time_vs_{base}": median([b / a for a, b in zip(ref, t)]),
        }
        for name, t in times.items()
    }


def move_weights(model: nn.Module, seed: int) -> None:
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def check_power_average(
    name: str, shadows: list[torch.Tensor], history, gamma: float, shift: int = 0
) -> float:
    """Max |shadow - closed form| over the parameters, the closed form summed in float64 from
    ``history`` (the parameters after each call): call ``tau`` carries
    ``((tau + s) / (n + s))^(g+1) - ((tau - 1 + s) / (n + s))^(g+1)``, call 1 everything below.
    ``s = 0`` is EDM2's profile; ema-pytorch's counter runs one ahead (``s = 1``)."""
    n = len(history)
    worst = 0.0
    for i, shadow in enumerate(shadows):
        exact = sum(
            (((tau + shift) / (n + shift)) ** (gamma + 1))
            * (h[i] - (history[tau][i] if tau < n else 0))
            for tau, h in enumerate(history, start=1)
        )
        worst = max(worst, (shadow.double() - exact).abs().max().item())
    if worst > 1e-5:
        raise AssertionError(f"{name}: averages off the closed form by {worst:.2e}")
    return worst


def weights_span(flat_model: nn.Module) -> torch.Tensor:
    """The one contiguous buffer that ``flatten_parameters_`` made of the model's weights."""
    (spans,) = coalesce([p.detach() for p in flat_model.parameters()])
    assert len(spans) == 1, "expected a flattened model of one dtype"
    return spans[0]


def lerp_probe(flat_model: nn.Module) -> Callable[[], None]:
    """One ``lerp_`` of the model's own weights into a spare buffer: 12 bytes per float32
    parameter, the memory traffic of one average, at the bandwidth these very pages get."""
    span = weights_span(flat_model)
    spare = span.clone()
    return lambda: spare.lerp_(span, 0.001)


# ---------------------------------------------------------------------------- 1. update speed


def bench_update(name: str, factory, batch_s: float, budget_s: float, rounds: tuple) -> dict:
    from ema_pytorch import PostHocEMA as EmaPytorchPostHoc

    torch.manual_seed(0)
    model = factory()
    flat = polyak.flatten_parameters_(copy.deepcopy(model))
    folder = tempfile.mkdtemp(prefix="ema_pytorch_posthoc_")
    contenders = {
        "ema-pytorch PostHocEMA": EmaPytorchPostHoc(
            model,
            sigma_rels=SIGMA_RELS,
            update_every=1,
            checkpoint_every_num_steps="manual",
            checkpoint_folder=folder,
        ),
        "polyak PostHocEMA": polyak.PostHocEMA(model, sigma_rels=SIGMA_RELS),
        "polyak PostHocEMA (flat)": polyak.PostHocEMA(flat, sigma_rels=SIGMA_RELS),
    }
    # Correctness first: three calls on moving weights, against the float64 closed form.
    history = []
    for step in range(3):
        move_weights(model, step)
        with torch.no_grad():
            for p, q in zip(model.parameters(), flat.parameters()):
                q.copy_(p)
        history.append([p.detach().double().clone() for p in model.parameters()])
        for c in contenders.values():
            c.update()
    dev = {}
    gammas = [polyak.schedules.sigma_rel_to_gamma(s) for s in SIGMA_RELS]
    for k, gamma in enumerate(gammas):
        ours = list(contenders["polyak PostHocEMA"].average(k).values())
        flat_ours = list(contenders["polyak PostHocEMA (flat)"].average(k).values())
        theirs = list(contenders["ema-pytorch PostHocEMA"].ema_models[k].ema_model.parameters())
        g = f"gamma {gamma:.2f}"
        dev[f"polyak {g}"] = check_power_average("polyak", ours, history, gamma)
        dev[f"polyak (flat) {g}"] = check_power_average("flat", flat_ours, history, gamma)
        dev[f"ema-pytorch {g}"] = check_power_average("ema-pytorch", theirs, history, gamma, 1)
    # Probes timed in the same rounds: ema-pytorch's own lerp_ calls without its per-call
    # bookkeeping (the same kernels on the same tensors, one foreach per average), and the
    # bandwidth of one lerp_ over the model's weights.
    theirs_params = [
        [p.detach() for p in e.ema_model.parameters()]
        for e in contenders["ema-pytorch PostHocEMA"].ema_models
    ]
    online = [p.detach() for p in model.parameters()]

    def their_lerps_alone(weights=(0.001, 0.002)):
        for shadows, w in zip(theirs_params, weights):
            torch._foreach_lerp_(shadows, online, w)

    probes = {
        "ema-pytorch's lerp_ calls alone": their_lerps_alone,
        "lerp_ probe (12 B/param)": lerp_probe(flat),
    }
    calls = {k: c.update for k, c in contenders.items()} | probes
    times, inner, n = timed_rounds(calls, batch_s, budget_s, rounds)
    n_params = sum(p.numel() for p in model.parameters())
    k = len(SIGMA_RELS)
    # Bytes each moves per float32 parameter and call: a lerp_ reads the weight and the
    # shadow and writes the shadow (12 B); one pass reads the weight once (4 + 8K).
    traffic = {
        "ema-pytorch PostHocEMA": 12 * k,
        "polyak PostHocEMA": 4 + 8 * k,
        "polyak PostHocEMA (flat)": 4 + 8 * k,
        "ema-pytorch's lerp_ calls alone": 12 * k,
        "lerp_ probe (12 B/param)": 12,
    }
    table = summary(times, "ema-pytorch PostHocEMA")
    for label, c in table.items():
        c["speedup_vs_ema_pytorch"] = 1 / c.pop("time_vs_ema-pytorch PostHocEMA")
        c["bytes_per_param"] = traffic[label]
        c["GBps"] = traffic[label] * n_params / (c["median_ms"] / 1e3) / 1e9
    result = {
        "model": name,
        "params": n_params,
        "tensors": len(list(model.parameters())),
        "inner": inner,
        "rounds": n,
        "check_max_dev_closed_form": dev,
        "contenders": {label: table[label] for label in contenders},
        "probes": {label: table[label] for label in probes},
        "bytes_ratio_ceiling": traffic["ema-pytorch PostHocEMA"] / traffic["polyak PostHocEMA"],
    }
    del contenders, model, flat
    gc.collect()
    return result


# ---------------------------------------------------------------------------- 2. K in one pass


def bench_k_averages(name: str, factory, batch_s: float, budget_s: float, rounds: tuple) -> dict:
    torch.manual_seed(0)
    model = polyak.flatten_parameters_(factory())
    n_params = sum(p.numel() for p in model.parameters())
    decays = (0.999, 0.9999, 0.99999)
    sigmas = (0.05, 0.10, 0.20)
    contenders: dict[str, Callable[[], None]] = {}
    # The roofline's bandwidth: one lerp_ of the model's own weights into a spare buffer (the
    # pages the contenders read); lerp_ and copy_ between two fresh buffers for comparison.
    span = weights_span(model)
    spare = span.clone()
    a, b = torch.randn(n_params), torch.randn(n_params)
    contenders["lerp_ (N elements)"] = lerp_probe(model)
    contenders["copy_ (N elements)"] = lambda: spare.copy_(span)
    contenders["lerp_, fresh buffers"] = lambda: a.lerp_(b, 0.001)
    keep = []
    for k in (1, 2, 3):
        separate = [polyak.ExponentialMovingAverage(d) for d in decays[:k]]
        grouped = [polyak.ExponentialMovingAverage(d) for d in decays[:k]]
        for ema in separate + grouped:
            ema.track(model)
        group = EMAGroup(*grouped)
        ph = polyak.PostHocEMA(model, sigma_rels=sigmas[:k])
        keep += [separate, group, ph]

        def one_by_one(emas=separate):
            for ema in emas:
                ema.update()

        contenders[f"K={k} separate EMAs"] = one_by_one
        contenders[f"K={k} EMAGroup"] = group.update
        contenders[f"K={k} PostHocEMA"] = ph.update
    move_weights(model, 0)
    times, inner, n = timed_rounds(contenders, batch_s, budget_s, rounds)
    lerp = times["lerp_ (N elements)"]
    result = {
        "model": name,
        "params": n_params,
        "inner": inner,
        "rounds": n,
        "lerp_bandwidth_GBps": 12 * n_params / median(lerp) / 1e9,
        "copy_bandwidth_GBps": 8 * n_params / median(times["copy_ (N elements)"]) / 1e9,
        "lerp_fresh_buffers_GBps": 12 * n_params / median(times["lerp_, fresh buffers"]) / 1e9,
        "contenders": summary(times, "lerp_ (N elements)"),
    }
    # Two rooflines: (4 + 8K) / 12 times the lerp_ probe, and (4 + 8K) / 12 times the same
    # code's K = 1 time (which holds any per-call cost the probe lacks).
    for label, c in result["contenders"].items():
        if label.startswith("K="):
            k = int(label[2])
            c["time_vs_roofline"] = c["time_vs_lerp_ (N elements)"] * 12 / (4 + 8 * k)
            k1 = times["K=1" + label[3:]]
            ratios = [t / t1 for t, t1 in zip(times[label], k1)]
            c["time_vs_k1_roofline"] = median(ratios) * 12 / (4 + 8 * k)
    # The grouped and the separate EMAs took the same number of calls: same bits.
    for separate, group, _ in zip(keep[0::3], keep[1::3], keep[2::3]):
        for e1, e2 in zip(separate, group.emas):
            if e1.step == e2.step:
                for p in model.parameters():
                    assert torch.equal(e1.average(p), e2.average(p))
    return result


# ---------------------------------------------------------------------------- 3. synthesis


def bench_synthesis(steps: int, every: int) -> dict:
    from ema_pytorch import PostHocEMA as EmaPytorchPostHoc

    targets = (0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.17, 0.2, 0.25)
    root = Path(tempfile.mkdtemp(prefix="posthoc_quality_"))
    model, train_step, _ = regression_task(lr=0.05)
    setups = {
        "polyak": polyak.PostHocEMA(
            model, sigma_rels=SIGMA_RELS, snapshot_every=every, snapshot_dir=root / "polyak"
        ),
        "ema-pytorch (update_every=1, float32)": EmaPytorchPostHoc(
            model,
            sigma_rels=SIGMA_RELS,
            update_every=1,
            checkpoint_every_num_steps=every,
            checkpoint_folder=str(root / "ep1"),
            checkpoint_dtype=torch.float32,
        ),
        "ema-pytorch (defaults: update_every=100, float16)": EmaPytorchPostHoc(
            model,
            sigma_rels=SIGMA_RELS,
            checkpoint_every_num_steps=every,
            checkpoint_folder=str(root / "ep100"),
        ),
    }
    trajectory: list[torch.Tensor] = []
    for _ in range(steps):
        train_step()
        trajectory.append(torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]))
        for s in setups.values():
            s.update()
    last = trajectory[-1]
    thetas = torch.stack(trajectory)
    out: dict[str, dict] = {name: {} for name in setups}
    for sigma in targets:
        gamma = polyak.schedules.sigma_rel_to_gamma(sigma)
        tau = torch.arange(1, steps + 1, dtype=torch.float64)
        w = (tau / steps) ** (gamma + 1) - ((tau - 1) / steps) ** (gamma + 1)
        exact = w @ thetas
        scale = (exact - last).square().mean().sqrt().item()
        for name, s in setups.items():
            if name == "polyak":
                sd = s.synthesize(sigma_rel=sigma, max_error=None)
                flat = torch.cat([sd[n].reshape(-1).double() for n, _ in model.named_parameters()])
            else:
                synth = s.synthesize_ema_model(sigma_rel=sigma, step=steps)
                flat = torch.cat(
                    [p.detach().reshape(-1).double() for p in synth.ema_model.parameters()]
                )
            err = (flat - exact).square().mean().sqrt().item() / scale
            out[name][str(sigma)] = err
    return {
        "steps": steps,
        "snapshot_every": every,
        "tracked_sigma_rels": SIGMA_RELS,
        "relative_rms_error": out,
    }


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "posthoc.json")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["update", "k_averages", "synthesis"],
        default=["update", "k_averages", "synthesis"],
        help="run only these (the others are kept from an existing --out file)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        models = [("mlp-24x256", lambda: mlp(256, 24)), ("mlp-8x1024", lambda: mlp(1024, 8))]
        batch_s, budget_s, rounds, steps = 0.02, 3.0, (5, 15), 1000
    else:
        models = [("mlp-24x256", lambda: mlp(256, 24)), ("mlp-8x3584", lambda: mlp(3584, 8))]
        batch_s, budget_s, rounds, steps = 0.2, 60.0, (22, 62), 4000
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "main()",
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
        "versions": {"polyak": polyak.__version__, "ema-pytorch": package_version("ema-pytorch")},
        "update": [],
        "k_averages": [],
    }
    if set(args.parts) != {"update", "k_averages", "synthesis"} and args.out.exists():
        kept = json.loads(args.out.read_text())
        for part in {"update", "k_averages", "synthesis"} - set(args.parts):
            report[part] = kept.get(part)
        suffix = "_" + "_".join(args.parts)  # where this partial run's own details go
        report["command" + suffix] = report.pop("command")
        report["machine" + suffix] = report.pop("machine")
        report = {**kept, **report}
    for name, factory in models if "update" in args.parts else []:
        t0 = time.perf_counter()
        r = bench_update(name, factory, batch_s, budget_s, rounds)
        report["update"].append(r)
        print(
            f"update {name} [{r['params']:,} params, {r['rounds']}x{r['inner']}, "
            f"{time.perf_counter() - t0:.0f}s]: "
            + ", ".join(
                f"{k} {c['median_ms']:.2f}ms ({c['speedup_vs_ema_pytorch']:.2f}x, "
                f"{c['GBps']:.1f} GB/s)"
                for k, c in (r["contenders"] | r["probes"]).items()
            ),
            flush=True,
        )
    for name, factory in models if "k_averages" in args.parts else []:
        t0 = time.perf_counter()
        r = bench_k_averages(name, factory, batch_s, budget_s, rounds)
        report["k_averages"].append(r)
        print(
            f"K averages {name} [lerp {r['lerp_bandwidth_GBps']:.1f} GB/s, copy "
            f"{r['copy_bandwidth_GBps']:.1f} GB/s, {time.perf_counter() - t0:.0f}s]: "
            + ", ".join(
                f"{k} {c['median_ms']:.2f}ms ({c['time_vs_roofline']:.2f}x roofline, "
                f"{c['time_vs_k1_roofline']:.2f}x from K=1)"
                for k, c in r["contenders"].items()
                if "time_vs_roofline" in c
            ),
            flush=True,
        )
    if "synthesis" in args.parts:
        t0 = time.perf_counter()
        report["synthesis"] = bench_synthesis(steps, steps // 40)
        print(f"synthesis [{time.perf_counter() - t0:.0f}s]:", flush=True)
        for name, errs in report["synthesis"]["relative_rms_error"].items():
            print(f"  {name}: " + ", ".join(f"{s}: {e:.2e}" for s, e in errs.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
