"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2, section 3 and appendix C): choose the averaging length after training.

During training, :class:`PostHocEMA` tracks a few power-function averages of the weights (EDM2
tracks ``sigma_rel`` 0.05 and 0.10). The ``t``-th call of ``update()`` (``t = 1, 2, ...``) is::

    beta_t   = (1 - 1/t) ** (gamma + 1)                 # 0 at t = 1: the first call copies
    shadow_t = beta_t * shadow_{t-1} + (1 - beta_t) * weights_t

so that after ``T`` calls the weights of call ``tau`` carry
``(tau^(g+1) - (tau-1)^(g+1)) / T^(g+1)``: exactly the mass of the profile
``p(s) = (g+1) s^g / T^(g+1)`` on ``(tau-1, tau]``. The width of that profile relative to ``T``
is ``sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3)))`` (:func:`polyak.schedules.gamma_to_sigma_rel`).
Every ``snapshot_every`` calls, each average is written to ``snapshot_dir``
(``phema-<step>-<sigma_rel>.pt``, atomically, loadable with
``torch.load(weights_only=True)``).

Afterwards, the average of any other ``sigma_rel`` at any snapshot step ``T`` is synthesized as
the combination ``sum_i x_i snapshot_i`` whose profile is closest in L2 to the target's:
``x = A^-1 b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``, inner products in
closed form (EDM2 eq. 151, :func:`profile_inner_product`), then normalised to sum to 1 as EDM2
does. Because the discrete weights above are exact integrals of the profiles, the least squares
problem is EDM2's, with ``t`` counting calls of ``update()``. A target that the snapshots cannot
represent (relative profile error above ``max_error``) is refused with the reachable range.

Module buffers (BatchNorm running statistics, counters) are not averaged: each snapshot stores
them as they are at its step, and a synthesis returns those of the latest snapshot it uses, as
EDM2's ``reconstruct_phema.py`` does.

The averages update in one pass over the weights (:class:`polyak.averaging.multi.FanOutLerp`).
Under FSDP2, snapshots will be per-rank shards (DCP); that waits for polyak's distributed
support, and until then a ``PostHocEMA`` of a sharded model is refused.

There is no TensorFlow equivalent.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from polyak._atomic import remove_dead_writers_temps, save_atomic, write_atomic
from polyak._checks import check_device, check_dtype, check_int, check_mapping, check_real
from polyak.averaging import assignments
from polyak.averaging.multi import FanOutLerp, check_chunk_bytes
from polyak.averaging.names import module_tensors
from polyak.averaging.schedules import SIGMA_REL_MAX, gamma_to_sigma_rel, sigma_rel_to_gamma
from polyak.flat import pack

__all__ = [
    "PostHocEMA",
    "Reconstruction",
    "posthoc_command",
    "power_weight",
    "profile_inner_product",
    "save_state_dict",
    "solve_coefficients",
    "synthesize_directory",
]

FORMAT = "polyak.posthoc/1"
PREFIX = "phema-"
_NAME = re.compile(r"phema-(\d+)-(\d+\.\d+)\.pt")

# The target's profile may differ from the best combination of snapshots by this much (relative
# L2 norm) before synthesis refuses it. A synthesized weight is then off by at most this times
# ||p|| times the L2 norm, over the steps, of that weight's deviation from any constant
# (Cauchy-Schwarz; the two profiles both sum to 1, so constants cancel).
DEFAULT_MAX_ERROR = 0.05


# ---------------------------------------------------------------------------- the mathematics


def power_weight(t: int, gamma: float, update_every: int = 1) -> float:
    """``1 - beta_t = 1 - (1 - k/t) ** (gamma + 1)``: the lerp weight of the ``t``-th call
    (``t`` a multiple of ``k = update_every``; EDM2's ``power_function_beta`` with
    ``t_delta = k``). Computed as ``-expm1((gamma + 1) * log1p(-k/t))``, accurate to float64
    rounding also when it is tiny (a float32 ``beta`` would lose its digits past ``t ~ 1e5``)."""
    if t == update_every:
        return 1.0
    return -math.expm1((gamma + 1.0) * math.log1p(-update_every / t))


def profile_inner_product(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> Any:
    """``<p_a, p_b> = int_0^inf p_a(s) p_b(s) ds`` for power-function profiles
    ``p(s) = (g+1) s^g / t^(g+1)`` on ``[0, t]`` (EDM2 eq. 151, Algorithm 3)::

        (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) t_max) * (t_min / t_max) ** g_of_t_max

    Works on floats and on broadcasting tensors alike.
    """
    if isinstance(t_a, torch.Tensor) or isinstance(t_b, torch.Tensor):
        t_max = torch.maximum(torch.as_tensor(t_a), torch.as_tensor(t_b))
        t_min = torch.minimum(torch.as_tensor(t_a), torch.as_tensor(t_b))
        g_long = torch.where(torch.as_tensor(t_a) < t_b, gamma_b, gamma_a)
    else:
        t_max, t_min = max(t_a, t_b), min(t_a, t_b)
        g_long = gamma_b if t_a < t_b else gamma_a
    return (
        (gamma_a + 1)
        * (gamma_b + 1)
        / ((gamma_a + gamma_b + 1) * t_max)
        * (t_min / t_max) ** g_long
    )


def solve_coefficients(
    steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float
) -> tuple[list[float], float]:
    """EDM2's least squares (Algorithm 3): the coefficients ``x`` of the inputs (power-function
    averages of exponents ``gammas`` taken at ``steps``) whose combination has the profile
    closest to that of exponent ``gamma`` at ``step``, normalised to sum to 1; and the relative
    L2 error of that combination's profile, ``||sum_i x_i p_i - p|| / ||p||``.

    Solved in float64 as EDM2 does (LU); the Gram matrix of many snapshots is ill-conditioned
    (condition number 1e8 with 400 snapshots), which moves the coefficients but not the
    combined profile, LU being backward stable. A singular matrix falls back to the SVD-based
    minimum-norm least-squares solution.
    """
    n = len(steps)
    if n == 0 or len(gammas) != n:
        raise ValueError(f"solve_coefficients: {n} steps and {len(gammas)} gammas")
    # Times relative to the target (the solution is scale-free; this keeps entries near 1).
    t = torch.tensor([s / step for s in steps], dtype=torch.float64)
    g = torch.tensor(list(gammas), dtype=torch.float64)
    a = profile_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    one = torch.ones((), dtype=torch.float64)
    b = profile_inner_product(t, g, one, one * gamma)
    try:
        x = torch.linalg.solve(a, b)  # LU: backward stable, so the profile error stays small
    except RuntimeError:  # numerically singular: the minimum-norm least-squares solution
        x = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]
    x = x / x.sum()
    # <p, p> at t = 1; a product, which gives inf rather than OverflowError past gamma 1e154
    c = (gamma + 1) * (gamma + 1) / (2 * gamma + 1)
    residual = float(x @ a @ x - 2 * x @ b) + c
    return x.tolist(), math.sqrt(max(residual, 0.0) / c)


