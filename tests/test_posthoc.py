"""Post-hoc EMA (EDM2): the power-function update, the least squares, synthesis, snapshots,
resume after SIGKILL, the CLI, and the errors."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polyak
from polyak import PostHocEMA, schedules
from polyak.averaging.posthoc import (
    power_weight,
    profile_inner_product,
    solve_coefficients,
    synthesize_directory,
)
from polyak.cli import main as cli_main

SRC = Path(polyak.__file__).resolve().parents[1]


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


def walk(model: nn.Module, steps: int, seed: int = 1, scale: float = 0.1):
    """Random-walk the parameters (and touch the buffers) one step at a time; yields the
    parameters (float64 copies) after each step."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
            for b in model.buffers():
                b.add_(1)
        yield {n: p.detach().double().clone() for n, p in model.named_parameters()}


def closed_form(trajectory, gamma: float, every: int = 1) -> dict[str, torch.Tensor]:
    """The power-function average after len(trajectory) calls: the weights of call tau (an
    update call) carry (tau^(g+1) - (tau-every)^(g+1)) / T^(g+1), T the last update call."""
    last = len(trajectory) // every * every
    total = {}
    for tau in range(every, last + 1, every):
        w = (tau ** (gamma + 1) - (tau - every) ** (gamma + 1)) / last ** (gamma + 1)
        for n, v in trajectory[tau - 1].items():
            total[n] = total.get(n, 0) + w * v
    return total


def max_dev(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n].double() - b[n].double()).abs().max().item() for n in b)


# --------------------------------------------------------------------------- the update


@pytest.mark.parametrize("every", [1, 3])
def test_update_is_the_power_function_ema_in_closed_form(every):
    model = small_model()
    ph = PostHocEMA(model, sigma_rels=(0.05, 0.10, 0.2), update_every=every)
    trajectory = []
    for params in walk(model, 61):
        trajectory.append(params)
        ph.update()
    assert ph.step == 61
    for k, gamma in enumerate(ph.gammas):
        expected = closed_form(trajectory, gamma, every)
        got = ph.average(k)
        # float32 rounding of 20 lerps on values of size ~1
        assert max_dev(got, expected) < 2e-6, (k, max_dev(got, expected))


def test_update_matches_an_ema_with_the_power_function_schedule():
    """polyak.schedules.power_function(gamma) in an ExponentialMovingAverage is the same average
    (up to its float32 decay, TF's rounding)."""
    model = small_model()
    ph = PostHocEMA(model, gammas=(6.94,))
    ema = polyak.ExponentialMovingAverage(schedules.power_function(6.94))
    ema.track(model)
    for _ in walk(model, 40):
        ph.update()
        ema.update()
    for name, avg in ph.average(0).items():
        assert torch.allclose(avg, ema.average(name), rtol=0, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(
    gamma=st.floats(0.05, 80.0),
    t=st.integers(2, 10**9),
    every=st.sampled_from([1, 2, 7]),
)
def test_power_weight_against_high_precision(gamma, t, every):
    t = max(t // every, 2) * every
    mpmath.mp.dps = 40
    exact = 1 - (1 - mpmath.mpf(every) / t) ** (mpmath.mpf(gamma) + 1)
    assert power_weight(t, gamma, every) == pytest.approx(float(exact), rel=1e-13)
    assert power_weight(every, gamma, every) == 1.0


@settings(max_examples=50, deadline=None)
@given(sigma_rel=st.floats(0.001, 0.288))
def test_sigma_rel_gamma_conversions(sigma_rel):
    gamma = schedules.sigma_rel_to_gamma(sigma_rel)
    mpmath.mp.dps = 40
    t = mpmath.mpf(sigma_rel) ** -2
    roots = mpmath.polyroots([1, 7, 16 - t, 12 - t], maxsteps=200, extraprec=200)
    largest = max(mpmath.re(r) for r in roots if abs(mpmath.im(r)) < 1e-20)
    assert gamma == pytest.approx(float(largest), rel=1e-12)
    assert schedules.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(exponent=st.floats(60.0, 307.0))
def test_conversions_at_extreme_widths_against_high_precision(exponent):
    """gamma 1e60 to 1e307 and the sigma_rel of each: gamma_to_sigma_rel gave 0.0 from
    gamma 5.6e102 (an overflowing product) and OverflowError from 1e154, sigma_rel_to_gamma
    OverflowError below sigma_rel 1.5e-154."""
    gamma = 10.0**exponent
    mpmath.mp.dps = 700
    g = mpmath.mpf(gamma)
    exact = mpmath.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    sigma_rel = schedules.gamma_to_sigma_rel(gamma)
    assert sigma_rel == pytest.approx(float(exact), rel=1e-14)
    assert schedules.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, rel=1e-14)
    with pytest.raises(ValueError, match="not a finite float"):
        schedules.sigma_rel_to_gamma(5e-324)


def test_edm2_pairs():
    assert schedules.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert schedules.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for bad in (0.0, -0.1, 0.2887, 1.0):
        with pytest.raises(ValueError, match="sigma_rel must be in"):
            schedules.sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="gamma must be"):
        schedules.gamma_to_sigma_rel(0.0)


