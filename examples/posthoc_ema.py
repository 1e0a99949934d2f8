"""Post-hoc EMA: pick the averaging length after training, from one run.

Trains examples/ema_demo.py's noisy regression once while PostHocEMA tracks sigma_rel 0.05 and
0.10 with a snapshot every 100 steps, then synthesizes the EMA of 43 other lengths from the
snapshots alone and plots their test loss. Three more lengths are tracked directly during the
same run, to show that the synthesized ones land on them.

Run: python examples/posthoc_ema.py [--steps 4000] [--out docs/posthoc_sigma_rel.png]
"""

import argparse
import math
import tempfile
from pathlib import Path

import torch
from ema_demo import regression_task

import polyak
from polyak.averaging.posthoc import synthesize_directory

TRACKED = (0.05, 0.10)
CHECKS = (0.02, 0.17, 0.25)  # tracked directly as well, never used for synthesis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=None, help="write the plot here (PNG)")
    args = parser.parse_args()

    model, train_step, test_loss = regression_task()
    snapshots = Path(tempfile.mkdtemp(prefix="posthoc_"))
    ph = polyak.PostHocEMA(
        model, sigma_rels=TRACKED, snapshot_every=args.steps // 40, snapshot_dir=snapshots
    )
    direct = polyak.PostHocEMA(model, sigma_rels=CHECKS)
    for _ in range(args.steps):
        train_step()
        ph.update()
        direct.update()
    raw = test_loss(model)

    # After training, from the snapshot directory alone (what `polyak posthoc` does).
    grid = torch.linspace(math.log(0.01), math.log(0.28), 40).tolist()
    sigmas = sorted({*(math.exp(x) for x in grid), *CHECKS})
    synthesized = []
    for s in sigmas:
        state, rec = synthesize_directory(snapshots, sigma_rel=s, max_error=None)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])
        synthesized.append((s, test_loss(model), rec.profile_error))
    tracked = []
    for s in TRACKED:
        with ph.synthesized_parameters(model, sigma_rel=s):  # exactly the tracked average
            tracked.append((s, test_loss(model)))
    checks = []
    for k, s in enumerate(CHECKS):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(direct.average(k)[name])
        checks.append((s, test_loss(model)))

    best = min(synthesized, key=lambda r: r[1])
    print(f"raw weights after {args.steps} steps: test MSE {raw:.4f}")
    for s, loss in tracked:
        print(f"tracked sigma_rel {s:.3f}: test MSE {loss:.4f}")
    for s, loss in checks:
        synth = next(r[1] for r in synthesized if r[0] == s)
        print(f"tracked directly sigma_rel {s:.3f}: {loss:.4f} (synthesized: {synth:.4f})")
    print(f"best synthesized: sigma_rel {best[0]:.3f}, test MSE {best[1]:.4f}")
    if args.out:
        plot(args, synthesized, tracked, checks, raw)


def plot(args, synthesized, tracked, checks, raw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    reach = [r for r in synthesized if r[2] <= 0.05]
    far = [r for r in synthesized if r[2] > 0.05]
    ax.plot(
        [r[0] for r in reach],
        [r[1] for r in reach],
        "-",
        color="tab:blue",
        lw=2,
        label="synthesized after training (profile error <= 5%)",
    )
    if far:
        for side in (
            [r for r in far if r[0] < reach[0][0]],
            [r for r in far if r[0] > reach[-1][0]],
        ):
            if side:
                edge = reach[0] if side[0][0] < reach[0][0] else reach[-1]
                pts = sorted([*side, edge])
                ax.plot([r[0] for r in pts], [r[1] for r in pts], ":", color="tab:blue", lw=1.5)
        ax.plot(
            [], [], ":", color="tab:blue", label="synthesized, out of reach (refused by default)"
        )
    ax.plot(
        [s for s, _ in tracked],
        [v for _, v in tracked],
        "o",
        ms=10,
        color="tab:orange",
        label="tracked during training (snapshots)",
    )
    ax.plot(
        [s for s, _ in checks],
        [v for _, v in checks],
        "x",
        ms=10,
        mew=2.5,
        color="black",
        label="tracked directly too (check, not used)",
    )
    ax.axhline(raw, color="grey", ls="--", lw=1, label=f"raw final weights ({raw:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sigma_rel (EMA length relative to training time)")
    ax.set_ylabel("test MSE")
    ax.set_title(
        f"One SGD run ({args.steps} steps), {len(synthesized)} EMA lengths synthesized post hoc",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