class Reconstruction(NamedTuple):
    """What a synthesis combines: the inputs (``steps[i]``, ``gammas[i]``), their
    ``coefficients``, the target, and the relative L2 error of the combined profile."""

    step: int
    gamma: float
    sigma_rel: float
    steps: list[int]
    gammas: list[float]
    coefficients: list[float]
    profile_error: float


class _Target(NamedTuple):
    gamma: float
    step: int | None
    max_error: float | None


def _check_target(sigma_rel: Any, gamma: Any, step: Any, max_error: Any, caller: str) -> _Target:
    """The synthesis arguments, checked: exactly one of ``sigma_rel`` (in ``(0, 0.2887)``) or
    ``gamma`` (> 0), ``step`` None or an int >= 0, ``max_error`` None or a number >= 0
    (``inf`` accepts anything, as None does)."""
    if (sigma_rel is None) == (gamma is None):
        raise ValueError(f"{caller}: pass exactly one of sigma_rel or gamma")
    if gamma is None:
        target = sigma_rel_to_gamma(sigma_rel)
    else:
        target = check_real(gamma, "gamma", caller, low=0.0, low_open=True)
    if step is not None:
        step = check_int(step, "step", caller, low=0)
    if max_error is not None:
        max_error = check_real(
            max_error,
            "max_error",
            caller,
            low=0.0,
            allow_infinite=True,
            hint="pass max_error=None to accept any profile error",
        )
    return _Target(target, step, max_error)


def _reconstruct(
    inputs: Sequence[tuple[int, float]], step: int, gamma: float, max_error: float | None
) -> Reconstruction:
    """Solve for ``inputs`` (``(step, gamma)`` each), refusing a target out of reach."""
    steps = [s for s, _ in inputs]
    gammas = [g for _, g in inputs]
    x, err = solve_coefficients(steps, gammas, step, gamma)
    rec = Reconstruction(step, gamma, gamma_to_sigma_rel(gamma), steps, gammas, x, err)
    if max_error is not None and not err <= max_error:
        tracked = sorted({gamma_to_sigma_rel(g) for g in gammas})
        low, high = _reachable(steps, gammas, step, max_error)
        raise ValueError(
            f"sigma_rel {rec.sigma_rel:.4g} (gamma {gamma:.4g}) at step {step} is out of reach of "
            f"the {len(inputs)} averages available up to that step (tracked sigma_rel "
            f"{', '.join(f'{s:.4g}' for s in tracked)}): the closest combination misses the "
            f"target's averaging profile by {err:.1%} (max_error {max_error:.1%}). Reachable "
            f"here: sigma_rel from about {low:.3g} to {high:.3g}. Track an average nearer to it "
            "(PostHocEMA(sigma_rels=...)), take snapshots more often (snapshot_every), or pass a "
            "larger max_error."
        )
    return rec


def _reachable(
    steps: Sequence[int], gammas: Sequence[float], step: int, max_error: float
) -> tuple[float, float]:
    """The ``sigma_rel`` interval whose error stays within ``max_error`` (by bisection in
    ``log sigma_rel`` out from the tracked averages; for the error message)."""

    def ok(s: float) -> bool:
        return solve_coefficients(steps, gammas, step, sigma_rel_to_gamma(s))[1] <= max_error

    at_step = sorted(gamma_to_sigma_rel(g) for s, g in zip(steps, gammas) if s == step)
    inside = [s for s in at_step if ok(s)]
    if not inside:
        return (math.nan, math.nan)
    bounds = []
    for start, limit in ((inside[0], 1e-4), (inside[-1], 0.2886)):
        if ok(limit):
            bounds.append(limit)
            continue
        good, bad = math.log(start), math.log(limit)
        for _ in range(20):
            mid = 0.5 * (good + bad)
            good, bad = (mid, bad) if ok(math.exp(mid)) else (good, mid)
        bounds.append(math.exp(good))
    return bounds[0], bounds[1]


# ---------------------------------------------------------------------------- snapshot files


class _Snapshot(NamedTuple):
    """A snapshot file's metadata (its tensors are read only when a synthesis needs them)."""

    path: Path
    step: int
    gamma: float
    run_id: str
    fingerprint: str
    update_every: int
    parameters: dict[str, Any]


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"{PREFIX}{step:010d}-{sigma_rel:.4f}.pt"


def _load(path: Path) -> dict[str, Any]:
    # mmap: reading the metadata does not read the tensors.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# Metadata of files already read, by (path, inode, size, mtime): a snapshot is replaced, never
