"""Gradient transforms: small stateful steps between ``compute_gradients`` and the optimizer.

Each transform is an object called once per optimizer step on a :class:`GradientStep` (the
parameters, their gradients and names). It edits dense gradients in place, replaces sparse ones
in the list, and may veto the step: on the host (``accumulate``: the optimizer waits for the
k-th micro-step) or on the device (``skip_nonfinite``: a 0-dim bool, so nothing syncs). Every
transform has ``state_dict``/``load_state_dict``; ``chain`` composes them in order, as optax.

Elementwise work runs on :func:`polyak.flat.coalesce`'d views: one kernel per contiguous
buffer when the parameters were flattened (:func:`polyak.flatten_parameters_`), per-tensor
``_foreach`` kernels otherwise.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from polyak import _torch_compat as torch_compat
from polyak.flat import coalesce
from polyak.gradients._buffers import RunCache, dense_groups, flat_like
from polyak.gradients.clipping import (
    _cast,
    dense_and_sparse,
    global_scale,
    map_values,
    norms_squared_sum,
)
from polyak.gradients.clipping import (
    clip_by_value as _clip_values,
)

_is = operator.is_

__all__ = [
    "GradientStep",
    "Transform",
    "accumulate",
    "adaptive_clip",
    "add_noise",
    "chain",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "masked",
    "scale",
    "skip_nonfinite",
]


class GradientStep:
    """The gradients of one optimizer step, as the transforms see and edit them.

    ``params``, ``grads`` and ``names`` are parallel lists. Dense gradients belong to this step
    (the optimizer copied the caller's tensors or owns ``.grad``), so transforms edit them in
    place; a sparse gradient is replaced by assigning ``grads[i]``. ``apply=False`` (host)
    means the optimizer does not step this time; ``skip`` (a 0-dim bool tensor or ``None``)
    means it steps and then restores parameters and optimizer state where ``skip`` is true.
    """

    __slots__ = ("_memo", "_names", "_runs", "apply", "grads", "params", "skip")

    def __init__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        names: list[str] | Callable[[], list[str]],
        *,
        runs: RunCache | None = None,
    ) -> None:
        self.params = params
        self.grads = grads
        self._names = names
        self.apply = True
        self.skip: torch.Tensor | None = None
        self._runs = runs
        self._memo: tuple[list[torch.Tensor], list[torch.Tensor], list[int]] | None = None

    @property
    def names(self) -> list[str]:
        """The parameters' names (built on first use: most steps never need them)."""
        if callable(self._names):
            self._names = self._names()
        return self._names

    @names.setter
    def names(self, names: list[str]) -> None:
        self._names = names

    def dense_runs(self) -> tuple[list[torch.Tensor], list[int]]:
        """The dense gradients merged over contiguous memory, and the sparse entries' indices.

        Computed once per step while ``grads`` holds the same tensors (transforms edit dense
        gradients in place), and across steps through the optimizer's pointer-keyed cache.
        """
        grads = self.grads
        memo = self._memo
        if memo is not None and len(memo[0]) == len(grads) and all(map(_is, memo[0], grads)):
            return list(memo[1]), list(memo[2])
        sparse = [i for i, g in enumerate(grads) if g.is_sparse]
        if self._runs is None:
            runs, _ = dense_and_sparse(grads)
        else:
            dense = [g for g in grads if not g.is_sparse] if sparse else grads
            runs = self._runs.layout(dense)[0]
        self._memo = (list(grads), runs, sparse)
        return list(runs), list(sparse)

    def seed_runs(self, runs: list[torch.Tensor]) -> None:
        """Declare ``runs`` (covering exactly the dense ``grads``' memory) as the merged runs."""
        self._memo = (list(self.grads), runs, [i for i, g in enumerate(self.grads) if g.is_sparse])

    def veto(self, skip: torch.Tensor) -> None:
        """Mark the step to be undone where the 0-dim bool ``skip`` is true (on the device)."""
        self.skip = skip if self.skip is None else self.skip | skip


class Transform:
    """Base class: ``__call__(step)`` edits a :class:`GradientStep`; stateless by default."""

    def __call__(self, step: GradientStep) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this transform has no state, "
                f"got keys {sorted(state_dict)}"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _reject_sparse(step: GradientStep, sparse: Sequence[int], who: str) -> None:
    if sparse:
        raise TypeError(
            f"{who}: gradient of {step.names[sparse[0]]!r} is sparse, which this transform "
            "does not support (it would densify it); wrap the transform in "
            "masked(..., predicate) to leave sparse parameters out"
        )


def _positive(value: float, what: str, who: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{who}: {what} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{who}: {what} must be {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


class chain(Transform):
    """Apply ``transforms`` in order; stop early when one defers the step (``accumulate``).

    ``chain(a, b)(g) = b(a(g))``; the state dict holds each member's under its index.
    """

    def __init__(self, *transforms: Transform) -> None:
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(
                    f"chain: entry {i} is {type(t).__name__}, not a polyak transform; build "
                    "it with polyak.transforms.* (e.g. clip_by_global_norm(1.0))"
                )
        self.transforms = tuple(transforms)

    def __call__(self, step: GradientStep) -> None:
        for t in self.transforms:
            t(step)
            if not step.apply:
                return

    def state_dict(self) -> dict[str, Any]:
        return {str(i): t.state_dict() for i, t in enumerate(self.transforms)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        expected = {str(i) for i in range(len(self.transforms))}
        if set(state_dict) != expected:
            raise ValueError(
                f"chain.load_state_dict: expected keys {sorted(expected)}, got "
                f"{sorted(state_dict)}; the chain must have the same transforms as when saved"
            )
        for i, t in enumerate(self.transforms):
            t.load_state_dict(state_dict[str(i)])


class clip_by_value(Transform):
    """``g = maximum(minimum(g, hi), lo)`` elementwise (``tf.clip_by_value``).

    Sparse gradients are coalesced and their values clipped.
    """

    def __init__(self, lo: float, hi: float) -> None:
        if not lo <= hi:
            raise ValueError(f"clip_by_value: need lo <= hi, got lo={lo!r}, hi={hi!r}")
        self.lo, self.hi = float(lo), float(hi)

    def __call__(self, step: GradientStep) -> None:
        runs, sparse = step.dense_runs()
        if runs:
            torch_compat.foreach_clamp_max_(runs, self.hi)
            torch_compat.foreach_clamp_min_(runs, self.lo)
        for i in sparse:
            step.grads[i] = _clip_values(step.grads[i], self.lo, self.hi)


class clip_by_norm(Transform):
    """Each gradient separately: ``g = g * c / max(||g||_2, c)`` (``tf.clip_by_norm``).

    A zero gradient stays zero. Sparse gradients are coalesced and clipped by their norm.
    """

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = _positive(clip_norm, "clip_norm", "clip_by_norm")

    def __call__(self, step: GradientStep) -> None:
        dense = [i for i, g in enumerate(step.grads) if not g.is_sparse]
        grads = [step.grads[i] for i in dense]
        if grads:
            denominators = torch_compat.foreach_norm(grads)
            torch_compat.foreach_clamp_min_(denominators, self.clip_norm)
            # TF multiplies by clip_norm before dividing: keep its rounding.
            torch_compat.foreach_mul_(grads, self.clip_norm)
            torch_compat.foreach_div_(grads, denominators)
        c = self.clip_norm
        for i, g in enumerate(step.grads):
            if g.is_sparse:
                step.grads[i] = map_values(g, lambda v: v * c / torch.clamp_min(v.norm(), c))


class clip_by_global_norm(Transform):
    """All gradients together: ``g = g * c * min(1/N, 1/c) + (N - N)`` with ``N`` the global
    norm (``tf.clip_by_global_norm``): a non-finite ``N`` makes every gradient NaN.

    ``last_norm`` holds the norm before clipping of the latest step (a 0-dim tensor, for logging).
    """

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = _positive(clip_norm, "clip_norm", "clip_by_global_norm")
        self.last_norm: torch.Tensor | None = None

    def __call__(self, step: GradientStep) -> None:
        norm = norms_squared_sum(step.grads).sqrt()
        factor = global_scale(norm, self.clip_norm)
        runs, sparse = step.dense_runs()
        if runs:
            torch_compat.foreach_mul_(runs, _cast(factor, runs[0].dtype))
        for i in sparse:
            step.grads[i] = map_values(step.grads[i], lambda v: v * factor.to(v.dtype))
        self.last_norm = norm


class scale(Transform):
    """``g = s * g`` (a learning-rate-free rescaling; ``s`` may be negative)."""

    def __init__(self, s: float) -> None:
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TypeError(f"scale: s must be a number, got {s!r}")
        self.s = float(s)

    def __call__(self, step: GradientStep) -> None:
        runs, sparse = step.dense_runs()
        if runs:
            torch_compat.foreach_mul_(runs, self.s)
        for i in sparse:
            step.grads[i] = step.grads[i] * self.s


class adaptive_clip(Transform):
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021; optax.adaptive_grad_clip).

    Per unit (a row of a weight: every dim but the first; a whole bias/scalar tensor):
    ``max = clipping * max(||w||, eps)``; ``g = g * max / max(||g||, 1e-6)`` where
    ``||g|| > max``, unchanged elsewhere. No TF equivalent. Sparse gradients are rejected.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3) -> None:
        self.clipping = _positive(clipping, "clipping", "adaptive_clip")
        self.eps = _positive(eps, "eps", "adaptive_clip", allow_zero=True)

    def __call__(self, step: GradientStep) -> None:
        _reject_sparse(step, step.dense_runs()[1], "adaptive_clip")
        for p, g in zip(step.params, step.grads):
            max_norm = _unit_norm(p.detach()).clamp_min_(self.eps).mul_(self.clipping)
            g_norm = _unit_norm(g)
            clipped = g * (max_norm / g_norm.clamp_min(1e-6))
            g.copy_(torch.where(g_norm > max_norm, clipped, g))


def _unit_norm(t: torch.Tensor) -> torch.Tensor:
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


class add_noise(Transform):
    """Annealed Gaussian noise (Neelakantan et al. 2015; optax.add_noise):
    ``g = g + N(0, eta / (1 + t)^gamma)`` at step ``t = 0, 1, ...`` (variance, not std).

    The noise comes from a generator per device seeded with ``seed``, drawn in parameter order,
    so it does not depend on how parameters are laid out in memory. Sparse gradients are
    rejected (noise would densify them).
    """

    def __init__(self, eta: float, gamma: float = 0.55, seed: int = 0) -> None:
        self.eta = _positive(eta, "eta", "add_noise", allow_zero=True)
        self.gamma = _positive(gamma, "gamma", "add_noise", allow_zero=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"add_noise: seed must be an int, got {seed!r}")
        self.seed = seed
        self.count = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen

    def __call__(self, step: GradientStep) -> None:
        _reject_sparse(step, step.dense_runs()[1], "add_noise")
        std = math.sqrt(self.eta / (1 + self.count) ** self.gamma)
        self.count += 1
        noise: list[torch.Tensor] = list(step.grads)
        for (device, dtype), idx in dense_groups(step.grads).items():
            flat = torch.randn(
                sum(step.grads[i].numel() for i in idx),
                generator=self._generator(device),
                device=device,
                dtype=dtype,
            )
            for i, piece in zip(idx, flat.split([step.grads[i].numel() for i in idx])):
                noise[i] = piece.view(step.grads[i].shape)
        runs, noise_runs = coalesce(step.grads, noise)
        torch_compat.foreach_add_(runs, noise_runs, alpha=std)

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = int(state_dict["count"])
        self._generators = {}
        for device, gen_state in state_dict["generators"].items():
            self._generator(torch.device(device)).set_state(gen_state)


class skip_nonfinite(Transform):
    """Skip the step when any gradient holds NaN or inf, keeping parameters and optimizer state.

    Decided on the device: ``finite = all(isfinite(max|g|))``; the optimizer then steps and puts
    parameters and state back where ``finite`` is false (see ``polyak.Optimizer``). ``skipped``
    and ``consecutive`` count skipped steps (device tensors). After more than
    ``max_consecutive`` skips in a row, the next step raises ``RuntimeError``: the check reads
    the counter on the host with a copy queued a step earlier, so it never waits for the
    device (on CUDA it may fire one step late).
    """

    def __init__(self, max_consecutive: int | None = None) -> None:
        if max_consecutive is not None and (
            isinstance(max_consecutive, bool)
            or not isinstance(max_consecutive, int)
            or max_consecutive < 1
        ):
            raise ValueError(
                f"skip_nonfinite: max_consecutive must be a positive int or None, got "
                f"{max_consecutive!r}"
            )
        self.max_consecutive = max_consecutive
        self.skipped: torch.Tensor | None = None
        self.consecutive: torch.Tensor | None = None
        self._mirror: _HostMirror | None = None

    def __call__(self, step: GradientStep) -> None:
        if self._mirror is not None and self.max_consecutive is not None:
            seen = self._mirror.read()
            if seen is not None and seen > self.max_consecutive:
                raise RuntimeError(
                    f"skip_nonfinite: {seen} consecutive steps had NaN/inf gradients (limit "
                    f"{self.max_consecutive}); lower the learning rate, check the loss for "
                    "NaN, or raise max_consecutive"
                )
        runs, sparse = step.dense_runs()
        peaks = list(torch_compat.foreach_norm(runs, ord=math.inf)) if runs else []
        peaks += [step.grads[i].coalesce().values().abs().amax() for i in sparse]
        device = step.grads[0].device
        finite = torch.stack([p.to(device=device, dtype=torch.float32) for p in peaks])
        bad = ~torch.isfinite(finite).all()
        if self.skipped is None or self.skipped.device != device:
            self.skipped = torch.zeros((), dtype=torch.int64, device=device)
            self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped.add_(bad)
        self.consecutive.add_(bad).mul_(bad)
        step.veto(bad)
        if self.max_consecutive is not None:
            self._mirror = self._mirror or _HostMirror()
            self._mirror.push(self.consecutive)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict["consecutive"]
        self._mirror = None


class _HostMirror:
    """A host copy of a device scalar, queued without waiting and read once it has landed."""

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None

    def push(self, value: torch.Tensor) -> None:
        if value.device.type != "cuda":
            self._host, self._event = value.detach().clone().cpu(), None
            return
        if self._host is None or self._event is None:
            self._host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self._event = torch.cuda.Event()
        self._host.copy_(value, non_blocking=True)
        self._event.record()

    def read(self) -> int | None:
        if self._host is None or (self._event is not None and not self._event.query()):
            return None
        return int(self._host)


class accumulate(Transform):
    """Gradient accumulation: the optimizer steps on every ``k``-th call with
    ``g = (g_1 + ... + g_k) / k``, the mean over the micro-steps, which is the gradient of a
    ``k``-times larger batch when the loss is a mean over equal micro-batches.

    Calls ``1..k-1`` store the gradient and defer the step (transforms after this one do not
    run); put clipping after ``accumulate`` to clip the mean. A micro-step already vetoed on
    the device (``skip_nonfinite`` before this) contributes zeros. Sparse gradients are summed
    sparse. State: the call count and the running sums.
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"accumulate: k must be a positive int, got {k!r}")
        self.k = k
        self.count = 0
        self._sums: list[torch.Tensor] | None = None

    def __call__(self, step: GradientStep) -> None:
        if self.k == 1:
            return
        grads = step.grads
        if step.skip is not None:
            keep = ~step.skip
            for i, g in enumerate(grads):
                grads[i] = map_values(g, lambda v: torch.where(keep, v, 0))
        if self.count == 0:
            self._sums = flat_like(grads, copy=False)
        elif self._sums is None or len(self._sums) != len(grads):
            raise ValueError(
                f"accumulate: micro-step {self.count + 1} has {len(grads)} gradients, the "
                f"first had {len(self._sums or [])}; every micro-step must see the same ones"
            )
        self.count += 1
        sums = self._sums
        assert sums is not None
        dense = [i for i, g in enumerate(grads) if not g.is_sparse]
        runs_s, runs_g = coalesce([sums[i] for i in dense], [grads[i] for i in dense])
        for i, g in enumerate(grads):
            if g.is_sparse:
                sums[i] = g if self.count == 1 else sums[i] + g
        if self.count < self.k:
            if runs_s:
                if self.count == 1:
                    torch_compat.foreach_copy_(runs_s, runs_g)
                else:
                    torch_compat.foreach_add_(runs_s, runs_g)
            step.apply = False
            step.skip = None
            return
        if runs_g:
            torch_compat.foreach_add_(runs_g, runs_s)
            torch_compat.foreach_div_(runs_g, float(self.k))
        for i, g in enumerate(grads):
            if g.is_sparse:
                grads[i] = (sums[i] / self.k).coalesce()
        self.count = 0
        self._sums = None

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sums": list(self._sums) if self.count else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        count = int(state_dict["count"])
        if not 0 <= count < self.k:
            raise ValueError(
                f"accumulate.load_state_dict: count must be in [0, {self.k}), got {count}"
            )
        self.count = count
        self._sums = list(state_dict["sums"]) if count else None


class masked(Transform):
    """Apply ``inner`` only to the selected parameters: those whose name is in ``select`` (a
    collection of names) or for which ``select(name, param)`` is true. Others pass unchanged.

    Names are those of ``polyak.Optimizer`` (``param_names`` of the inner optimizer's groups,
    or ``Optimizer(..., names=module)``). A deferred or vetoed step of ``inner`` applies to
    the whole step.
    """

    def __init__(
        self,
        inner: Transform,
        select: Collection[str] | Callable[[str, torch.Tensor], bool],
    ) -> None:
        if not isinstance(inner, Transform):
            raise TypeError(f"masked: inner must be a polyak transform, got {type(inner).__name__}")
        if isinstance(select, str):
            raise TypeError("masked: select is a single string; pass a list of names, e.g. [name]")
        self.inner = inner
        self.select = select

    def _chosen(self, name: str, param: torch.Tensor) -> bool:
        if callable(self.select):
            return bool(self.select(name, param))
        return name in self.select

    def __call__(self, step: GradientStep) -> None:
        idx = [i for i, (n, p) in enumerate(zip(step.names, step.params)) if self._chosen(n, p)]
        if not idx:
            return
        sub = GradientStep(
            [step.params[i] for i in idx],
            [step.grads[i] for i in idx],
            [step.names[i] for i in idx],
        )
        sub.skip = step.skip
        self.inner(sub)
        for j, i in enumerate(idx):
            step.grads[i] = sub.grads[j]
        step.apply = sub.apply
        step.skip = sub.skip

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