# --------------------------------------------------------------------------- the least squares


def quad_inner(t_a, g_a, t_b, g_b) -> mpmath.mpf:
    """<p_a, p_b> by numerical quadrature of the profiles (independent of the closed form)."""

    def p(s, t, g):
        return (g + 1) * s**g / t ** (g + 1) if s <= t else mpmath.mpf(0)

    lo, hi = sorted((mpmath.mpf(t_a), mpmath.mpf(t_b)))
    return mpmath.quad(lambda s: p(s, t_a, g_a) * p(s, t_b, g_b), [0, lo, hi])


@pytest.mark.parametrize(
    "t_a,g_a,t_b,g_b", [(100, 6.94, 100, 16.97), (40, 6.94, 100, 16.97), (100, 3.0, 7, 0.5)]
)
def test_profile_inner_product_against_quadrature(t_a, g_a, t_b, g_b):
    mpmath.mp.dps = 30
    exact = float(quad_inner(t_a, mpmath.mpf(g_a), t_b, mpmath.mpf(g_b)))
    assert profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(exact, rel=1e-12)
    assert profile_inner_product(t_b, g_b, t_a, g_a) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("target_sigma", [0.03, 0.07, 0.15])
def test_least_squares_weights_against_quadrature_and_high_precision_solve(target_sigma):
    """Algorithm 3 with the Gram matrix from numerical quadrature, solved at 30 digits."""
    mpmath.mp.dps = 30
    gammas = [schedules.sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    steps = [s for s in (300, 600, 1000) for _ in gammas]
    gs = gammas * 3
    target = schedules.sigma_rel_to_gamma(target_sigma)
    n = len(steps)
    a = mpmath.matrix(n, n)
    b = mpmath.matrix(n, 1)
    for i in range(n):
        b[i] = quad_inner(steps[i], mpmath.mpf(gs[i]), 1000, mpmath.mpf(target))
        for j in range(n):
            a[i, j] = quad_inner(steps[i], mpmath.mpf(gs[i]), steps[j], mpmath.mpf(gs[j]))
    x = mpmath.lu_solve(a, b)
    x = [x[i] / sum(x) for i in range(n)]
    got, err = solve_coefficients(steps, gs, 1000, target)
    scale = max(abs(float(v)) for v in x)
    for g_, e_ in zip(got, x):
        assert g_ == pytest.approx(float(e_), abs=1e-9 * scale)
    # The profile error, also by quadrature: ||sum x_i p_i - p||^2 / ||p||^2.
    c = quad_inner(1000, mpmath.mpf(target), 1000, mpmath.mpf(target))
    xv = mpmath.matrix(x)
    resid = (xv.T * a * xv)[0] - 2 * (xv.T * b)[0] + c
    assert err == pytest.approx(float(mpmath.sqrt(max(resid, 0) / c)), rel=1e-4, abs=1e-7)


def test_a_tracked_target_has_coefficient_one():
    gammas = [schedules.sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    steps = [s for s in (100, 200, 300) for _ in gammas]
    x, err = solve_coefficients(steps, gammas * 3, 300, gammas[1])
    assert x[-1] == pytest.approx(1.0, abs=1e-10)
    assert sum(abs(v) for v in x[:-1]) < 1e-10
    assert err < 1e-6


# --------------------------------------------------------------------------- synthesis


def run(model, ph, steps, seed=1):
    trajectory = []
    for params in walk(model, steps, seed):
        trajectory.append(params)
        ph.update()
    return trajectory


def test_synthesis_of_a_tracked_average_returns_it(tmp_path):
    model = small_model()
    ph = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=10, snapshot_dir=tmp_path)
    run(model, ph, 100)
    for k, sigma in enumerate(ph.sigma_rels):
        got = ph.synthesize(sigma_rel=sigma)
        assert max_dev(got, ph.average(k)) < 1e-9
        from_files, rec = synthesize_directory(tmp_path, sigma_rel=sigma)
        assert max_dev(from_files, ph.average(k)) < 1e-9
        assert rec.profile_error < 1e-6
        at_50 = ph.synthesize(sigma_rel=sigma, step=50)
        saved = torch.load(tmp_path / f"phema-0000000050-{sigma:.4f}.pt", weights_only=True)[
            "averages"
        ]
        assert max_dev(at_50, saved) < 1e-9


def test_synthesis_of_an_average_also_tracked_directly(tmp_path):
    """sigma_rel 0.07, synthesized from the snapshots of 0.05 and 0.10, against the 0.07
    average tracked alongside: within the bound that the profile error gives (Cauchy-Schwarz,
    both profiles sum to 1), and within 1% of the gap between the two tracked averages."""
    model = small_model()
    ph = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=10, snapshot_dir=tmp_path)
    direct = PostHocEMA(model, sigma_rels=(0.07,))
    trajectory = []
    for params in walk(model, 200):
        trajectory.append(params)
        ph.update()
        direct.update()
    rec = ph.reconstruction(sigma_rel=0.07)
    got = ph.synthesize(sigma_rel=0.07)
    want = direct.average(0)
    assert closed_form(trajectory, direct.gammas[0]).keys() == want.keys()
    # |sum_tau (w_syn - w)(tau) theta_tau| <= ||p_syn - p|| * sqrt(int (theta - c)^2), unit steps
    for name in want:
        thetas = torch.stack([step[name] for step in trajectory])
        centred = thetas - thetas.mean(0)
        bound = (
            rec.profile_error
            * math.sqrt(float(profile_inner_product(200, direct.gammas[0], 200, direct.gammas[0])))
            * centred.square().sum(0).sqrt()
            + 1e-5
        )
        dev = (got[name].double() - want[name].double()).abs()
        assert bool((dev <= bound).all()), name
        gap = (ph.average(0)[name].double() - ph.average(1)[name].double()).abs().max()
        assert dev.max() < 0.01 * gap
    assert rec.profile_error < 0.01