# edited, so a new version has a new inode or mtime.
_metadata: dict[tuple[str, int, int, int], _Snapshot] = {}


def _scan(directory: Path) -> list[_Snapshot]:
    """Every snapshot in ``directory`` (temp files of interrupted writes are not snapshots),
    sorted by step then gamma."""
    found = []
    seen = set()
    for path in directory.glob(f"{PREFIX}*.pt"):
        if not _NAME.fullmatch(path.name):
            continue
        st = path.stat()
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        seen.add(key)
        snap = _metadata.get(key)
        if snap is None:
            snap = _metadata[key] = _read_metadata(path)
        found.append(snap)
    for key in [k for k in _metadata if Path(k[0]).parent == directory and k not in seen]:
        del _metadata[key]  # replaced or deleted files
    return sorted(found, key=lambda s: (s.step, s.gamma))


def _read_metadata(path: Path) -> _Snapshot:
    try:
        data = _load(path)
        return _Snapshot(
            path,
            int(data["step"]),
            float(data["gamma"]),
            str(data["run_id"]),
            str(data["fingerprint"]),
            int(data["update_every"]),
            data["parameters"],
        )
    except Exception as exc:  # any unreadable file: say which, and why
        raise ValueError(
            f"{path} is not a readable polyak post-hoc EMA snapshot ({type(exc).__name__}: "
            f"{exc}); move it out of {path.parent}"
        ) from None


def _runs(snapshots: Sequence[_Snapshot]) -> dict[tuple[str, str, int], list[_Snapshot]]:
    runs: dict[tuple[str, str, int], list[_Snapshot]] = {}
    for s in snapshots:
        runs.setdefault((s.run_id, s.fingerprint, s.update_every), []).append(s)
    return runs


def _describe_runs(runs: Mapping[tuple[str, str, int], list[_Snapshot]]) -> str:
    return "; ".join(
        f"run {run_id[:8]} (model {fp[:8]}, update_every {every}): {len(snaps)} files, steps "
        f"{snaps[0].step}-{snaps[-1].step}, e.g. {snaps[0].path.name}"
        for (run_id, fp, every), snaps in runs.items()
    )


def _fingerprint(names: Sequence[str], shapes: Sequence[Sequence[int]], buffers: Mapping) -> str:
    text = ";".join(f"{n}:{list(s)}" for n, s in zip(names, shapes))
    text += "|" + ";".join(f"{n}:{list(b)}" for n, b in buffers.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _model_difference(here: Mapping[str, Any], there: Mapping[str, Any]) -> str:
    """What differs between two ``parameters`` metadata dicts, for error messages."""
    a = dict(zip(here["names"], map(tuple, here["shapes"])))
    b = dict(zip(there["names"], map(tuple, there["shapes"])))
    missing = [n for n in a if n not in b]
    extra = [n for n in b if n not in a]
    shapes = [f"{n}: {b[n]} there, {a[n]} here" for n in a if n in b and a[n] != b[n]]
    parts = []
    if missing:
        parts.append(f"not there: {missing[:5]}")
    if extra:
        parts.append(f"only there: {extra[:5]}")
    if shapes:
        parts.append(f"shapes: {shapes[:5]}")
    return "; ".join(parts) or "its buffers differ"


def _synthesize(
    rec: Reconstruction,
    loaders: Sequence[Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]]],
    dtypes: Mapping[str, torch.dtype],
) -> dict[str, torch.Tensor]:
    """``sum_i x_i average_i`` in float64 on the CPU, one input in memory at a time, cast to
    ``dtypes``; buffers from the last input (the latest step)."""
    sums: dict[str, torch.Tensor] = {}
    buffers: Mapping[str, torch.Tensor] = {}
    for x, load in zip(rec.coefficients, loaders):
        averages, buffers = load()
        for name, tensor in averages.items():
            value = tensor.detach().to(device="cpu", dtype=torch.float64)
            if name in sums:
                sums[name].add_(value, alpha=x)
            else:
                sums[name] = value * x
    out = {name: total.to(dtypes[name]) for name, total in sums.items()}
    out.update({name: b.detach().clone() for name, b in buffers.items()})
    return out


def synthesize_directory(
    directory: str | os.PathLike[str],
    sigma_rel: float | None = None,
    gamma: float | None = None,
    step: int | None = None,
    *,
    max_error: float | None = DEFAULT_MAX_ERROR,
) -> tuple[dict[str, torch.Tensor], Reconstruction]:
    """Synthesize from a snapshot directory alone (what ``polyak posthoc`` does): the average
    of ``sigma_rel`` (or ``gamma``) at snapshot step ``step`` (default: the latest), as
    ``{name: tensor}`` on the CPU in the averages' dtype, buffers from the snapshot at ``step``.

    The directory must hold the snapshots of one run (one model, one ``PostHocEMA``).
    """
    target = _check_target(sigma_rel, gamma, step, max_error, "posthoc")
    directory = _check_path(directory, "directory", "posthoc")
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise ValueError(f"posthoc: snapshot directory {directory} {what}")
    snapshots = _scan(directory)
    if not snapshots:
        raise ValueError(
            f"{directory} holds no post-hoc EMA snapshots (files {PREFIX}<step>-<sigma_rel>.pt "
            "written by polyak.PostHocEMA(snapshot_dir=...)); point at the run's snapshot_dir"
        )
    runs = _runs(snapshots)
    if len(runs) > 1:
        raise ValueError(
            f"{directory} mixes the snapshots of {len(runs)} runs: {_describe_runs(runs)}. "
            "Move each run's snapshots into a directory of its own (the file metadata says "
            "which run wrote it), then synthesize from one of them."
        )
    steps = sorted({s.step for s in snapshots})
    at = steps[-1] if target.step is None else target.step
    if at not in steps:
        raise ValueError(
            f"posthoc: no snapshots at step {at} in {directory}; steps available: {_ranges(steps)}"
        )
    used = [s for s in snapshots if s.step <= at]
    rec = _reconstruct([(s.step, s.gamma) for s in used], at, target.gamma, target.max_error)
    meta = used[-1].parameters
    dtypes = dict(zip(meta["names"], (_dtype(d) for d in meta["shadow_dtypes"])))
    return _synthesize(rec, [_file_loader(s) for s in used], dtypes), rec


def _file_loader(snap: _Snapshot) -> Callable[[], tuple[Mapping, Mapping]]:
    """Reads a snapshot's averages and buffers when called."""

    def load() -> tuple[Mapping, Mapping]:
        data = _load(snap.path)
        return data["averages"], data["buffers"]

    return load


def _ranges(steps: Sequence[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:4]))}, ..., {', '.join(map(str, steps[-3:]))}"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``{name: tensor}`` atomically: safetensors for a ``.safetensors`` path (needs the
    ``safetensors`` package, ``pip install 'polyak[safetensors]'``), else ``torch.save``
    (``.pt``/``.pth``; loads with ``weights_only=True`` straight into ``model.load_state_dict``)."""
    path = _check_path(path, "path", "save_state_dict")
    _state_dict_writer(path)(state_dict, metadata or {})
    return path


def _check_path(value: Any, name: str, who: str) -> Path:
    """A file-system path given as ``str`` or ``os.PathLike`` (not empty: ``""`` would mean
    the current directory)."""
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        raise TypeError(f"{who}: {name} must be a path (str or os.PathLike), got {value!r}")
    if not os.fspath(value):
        raise ValueError(f"{who}: {name} is empty; give a path")
    return Path(value)


def _state_dict_writer(
    path: Path,
) -> Callable[[Mapping[str, torch.Tensor], Mapping[str, str]], None]:
    """The writer for ``path``'s format; refuses an unknown suffix, a missing package, a
    directory where the file should go or a missing parent directory."""
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a file name in it")
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise ValueError(f"output {path}: {path.parent} {what}; give a file in a directory")
    if path.suffix in (".pt", ".pth"):
        return lambda state, _: save_atomic(dict(state), path)
    if path.suffix != ".safetensors":
        raise ValueError(f"output {path}: use a .safetensors or .pt file name")
    try:
        from safetensors.torch import save
    except ImportError:
        raise ValueError(
            f"writing {path.name} needs the safetensors package (pip install "
            "'polyak[safetensors]'); or give a .pt path"
        ) from None

    def write(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        blob = save({k: v.detach().contiguous() for k, v in state.items()}, dict(metadata))
        write_atomic(path, lambda f: f.write(blob))

    return write


# ---------------------------------------------------------------------------- PostHocEMA

_STATE_KEYS = ("step", "last_update", "gammas", "update_every", "run_id", "fingerprint", "averages")


def _check_sequence(value: Any, name: str, example: str) -> list[Any]:
    """A non-empty list or tuple (a bare number, a string or a tensor is refused by name)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"PostHocEMA: {name} must be a sequence (list or tuple) of numbers, e.g. "
            f"{example}; got {value!r}"
        )
    if not value:
        raise ValueError(f"PostHocEMA: {name} is empty; track at least one average, e.g. {example}")
    return list(value)


def _check_sigma_rel(value: Any, name: str) -> float:
    return check_real(
        value,
        name,
        "PostHocEMA",
        low=0.0,
        high=math.nextafter(SIGMA_REL_MAX, 0.0),
        low_open=True,
        hint="sigma_rel is a fraction of the training so far, e.g. 0.05",
    )