def test_buffers_come_from_the_latest_snapshot(tmp_path):
    model = small_model()
    ph = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path)
    run(model, ph, 25)
    bn = model[1]
    at_20 = ph.synthesize(sigma_rel=0.07, step=20, max_error=None)
    assert at_20["1.num_batches_tracked"].item() == 20
    now = ph.synthesize(sigma_rel=0.07, max_error=None)
    assert torch.equal(now["1.running_mean"], bn.running_mean)
    assert set(now) == set(model.state_dict())


def test_synthesized_parameters_swaps_and_restores_also_on_error(tmp_path):
    model = small_model()
    ph = PostHocEMA(model, snapshot_every=5, snapshot_dir=tmp_path)
    run(model, ph, 20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synth = ph.synthesize(sigma_rel=0.08)
    with (
        pytest.raises(RuntimeError, match="inside"),
        ph.synthesized_parameters(model, sigma_rel=0.08) as m,
    ):
        assert m is model
        for name, value in synth.items():
            assert torch.equal(model.state_dict()[name], value.to(model.state_dict()[name]))
        raise RuntimeError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_float16_snapshots_and_bfloat16_model(tmp_path):
    """A bf16 model gets float32 averages (its weights cast chunk by chunk); snapshots in
    float16 are EDM2's storage; synthesis comes back in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 300), nn.Linear(300, 2)).to(torch.bfloat16)
    ref_model = nn.Sequential(nn.Linear(5, 300), nn.Linear(300, 2))
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ph = PostHocEMA(
        model,
        snapshot_every=4,
        snapshot_dir=tmp_path,
        snapshot_dtype=torch.float16,
        chunk_bytes=1024,
    )
    ref = PostHocEMA(ref_model)
    for _ in range(12):
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref_model.parameters()):
                p.add_(torch.randn(p.shape).to(torch.bfloat16))
                q.copy_(p)
        ph.update()
        ref.update()
    for k in range(2):
        for name, value in ph.average(k).items():
            assert value.dtype == torch.float32
            assert torch.equal(value, ref.average(k)[name])
    saved = torch.load(next(tmp_path.glob("phema-0000000012-*.pt")), weights_only=True)
    assert all(v.dtype == torch.float16 for v in saved["averages"].values())
    out, _ = synthesize_directory(tmp_path, sigma_rel=0.07)
    assert out["0.weight"].dtype == torch.float32
    assert max_dev(out, ph.synthesize(sigma_rel=0.07)) < 0.05  # float16 snapshots


def test_flattening_after_construction_keeps_averaging():
    """flatten_parameters_ moves the weights mid-run: the next update follows them."""
    model = small_model()
    ph = PostHocEMA(model, sigma_rels=(0.1,))
    for i, _ in enumerate(walk(model, 10)):
        ph.update()
        if i == 4:
            polyak.flatten_parameters_(model)
    model2 = small_model()
    ph2 = PostHocEMA(model2, sigma_rels=(0.1,))
    for _ in walk(model2, 10):
        ph2.update()
    for name, v in ph.average(0).items():
        assert torch.equal(v, ph2.average(0)[name])


# --------------------------------------------------------------------------- state and resume


def test_state_dict_round_trip(tmp_path):
    model = small_model()
    ph = PostHocEMA(model, snapshot_every=5, snapshot_dir=tmp_path / "a")
    run(model, ph, 12)
    path = tmp_path / "ph.pt"
    torch.save(ph.state_dict(), path)
    back = PostHocEMA(model, snapshot_every=5, snapshot_dir=tmp_path / "a")
    back.load_state_dict(torch.load(path, weights_only=True))
    assert back.step == 12 and back.run_id == ph.run_id
    for k in range(2):
        for name, v in ph.average(k).items():
            assert torch.equal(back.average(k)[name], v)
    assert max_dev(back.synthesize(sigma_rel=0.07), ph.synthesize(sigma_rel=0.07)) == 0


TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from torch import nn
    import polyak
    from polyak._atomic import save_atomic

    torch.set_num_threads(1)
    run_dir, total, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    kill_in_write = sys.argv[4] == "1"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ph = polyak.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=10,
                           snapshot_dir=os.path.join(run_dir, "snapshots"))
    ckpt = os.path.join(run_dir, "ckpt.pt")
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
        ph.load_state_dict(state["ph"]); start = state["step"]
    if kill_in_write:
        real_replace = os.replace
        def replace(src, dst):
            if "phema-" in str(dst) and ph.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # the temp file is written, not renamed
            real_replace(src, dst)
        os.replace = replace
    for step in range(start + 1, total + 1):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 8, generator=g)
        y = x.sum(1, keepdim=True) + 0.3 * torch.randn(16, 1, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        ph.update()
        if step == kill_at and not kill_in_write:
            os.kill(os.getpid(), signal.SIGKILL)
        if step % 15 == 0:
            save_atomic({"model": model.state_dict(), "opt": opt.state_dict(),
                         "ph": ph.state_dict(), "step": step}, ckpt)
    """
)


def _train(tmp_path: Path, run_dir: Path, kill_at: int = 0, kill_in_write: bool = False) -> int:
    script = tmp_path / "train_posthoc.py"
    script.write_text(TRAIN_SCRIPT)
    run_dir.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [sys.executable, str(script), str(run_dir), "60", str(kill_at), str(int(kill_in_write))]
    done = subprocess.run(args, env=env, capture_output=True)
    return done.returncode


def _snapshots(run_dir: Path) -> dict[str, dict]:
    return {
        p.name: torch.load(p, weights_only=True)
        for p in sorted((run_dir / "snapshots").glob("phema-*.pt"))
    }


def test_sigkill_between_snapshots_and_inside_one_then_resume_is_bitwise(tmp_path):
    ref = tmp_path / "ref"
    assert _train(tmp_path, ref) == 0
    run_dir = tmp_path / "run"
    # Killed at step 37 (checkpoint at 30, snapshot at 30 written, next at 40): resumes from 30.
    assert _train(tmp_path, run_dir, kill_at=37) == -signal.SIGKILL
    # Killed again inside the rename of the step-40 snapshot: a temp file is left behind.
    assert _train(tmp_path, run_dir, kill_at=40, kill_in_write=True) == -signal.SIGKILL
    temps = list((run_dir / "snapshots").glob(".phema-*"))
    assert temps, "the kill inside a snapshot write should leave its temp file"
    with pytest.raises(ValueError, match="no snapshots at step 40"):
        synthesize_directory(run_dir / "snapshots", sigma_rel=0.07, step=40)  # temps ignored
    assert _train(tmp_path, run_dir) == 0
    assert not list((run_dir / "snapshots").glob(".phema-*")), "stale temp files are cleaned"

    got, want = _snapshots(run_dir), _snapshots(ref)
    assert sorted(got) == sorted(want) and len(want) == 12
    run_ids = {s["run_id"] for s in got.values()}
    assert len(run_ids) == 1  # one run, resumed, not two
    for name, snap in want.items():
        other = got[name]
        for key in ("step", "gamma", "sigma_rel", "fingerprint", "parameters"):
            assert other[key] == snap[key]
        for part in ("averages", "buffers"):
            for tensor_name, t in snap[part].items():
                assert torch.equal(other[part][tensor_name], t), (name, tensor_name)
    for sigma, step in ((0.07, None), (0.08, 40)):
        a, _ = synthesize_directory(ref / "snapshots", sigma_rel=sigma, step=step)
        b, _ = synthesize_directory(run_dir / "snapshots", sigma_rel=sigma, step=step)
        for name in a:
            assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path, capsys):
    model = small_model()
    ph = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path / "snaps")
    run(model, ph, 50)
    out = tmp_path / "synth.pt"
    assert (
        cli_main(["posthoc", str(tmp_path / "snaps"), "--sigma-rel", "0.07", "-o", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "sigma_rel 0.07" in printed and "wrote" in printed
    state = torch.load(out, weights_only=True)
    assert max_dev(state, ph.synthesize(sigma_rel=0.07)) == 0
    fresh = small_model(seed=3)
    fresh.load_state_dict(state)  # keyed as the model's state dict

    half = tmp_path / "half.pt"
    args = ["posthoc", str(tmp_path / "snaps"), "--gamma", "8", "--step", "30", "-o", str(half)]
    assert cli_main([*args, "--dtype", "float16"]) == 0
    state = torch.load(half, weights_only=True)
    assert state["0.weight"].dtype == torch.float16
    assert state["1.num_batches_tracked"].item() == 30

    # As a real command, from the directory alone.
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyak",
            "posthoc",
            str(tmp_path / "snaps"),
            "--sigma-rel",
            "0.01",
            "-o",
            str(tmp_path / "x.pt"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "out of reach" in done.stderr and "Reachable here" in done.stderr
    assert not (tmp_path / "x.pt").exists()


def test_cli_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = small_model()
    ph = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path / "snaps")
    run(model, ph, 30)
    out = tmp_path / "synth.safetensors"
    assert (
        cli_main(["posthoc", str(tmp_path / "snaps"), "--sigma-rel", "0.09", "-o", str(out)]) == 0
    )
    state = safetensors_torch.load_file(out)
    assert max_dev(state, ph.synthesize(sigma_rel=0.09)) == 0


def test_cli_refuses_other_suffixes_and_missing_safetensors(tmp_path, capsys, monkeypatch):
    model = small_model()
    ph = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path)
    run(model, ph, 10)
    assert cli_main(["posthoc", str(tmp_path), "--sigma-rel", "0.07", "-o", "x.bin"]) == 2
    assert ".safetensors or .pt" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    out = tmp_path / "x.safetensors"
    assert cli_main(["posthoc", str(tmp_path), "--sigma-rel", "0.07", "-o", str(out)]) == 2
    assert "polyak[safetensors]" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------- errors


def test_out_of_reach_names_the_range_and_changes_nothing(tmp_path):
    model = small_model()
    ph = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path)
    run(model, ph, 40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with (
        pytest.raises(ValueError, match=r"out of reach[\s\S]*Reachable here: sigma_rel from"),
        ph.synthesized_parameters(model, sigma_rel=0.005),
    ):
        pass
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    ph.synthesize(sigma_rel=0.005, max_error=None)  # accepted when asked for
    with pytest.raises(ValueError, match="exactly one of sigma_rel or gamma"):
        ph.synthesize()
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        ph.synthesize(sigma_rel=0.3)
    with pytest.raises(ValueError, match="neither a snapshot step nor the current one"):
        ph.synthesize(sigma_rel=0.07, step=15)


def test_nothing_yet():
    ph = PostHocEMA(small_model())
    with pytest.raises(ValueError, match="call update"):
        ph.synthesize(sigma_rel=0.07)


def test_empty_and_mixed_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no post-hoc EMA snapshots"):
        synthesize_directory(tmp_path / "empty", sigma_rel=0.07)
    with pytest.raises(ValueError, match="does not exist"):
        synthesize_directory(tmp_path / "nowhere", sigma_rel=0.07)
    mixed = tmp_path / "mixed"
    for seed in (0, 1):
        model = small_model(seed)
        ph = PostHocEMA(model, snapshot_every=10 + 5 * seed, snapshot_dir=mixed)
        if seed == 1:
            # Refused at its first update, before any change or write.
            with pytest.raises(ValueError, match="holds snapshots of another run"):
                run(model, ph, 15)
            assert ph.step == 0
            ph._dir_checked = True  # force the mix that a careless copy would make
            run(model, ph, 15)
        else:
            run(model, ph, 20)
    with pytest.raises(ValueError, match=r"mixes the snapshots of 2 runs[\s\S]*directory of its"):
        synthesize_directory(mixed, sigma_rel=0.07)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "phema-0000000010-0.0500.pt").write_bytes(b"not a snapshot")
    with pytest.raises(ValueError, match="not a readable polyak post-hoc EMA snapshot"):
        synthesize_directory(tmp_path / "junk", sigma_rel=0.07)


def test_snapshots_of_another_model_are_refused(tmp_path):
    ph = PostHocEMA(small_model(), snapshot_every=5, snapshot_dir=tmp_path)
    run(ph._model, ph, 5)
    other = nn.Sequential(nn.Linear(6, 17), nn.BatchNorm1d(17), nn.Tanh(), nn.Linear(17, 3))
    ph2 = PostHocEMA(other, snapshot_every=5, snapshot_dir=tmp_path)
    with pytest.raises(ValueError, match=r"another model \(shapes: \['0.weight: \(16, 6\) there"):
        run(other, ph2, 5)
    assert ph2.step == 0
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(16, 6\) in the state dict"):
        ph2.load_state_dict(ph.state_dict())


def test_bad_arguments():
    model = small_model()
    with pytest.raises(ValueError, match="not both"):
        PostHocEMA(model, sigma_rels=(0.1,), gammas=(3.0,))
    with pytest.raises(TypeError, match="sequence"):
        PostHocEMA(model, sigma_rels=0.1)
    with pytest.raises(ValueError, match="differ in sigma_rel"):
        PostHocEMA(model, sigma_rels=(0.1, 0.10001))
    with pytest.raises(ValueError, match="together"):
        PostHocEMA(model, snapshot_every=10)
    with pytest.raises(ValueError, match="multiple of"):
        PostHocEMA(model, snapshot_every=10, snapshot_dir="x", update_every=3)
    with pytest.raises(ValueError, match="int >= 1"):
        PostHocEMA(model, update_every=0)
    with pytest.raises(TypeError, match="floating"):
        PostHocEMA(model, shadow_dtype=torch.int32)
    with pytest.raises(ValueError, match="no parameters"):
        PostHocEMA(nn.ReLU())
    with pytest.raises(ValueError, match=r"gammas\[0\] must be"):
        PostHocEMA(model, gammas=(-1.0,))


def test_load_state_dict_checks_before_changing(tmp_path):
    model = small_model()
    ph = PostHocEMA(model, sigma_rels=(0.05, 0.10))
    run(model, ph, 3)
    state = ph.state_dict()
    fresh = PostHocEMA(model, sigma_rels=(0.05, 0.12))
    with pytest.raises(ValueError, match="construct it with the run's sigma_rels"):
        fresh.load_state_dict(state)
    assert fresh.step == 0
    with pytest.raises(ValueError, match=r"expects the dict of PostHocEMA\.state_dict"):
        fresh.load_state_dict({"step": 3})
    every = PostHocEMA(model, sigma_rels=(0.05, 0.10), update_every=2)
    with pytest.raises(ValueError, match="update_every 1 in the state dict, 2 here"):
        every.load_state_dict(state)
    bad = {**state, "averages": [dict(a) for a in state["averages"]]}
    bad["averages"][1]["3.bias"] = torch.zeros(4)
    same = PostHocEMA(model, sigma_rels=(0.05, 0.10))
    with pytest.raises(ValueError, match=r"'3\.bias' has shape"):
        same.load_state_dict(bad)
    assert same.step == 0
    assert not torch.equal(same.average(0)["3.bias"], ph.average(0)["3.bias"])


def test_load_state_dict_with_fewer_or_more_averages_is_refused():
    """One average of two was loaded into the first, the second kept its own (silently)."""
    model = small_model()
    ph = PostHocEMA(model)
    run(model, ph, 3)
    fresh = PostHocEMA(model)
    before = [{k: v.clone() for k, v in fresh.average(i).items()} for i in range(2)]
    for averages in (ph.state_dict()["averages"][:1], ph.state_dict()["averages"] * 2):
        with pytest.raises(ValueError, match=r"'averages' holds \d averages, this PostHocEMA"):
            fresh.load_state_dict({**ph.state_dict(), "averages": averages})
    assert fresh.step == 0
    for i in range(2):
        assert all(torch.equal(v, before[i][k]) for k, v in fresh.average(i).items())


def test_a_replaced_parameter_is_followed_by_name():
    """After m.weight = nn.Parameter(...) (or load_state_dict(assign=True)) the averages
    follow the model's new tensor, as an in-place copy of the same values would be followed;
    before, they went on averaging the dropped one."""
    replaced, copied = small_model(), small_model()
    a, b = PostHocEMA(replaced, sigma_rels=(0.1,)), PostHocEMA(copied, sigma_rels=(0.1,))
    for ph, model in ((a, replaced), (b, copied)):
        run(model, ph, 2)
    new = torch.full_like(replaced[0].weight, 0.5)
    replaced[0].weight = nn.Parameter(new.clone())
    replaced.load_state_dict(copied.state_dict(), assign=True)  # replaces every tensor
    with torch.no_grad():
        replaced[0].weight.copy_(new)
        copied[0].weight.copy_(new)
    a.update()
    b.update()
    for name, value in b.average(0).items():
        assert torch.equal(a.average(0)[name], value), name
    replaced.extra = nn.Linear(2, 2)  # a new parameter: the model changed
    with pytest.raises(ValueError, match=r"parameters changed since construction .*extra"):
        a.update()
    assert a.step == 3


def test_changed_parameter_shape_is_refused_before_averaging():
    model = small_model()
    ph = PostHocEMA(model, sigma_rels=(0.1,))
    ph.update()
    model[3].bias.data = torch.zeros(4)
    with pytest.raises(ValueError, match=r"'3\.bias' has shape"):
        ph.update()
    assert ph.step == 1