def _check_snapshot_dir(path: Path) -> Path:
    """``path`` if it is, or can be made, a writable directory (made at construction)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"PostHocEMA: snapshot_dir {path} exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"PostHocEMA: snapshot_dir {path} cannot be written ({existing} is not a writable "
            "directory); give a directory this process can write"
        )
    return path


class PostHocEMA:
    """Power-function EMAs of a model's parameters, snapshots of them, and the synthesis of
    an EMA of any length afterwards (see the module docstring for the formulas).

    Args:
        model: the module whose parameters are averaged (its buffers are recorded in the
            snapshots, not averaged).
        sigma_rels: the relative widths of the tracked averages (EDM2: 0.05 and 0.10, the
            default); or ``gammas``, their exponents (16.97 and 6.94). Two or more averages
            make synthesis reach between and around them.
        snapshot_every: write a snapshot of every average every this many calls of
            :meth:`update` (a multiple of ``update_every``), into ``snapshot_dir``. Without a
            directory there are no snapshots: synthesis then combines the current averages only.
        update_every: average on every ``k``-th call only, with ``beta = (1 - k/t)^(gamma+1)``
            so that the profile in calls stays the same (EDM2's ``t_delta``).
        shadow_dtype: dtype of the averages (default: float32, or the parameter's dtype if
            wider): a bf16 model gets fp32 averages, as EDM2 keeps them.
        snapshot_dtype: dtype of the snapshot files (default: ``shadow_dtype``; EDM2 writes
            float16, half the disk, at about 3 decimal digits per snapshot).
        device: where the averages live (default: with each parameter; ``"cpu"`` to keep
            them off the accelerator).
        chunk_bytes: see :class:`polyak.averaging.multi.FanOutLerp`.

    ``update()`` costs one pass over the weights for all averages (``4 + 8K`` bytes per fp32
    parameter), no host sync (a snapshot call copies to the CPU and writes files).
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] | None = None,
        *,
        gammas: Sequence[float] | None = None,
        snapshot_every: int | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
        update_every: int = 1,
        shadow_dtype: torch.dtype | None = None,
        snapshot_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        chunk_bytes: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"PostHocEMA: model must be an nn.Module, got {type(model).__name__}")
        if sigma_rels is not None and gammas is not None:
            raise ValueError("PostHocEMA: pass sigma_rels or gammas, not both")
        if gammas is None:
            widths = _check_sequence(
                (0.05, 0.10) if sigma_rels is None else sigma_rels, "sigma_rels", "(0.05, 0.10)"
            )
            gammas = [
                sigma_rel_to_gamma(_check_sigma_rel(s, f"sigma_rels[{i}]"))
                for i, s in enumerate(widths)
            ]
        else:
            gammas = [
                check_real(g, f"gammas[{i}]", "PostHocEMA", low=0.0, low_open=True)
                for i, g in enumerate(_check_sequence(gammas, "gammas", "(16.97, 6.94)"))
            ]
        labels = [snapshot_name(0, gamma_to_sigma_rel(g)) for g in gammas]
        if len(set(labels)) != len(labels):
            raise ValueError(
                "PostHocEMA: the averages must differ in sigma_rel by at least 1e-4 (snapshot "
                f"file names use 4 decimals); got sigma_rels "
                f"{[gamma_to_sigma_rel(g) for g in gammas]}"
            )
        update_every = check_int(update_every, "update_every", "PostHocEMA", low=1)
        if snapshot_every is not None:
            snapshot_every = check_int(snapshot_every, "snapshot_every", "PostHocEMA", low=1)
        if snapshot_dir is not None:
            snapshot_dir = _check_snapshot_dir(
                _check_path(snapshot_dir, "snapshot_dir", "PostHocEMA")
            )
        if (snapshot_every is None) != (snapshot_dir is None):
            raise ValueError(
                "PostHocEMA: pass snapshot_every and snapshot_dir together (or neither, for no "
                "snapshots)"
            )
        if snapshot_every is not None and snapshot_every % update_every:
            raise ValueError(
                f"PostHocEMA: snapshot_every ({snapshot_every}) must be a multiple of "
                f"update_every ({update_every}), so that snapshots follow an update"
            )
        if shadow_dtype is not None:
            shadow_dtype = check_dtype(shadow_dtype, "shadow_dtype", "PostHocEMA")
        if snapshot_dtype is not None:
            snapshot_dtype = check_dtype(snapshot_dtype, "snapshot_dtype", "PostHocEMA")
        dev = None if device is None else check_device(device, "device", "PostHocEMA")
        chunk_bytes = check_chunk_bytes(chunk_bytes, "PostHocEMA")
        params: list[tuple[str, torch.Tensor]] = []
        buffers: dict[str, list[int]] = {}
        for name, tensor, is_param in module_tensors(model, "copy"):
            if not is_param:
                buffers[name] = list(tensor.shape)
                continue
            if not tensor.is_floating_point():
                raise TypeError(
                    f"PostHocEMA: parameter '{name}' is {tensor.dtype}; only floating "
                    "parameters can be averaged"
                )
            if type(tensor.data) is not torch.Tensor:
                raise TypeError(
                    f"PostHocEMA: parameter '{name}' is a {type(tensor.data).__name__} (a "
                    "sharded model?); post-hoc EMA of sharded models waits for polyak's "
                    "distributed support"
                )
            params.append((name, tensor))
        if not params:
            raise ValueError("PostHocEMA: the model has no parameters to average")

        self.gammas: tuple[float, ...] = tuple(gammas)
        self.sigma_rels: tuple[float, ...] = tuple(gamma_to_sigma_rel(g) for g in gammas)
        self.update_every = update_every
        self.snapshot_every = snapshot_every
        self.snapshot_dir = snapshot_dir
        self.snapshot_dtype = snapshot_dtype
        self.chunk_bytes = chunk_bytes
        self._model = model
        self._names = [n for n, _ in params]
        self._sources = [p for _, p in params]
        self._buffer_shapes = buffers
        shadow_dtypes = [
            shadow_dtype or torch.promote_types(p.dtype, torch.float32) for p in self._sources
        ]
        specs = [(p.shape, dt, dev or p.device) for p, dt in zip(self._sources, shadow_dtypes)]
        self._averages: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for _ in self.gammas:
                views = pack(specs)  # one contiguous buffer per (device, dtype) per average
                for view, p in zip(views, self._sources):
                    view.copy_(p.detach())
                self._averages.append(views)
        self._parameters = {
            "names": list(self._names),
            "shapes": [list(p.shape) for p in self._sources],
            "dtypes": [str(p.dtype).removeprefix("torch.") for p in self._sources],
            "shadow_dtypes": [str(d).removeprefix("torch.") for d in shadow_dtypes],
        }
        self.fingerprint = _fingerprint(self._names, self._parameters["shapes"], buffers)
        self.run_id = uuid.uuid4().hex
        self._step = 0
        self._last_update = 0
        self._fan: FanOutLerp | None = None
        self._dir_checked = False
        assignments.watch()
        self._assignments_seen = assignments.count()
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            remove_dead_writers_temps(self.snapshot_dir, PREFIX)

    # ------------------------------------------------------------------ training

    @property
    def step(self) -> int:
        """Calls of :meth:`update` so far."""
        return self._step

    def update(self) -> None:
        """One call: every average takes its power-function step (on update steps), in one
        pass over the weights; every ``snapshot_every`` calls, each is written to disk.

        The model's parameters are followed by name (a replaced ``nn.Parameter`` is averaged
        from then on). A refusal changes nothing; so does a snapshot write that fails (a full
        disk): the averages and the step are put back, and the next call redoes the step."""
        t = self._step + 1
        averaging = t % self.update_every == 0
        snapshot = self.snapshot_every is not None and t % self.snapshot_every == 0
        # Everything that can refuse runs before anything changes.
        if self._assignments_seen != assignments.count():
            self._follow_model()
        fan = self._fan_out() if averaging else None
        if self.snapshot_dir is not None and not self._dir_checked:
            self._check_directory()
        if snapshot:
            buffers = self._snapshot_buffers()
            # Writing can still fail (a full disk): then the averages and counters go back to
            # what they were, so that calling update() again redoes this step and its snapshot.
            # The copy costs K averages of host memory, on snapshot steps only.
            backup = [[v.detach().to("cpu", copy=True) for v in views] for views in self._averages]
        before = (self._step, self._last_update)
        if fan is not None:
            fan([power_weight(t, g, self.update_every) for g in self.gammas])
            self._last_update = t
        self._step = t
        if snapshot:
            try:
                self._write_snapshots(buffers)
            except BaseException:
                with torch.no_grad():
                    for views, saved in zip(self._averages, backup):
                        for view, value in zip(views, saved):
                            view.copy_(value)
                self._step, self._last_update = before
                raise

    def _follow_model(self) -> None:
        """Follow the model's parameters by name after a module assignment anywhere (counted by
        torch's registration hooks, as :class:`ExponentialMovingAverage` does): after
        ``m.weight = nn.Parameter(...)`` or ``load_state_dict(assign=True)`` the averages
        follow the new tensor, never the dropped one. A model whose parameter names changed
        is refused."""
        current = {n: t for n, t, is_param in module_tensors(self._model, "copy") if is_param}
        if list(current) != self._names:
            missing = [n for n in self._names if n not in current]
            extra = [n for n in current if n not in self._names]
            raise ValueError(
                f"PostHocEMA: the model's parameters changed since construction (missing "
                f"{missing[:10]}, new {extra[:10]}). A changed model needs a new PostHocEMA and "
                "a new snapshot_dir."
            )
        sources = list(current.values())
        for name, p in zip(self._names, sources):
            if not p.is_floating_point():
                raise TypeError(
                    f"PostHocEMA: parameter '{name}' is now {p.dtype}; only floating parameters "
                    "can be averaged"
                )
        if any(a is not b for a, b in zip(sources, self._sources)):
            self._sources, self._fan = sources, None
        self._assignments_seen = assignments.count()

    def _fan_out(self) -> FanOutLerp:
        fan = self._fan
        if fan is None or not fan.is_current():
            for name, p, avg in zip(self._names, self._sources, self._averages[0]):
                if p.shape != avg.shape:
                    raise ValueError(
                        f"PostHocEMA: parameter '{name}' has shape {tuple(p.shape)}, its "
                        f"averages {tuple(avg.shape)}. A changed model needs a new PostHocEMA "
                        "and a new snapshot_dir."
                    )
            fan = self._fan = FanOutLerp(
                self._sources, self._averages, chunk_bytes=self.chunk_bytes
            )
        return fan

    def _check_directory(self) -> list[_Snapshot]:
        """This run's snapshots; refuses a snapshot_dir that holds another run's."""
        assert self.snapshot_dir is not None
        snapshots = _scan(self.snapshot_dir)
        others = [s for s in snapshots if s.run_id != self.run_id]
        if others:
            runs = _runs(others)
            model = ""
            if any(fp != self.fingerprint for _, fp, _ in runs):
                odd = next(s for s in others if s.fingerprint != self.fingerprint)
                model = (
                    " Some are of another model ("
                    f"{_model_difference(self._parameters, odd.parameters)})."
                )
            raise ValueError(
                f"snapshot_dir {self.snapshot_dir} holds snapshots of another run: "
                f"{_describe_runs(runs)}.{model} Give each run its own snapshot_dir; to resume "
                "a run, load its PostHocEMA.state_dict() before the first update()."
            )
        self._dir_checked = True
        return snapshots

    def _snapshot_buffers(self) -> dict[str, torch.Tensor]:
        """The model's buffers as a snapshot stores them (CPU copies); refuses changed buffers
        or a snapshot_dir removed since, before the update changes anything."""
        assert self.snapshot_dir is not None
        if not self.snapshot_dir.is_dir():
            raise ValueError(
                f"PostHocEMA: snapshot_dir {self.snapshot_dir} is gone (removed during the "
                "run?); put it back with this run's snapshots, or resume into a new PostHocEMA"
            )
        buffers = {n: t for n, t, avg in module_tensors(self._model, "copy") if not avg}
        if {n: list(b.shape) for n, b in buffers.items()} != self._buffer_shapes:
            raise ValueError(
                "PostHocEMA: the model's buffers changed since construction "
                f"({sorted(self._buffer_shapes)} -> {sorted(buffers)}); snapshots need them fixed"
            )
        return {n: b.detach().to("cpu", copy=True) for n, b in buffers.items()}

    def _write_snapshots(self, saved_buffers: Mapping[str, torch.Tensor]) -> None:
        assert self.snapshot_dir is not None
        for gamma, sigma_rel, views in zip(self.gammas, self.sigma_rels, self._averages):
            averages = {
                n: v.detach().to(device="cpu", dtype=self.snapshot_dtype or v.dtype)
                for n, v in zip(self._names, views)
            }
            record = {
                "format": FORMAT,
                "run_id": self.run_id,
                "fingerprint": self.fingerprint,
                "step": self._step,
                "gamma": gamma,
                "sigma_rel": sigma_rel,
                "update_every": self.update_every,
                "parameters": self._parameters,
                "averages": averages,
                "buffers": saved_buffers,
            }
            save_atomic(record, self.snapshot_dir / snapshot_name(self._step, sigma_rel))

    # ------------------------------------------------------------------ synthesis

    def average(self, index: int) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of tracked average ``index`` (order of ``sigma_rels``): the
        live tensors, not copies."""
        return dict(zip(self._names, self._averages[index]))

    def reconstruction(
        self,
        sigma_rel: float | None = None,
        gamma: float | None = None,
        step: int | None = None,
        *,
        max_error: float | None = DEFAULT_MAX_ERROR,
    ) -> Reconstruction:
        """What :meth:`synthesize` would combine, with which coefficients, and the profile
        error; reads no tensors."""
        return self._plan_synthesis(sigma_rel, gamma, step, max_error)[0]

    def synthesize(
        self,
        sigma_rel: float | None = None,
        gamma: float | None = None,
        step: int | None = None,
        *,
        max_error: float | None = DEFAULT_MAX_ERROR,
    ) -> dict[str, torch.Tensor]:
        """The power-function EMA of ``sigma_rel`` (or ``gamma``) at ``step``, synthesized by
        EDM2's least squares from the snapshots up to ``step`` (default: now, including the
        current averages).

        Returns ``{name: tensor}`` keyed as the model's state dict (wrapper prefixes removed):
        parameters in the averages' dtype and on their device, buffers from the latest input
        (the model's own buffers when ``step`` is now). A target that the inputs cannot
        represent within ``max_error`` (relative L2 error of the profile) raises a
        ``ValueError`` that gives the reachable range; ``max_error=None`` accepts anything.
        """
        rec, loaders = self._plan_synthesis(sigma_rel, gamma, step, max_error)
        dtypes = dict(zip(self._names, (v.dtype for v in self._averages[0])))
        out = _synthesize(rec, loaders, dtypes)
        for name, view in zip(self._names, self._averages[0]):
            out[name] = out[name].to(view.device)
        return out

    @contextlib.contextmanager
    def synthesized_parameters(
        self,
        model: nn.Module,
        sigma_rel: float | None = None,
        gamma: float | None = None,
        step: int | None = None,
        *,
        max_error: float | None = DEFAULT_MAX_ERROR,
    ) -> Iterator[nn.Module]:
        """Swap the synthesized average (parameters and buffers) into ``model`` for the
        ``with`` block; the model's own tensors come back on exit, also on an exception."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"synthesized_parameters: model must be an nn.Module, got {model!r}")
        targets = {n: t for n, t, _ in module_tensors(model, "copy")}
        missing = [n for n in self._names if n not in targets]
        if missing:
            raise ValueError(
                f"synthesized_parameters: the model has no {missing[:10]}; pass the model this "
                "PostHocEMA averages"
            )
        state = self.synthesize(sigma_rel, gamma, step, max_error=max_error)
        pairs = [(targets[n], v) for n, v in state.items() if n in targets]
        for target, value in pairs:
            if target.shape != value.shape:
                raise ValueError(
                    f"synthesized_parameters: shape {tuple(target.shape)} in the model, "
                    f"{tuple(value.shape)} in the average"
                )
        with torch.no_grad():
            backup = [t.detach().clone() for t, _ in pairs]
            for target, value in pairs:
                target.copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (target, _), saved in zip(pairs, backup):
                    target.copy_(saved)

    def _plan_synthesis(
        self,
        sigma_rel: float | None,
        gamma: float | None,
        step: int | None,
        max_error: float | None,
    ) -> tuple[Reconstruction, list[Callable[[], tuple[Mapping, Mapping]]]]:
        target = _check_target(sigma_rel, gamma, step, max_error, "synthesize")
        now = self._last_update
        files: list[_Snapshot] = []
        if self.snapshot_dir is not None:
            snapshots = self._check_directory()
            # Files past the current step belong to a run that was killed and is being redone.
            files = [s for s in snapshots if s.step <= now]
        steps = sorted({s.step for s in files} | ({now} if now else set()))
        if not steps:
            raise ValueError("synthesize: nothing to synthesize from yet; call update() first")
        at = now if target.step is None else target.step
        if at not in steps:
            raise ValueError(
                f"synthesize: step {at} is neither a snapshot step nor the current one; steps "
                f"available: {_ranges(steps)}"
            )
        inputs: list[tuple[int, float]] = []
        loaders: list[Callable[[], tuple[Mapping, Mapping]]] = []
        for snap in files:
            if snap.step > at or (snap.step == now == at):
                continue  # the live averages stand for the current step, at full precision
            inputs.append((snap.step, snap.gamma))
            loaders.append(_file_loader(snap))
        if at == now:
            for k, g in enumerate(self.gammas):
                inputs.append((now, g))
                loaders.append(self._live_loader(k))
        return _reconstruct(inputs, at, target.gamma, target.max_error), loaders

    def _live_loader(self, k: int) -> Callable[[], tuple[Mapping, Mapping]]:
        def load() -> tuple[Mapping, Mapping]:
            buffers = {n: t for n, t, avg in module_tensors(self._model, "copy") if not avg}
            return self.average(k), buffers

        return load

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the snapshot files: step counters, the
        averages (the tensors themselves, no copies), the run id its snapshots carry.
        Loads with ``torch.load(weights_only=True)``."""
        return {
            "format": FORMAT,
            "step": self._step,
            "last_update": self._last_update,
            "gammas": list(self.gammas),
            "update_every": self.update_every,
            "run_id": self.run_id,
            "fingerprint": self.fingerprint,
            "averages": [self.average(k) for k in range(len(self.gammas))],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the same averages, step and run id, so the run
        writes the same snapshots again. Everything is checked before anything changes."""
        who = "PostHocEMA.load_state_dict"
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != FORMAT:
            keys = sorted(map(str, state_dict))[:6] if isinstance(state_dict, Mapping) else "-"
            raise ValueError(
                f"{who} expects the dict of PostHocEMA.state_dict() (format {FORMAT!r}), got "
                f"{type(state_dict).__name__} with keys {keys}"
            )
        missing_keys = [k for k in _STATE_KEYS if k not in state_dict]
        if missing_keys:
            raise ValueError(f"{who}: the state dict has no {missing_keys} (a damaged file?)")
        saved_gammas = state_dict["gammas"]
        if not isinstance(saved_gammas, (list, tuple)):
            raise TypeError(f"{who}: 'gammas' must be a list, got {saved_gammas!r}")
        gammas = [
            check_real(g, f"gammas[{i}]", who, low=0.0, low_open=True)
            for i, g in enumerate(saved_gammas)
        ]
        if gammas != list(self.gammas):
            raise ValueError(
                f"{who}: the state dict tracks gammas {gammas} (sigma_rels "
                f"{[round(gamma_to_sigma_rel(g), 6) for g in gammas]}), this PostHocEMA "
                f"{list(self.gammas)}; construct it with the run's sigma_rels or gammas"
            )
        every = check_int(state_dict["update_every"], "'update_every'", who, low=1)
        if every != self.update_every:
            raise ValueError(
                f"{who}: update_every {every} in the state dict, {self.update_every} here"
            )
        step = check_int(state_dict["step"], "'step'", who, low=0)
        last = check_int(state_dict["last_update"], "'last_update'", who, low=0)
        if not (last <= step < last + every and last % every == 0):
            raise ValueError(
                f"{who}: 'step' {step} and 'last_update' {last} do not fit update_every "
                f"{every} (the last update is the latest multiple of update_every up to step)"
            )
        for key in ("run_id", "fingerprint"):
            if not isinstance(state_dict[key], str) or not state_dict[key]:
                raise TypeError(f"{who}: {key!r} must be a non-empty str, got {state_dict[key]!r}")
        averages = state_dict["averages"]
        if not isinstance(averages, (list, tuple)) or len(averages) != len(self.gammas):
            count = len(averages) if isinstance(averages, (list, tuple)) else "no list of"
            raise ValueError(
                f"{who}: 'averages' holds {count} averages, this PostHocEMA tracks "
                f"{len(self.gammas)}"
            )
        for k, saved in enumerate(averages):
            saved = check_mapping(saved, f"'averages'[{k}]", who)
            missing = [n for n in self._names if n not in saved]
            extra = [n for n in saved if n not in self._names]
            if missing or extra:
                raise ValueError(
                    f"{who}: average {k} does not fit this model; missing {missing[:10]}, "
                    f"unexpected {extra[:10]}"
                )
            for name, view in zip(self._names, self._averages[k]):
                value = saved[name]
                if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
                    raise TypeError(
                        f"{who}: '{name}' of average {k} must be a dense tensor, got "
                        f"{type(value).__name__}"
                        + (f" ({value.layout})" if isinstance(value, torch.Tensor) else "")
                    )
                if not value.is_floating_point():
                    raise TypeError(
                        f"{who}: '{name}' of average {k} is {value.dtype}; averages are "
                        "floating-point"
                    )
                if value.shape != view.shape:
                    raise ValueError(
                        f"{who}: '{name}' has shape {tuple(value.shape)} in the state dict, "
                        f"{tuple(view.shape)} here"
                    )
        if state_dict["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"{who}: the state dict comes from a model with other buffers (model "
                f"fingerprint {state_dict['fingerprint']}, here {self.fingerprint}); pass the "
                "model it was made with"
            )
        # Everything is checked: from here on the PostHocEMA changes.
        with torch.no_grad():
            for k, saved in enumerate(averages):
                for name, view in zip(self._names, self._averages[k]):
                    view.copy_(saved[name])
        self._step, self._last_update = step, last
        self.run_id = str(state_dict["run_id"])
        self._dir_checked = False

    def __repr__(self) -> str:
        sig = ", ".join(f"{s:.4g}" for s in self.sigma_rels)
        return (
            f"PostHocEMA(sigma_rels=({sig}), step={self._step}, snapshot_every="
            f"{self.snapshot_every}, snapshot_dir={str(self.snapshot_dir)!r})"
        )


def posthoc_command(
    directory: str | os.PathLike[str],
    output: str | os.PathLike[str],
    sigma_rel: float | None = None,
    gamma: float | None = None,
    step: int | None = None,
    *,
    max_error: float | None = DEFAULT_MAX_ERROR,
    dtype: torch.dtype | None = None,
) -> str:
    """``polyak posthoc``: synthesize from ``directory`` alone and write ``output``
    (``.safetensors`` or ``.pt``); returns the report it prints."""
    if dtype is not None:
        dtype = check_dtype(dtype, "dtype", "posthoc")
    # A bad output path fails before the work.
    write = _state_dict_writer(_check_path(output, "output", "posthoc"))
    state, rec = synthesize_directory(directory, sigma_rel, gamma, step, max_error=max_error)
    if dtype is not None:  # every floating tensor, as EDM2 casts its networks to float16
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    metadata = {
        "format": FORMAT,
        "step": str(rec.step),
        "gamma": repr(rec.gamma),
        "sigma_rel": repr(rec.sigma_rel),
        "profile_error": repr(rec.profile_error),
    }
    write(state, metadata)
    weight = sum(abs(x) for x in rec.coefficients)
    return (
        f"sigma_rel {rec.sigma_rel:.4g} (gamma {rec.gamma:.4g}) at step {rec.step}: "
        f"{len(rec.steps)} snapshots (steps {rec.steps[0]}-{rec.steps[-1]}), profile error "
        f"{rec.profile_error:.2%}, sum |coefficients| {weight:.3g}\nwrote {output}"
    )
