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

import copy
import math
import operator
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from polyak import _torch_compat as torch_compat
from polyak._checks import check_device, check_int, check_mapping, check_real
from polyak.flat import coalesce, pack_like, span
from polyak.grad._buffers import RunCache
from polyak.grad.clipping import (
    as_dtype,
    dense_and_sparse,
    global_scale,
    map_values,
    norms_squared_sum,
)
from polyak.grad.clipping import (
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

    __slots__ = ("_known", "_memo", "_names", "_runs", "apply", "grads", "params", "skip")

    def __init__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        names: list[str] | Callable[[], list[str]],
        *,
        runs: RunCache | None = None,
        known_names: Collection[str] | Callable[[], Collection[str]] | None = None,
    ) -> None:
        if len(params) != len(grads) or (not callable(names) and len(names) != len(params)):
            sizes = [len(params), len(grads), "?" if callable(names) else len(names)]
            raise ValueError(f"GradientStep: params, grads and names must be parallel, got {sizes}")
        self.params = params
        self.grads = grads
        self._names = names
        self._known = known_names
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

    @property
    def known_names(self) -> Collection[str]:
        """Every name the optimizer knows (its parameters', also those not in this step);
        this step's names when not given."""
        if callable(self._known):
            self._known = self._known()
        return self.names if self._known is None else self._known

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
    """Base class: ``__call__(step)`` edits a :class:`GradientStep`; stateless by default.

    Loading is two steps, so that a chain (or ``polyak.Optimizer``) checks every member's
    state before any member changes: ``_check_state(state_dict)`` validates and returns the
    state to take (raising ``ValueError``/``TypeError`` naming what does not fit, changing
    nothing), ``_set_state(checked)`` takes it and cannot fail. A subclass with state
    overrides both; one that overrides ``load_state_dict`` instead is loaded through it, and
    put back from a copy of its ``state_dict()`` if a later member fails.
    """

    def __call__(self, step: GradientStep) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` returned; a state dict that does not fit raises before
        anything changes."""
        self._set_state(self._check_state(state_dict))

    def _check_state(self, state_dict: Mapping[str, Any]) -> Any:
        who = f"{type(self).__name__}.load_state_dict"
        check_mapping(state_dict, "state_dict", who)
        if state_dict:
            raise ValueError(
                f"{who}: this transform has no state, got keys {sorted(map(str, state_dict))}"
            )
        return None

    def _set_state(self, checked: Any) -> None:
        pass

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


class _Unchecked:
    """The state for a member transform that loads through its own ``load_state_dict``."""

    __slots__ = ("state",)

    def __init__(self, state: Any) -> None:
        self.state = state


def checked_state(t: Transform, state: Any) -> Any:
    """``t``'s checked form of ``state`` (raises, changing nothing, if it does not fit), for
    :func:`set_states`."""
    if type(t).load_state_dict is not Transform.load_state_dict:
        return _Unchecked(state)
    return t._check_state(state)


def set_states(members: Sequence[tuple[Transform, Any]]) -> None:
    """Set checked states; members loading through their own ``load_state_dict`` go first,
    and are put back as they were if one of them raises."""
    touched: list[tuple[Transform, dict[str, Any]]] = []
    try:
        for t, checked in members:
            if isinstance(checked, _Unchecked):
                touched.append((t, copy.deepcopy(t.state_dict())))
                t.load_state_dict(checked.state)
    except BaseException:
        for t, before in reversed(touched):  # the failing one too: it may have half-loaded
            t.load_state_dict(before)
        raise
    for t, checked in members:
        if not isinstance(checked, _Unchecked):
            t._set_state(checked)


def _keys(state: Mapping[str, Any], expected: set[str], who: str, form: str) -> None:
    if set(state) != expected:
        raise ValueError(f"{who}: expected {form}, got keys {sorted(map(str, state))}")


_NO_CLIPPING = "omit the transform for no clipping"


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

    def _check_state(self, state_dict: Mapping[str, Any]) -> Any:
        check_mapping(state_dict, "state_dict", "chain.load_state_dict")
        expected = {str(i) for i in range(len(self.transforms))}
        if set(state_dict) != expected:
            raise ValueError(
                f"chain.load_state_dict: expected keys {sorted(expected)}, got "
                f"{sorted(map(str, state_dict))}; the chain must have the same transforms as "
                "when saved"
            )
        return [(t, checked_state(t, state_dict[str(i)])) for i, t in enumerate(self.transforms)]

    def _set_state(self, checked: Any) -> None:
        set_states(checked)


class clip_by_value(Transform):
    """``g = maximum(minimum(g, hi), lo)`` elementwise (``tf.clip_by_value``).

    Sparse gradients are coalesced and their values clipped.
    """

    def __init__(self, lo: float, hi: float) -> None:
        # An infinite bound is a one-sided clip (nothing turns NaN); NaN is refused.
        lo = check_real(lo, "lo", "clip_by_value", allow_infinite=True)
        hi = check_real(hi, "hi", "clip_by_value", allow_infinite=True)
        if not lo <= hi:
            raise ValueError(f"clip_by_value: need lo <= hi, got lo={lo!r}, hi={hi!r}")
        if lo == -math.inf and hi == math.inf:
            raise ValueError(
                "clip_by_value: lo=-inf and hi=inf clip nothing; omit the transform for no "
                "clipping"
            )
        self.lo, self.hi = lo, hi

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
        self.clip_norm = check_real(
            clip_norm, "clip_norm", "clip_by_norm", low=0.0, low_open=True, hint=_NO_CLIPPING
        )

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
        self.clip_norm = check_real(
            clip_norm,
            "clip_norm",
            "clip_by_global_norm",
            low=0.0,
            low_open=True,
            hint=f"{_NO_CLIPPING} (TF's inf clip_norm turns every gradient NaN)",
        )
        self.last_norm: torch.Tensor | None = None

    def __call__(self, step: GradientStep) -> None:
        norm = norms_squared_sum(step.grads).sqrt()
        factor = global_scale(norm, self.clip_norm)
        runs, sparse = step.dense_runs()
        if runs:
            torch_compat.foreach_mul_(runs, as_dtype(factor, runs[0].dtype))
        for i in sparse:
            step.grads[i] = map_values(step.grads[i], lambda v: v * factor.to(v.dtype))
        self.last_norm = norm


class scale(Transform):
    """``g = s * g`` (a learning-rate-free rescaling; ``s`` may be negative)."""

    def __init__(self, s: float) -> None:
        self.s = check_real(
            s, "s", "scale", hint="use a finite scale (omit the transform to keep the gradients)"
        )

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
        self.clipping = check_real(
            clipping, "clipping", "adaptive_clip", low=0.0, low_open=True, hint=_NO_CLIPPING
        )
        self.eps = check_real(eps, "eps", "adaptive_clip", low=0.0)

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
        self.eta = check_real(
            eta, "eta", "add_noise", low=0.0, hint="use a finite variance (omit the transform "
            "for no noise)"
        )
        self.gamma = check_real(
            gamma, "gamma", "add_noise", low=0.0, hint="use a finite decay exponent (0: constant)"
        )
        self.seed = check_int(seed, "seed", "add_noise")
        if not -(2**63) <= self.seed < 2**64:
            raise ValueError(
                f"add_noise: seed must be in [-2**63, 2**64) (a torch.Generator seed), got {seed}"
            )
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
        noise = pack_like(step.grads)
        buffers: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for piece in noise:
            buffers.setdefault((piece.device, piece.dtype), []).append(piece)
        for (device, _), pieces in buffers.items():  # one draw per buffer, in parameter order
            span(pieces, 0, len(pieces)).normal_(generator=self._generator(device))
        runs, noise_runs = coalesce(step.grads, noise)
        torch_compat.foreach_add_(runs, noise_runs, alpha=std)

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
        }

    def _check_state(self, state_dict: Mapping[str, Any]) -> Any:
        who = "add_noise.load_state_dict"
        check_mapping(state_dict, "state_dict", who)
        _keys(state_dict, {"count", "generators"}, who, "{'count': int, 'generators': {...}}")
        count = check_int(state_dict["count"], "'count'", who, low=0)
        gens = check_mapping(state_dict["generators"], "'generators'", who)
        states = {}
        for device, gen_state in gens.items():
            where = check_device(device, f"the 'generators' key {device!r}", who)
            trial = torch.Generator(device=where)
            try:
                if not isinstance(gen_state, torch.Tensor):
                    raise TypeError(type(gen_state).__name__)
                trial.set_state(gen_state)
            except (TypeError, RuntimeError) as e:
                raise ValueError(
                    f"{who}: 'generators'[{device!r}] is not the state of a {where.type} "
                    f"torch.Generator ({str(e).strip().splitlines()[0]})"
                ) from None
            states[where] = gen_state
        return count, states

    def _set_state(self, checked: Any) -> None:
        count, states = checked
        self.count = count
        self._generators = {}
        for device, gen_state in states.items():
            self._generator(device).set_state(gen_state)


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
        if max_consecutive is not None:
            max_consecutive = check_int(max_consecutive, "max_consecutive", "skip_nonfinite", low=1)
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

    def _check_state(self, state_dict: Mapping[str, Any]) -> Any:
        who = "skip_nonfinite.load_state_dict"
        check_mapping(state_dict, "state_dict", who)
        form = "{'skipped': tensor or None, 'consecutive': tensor or None}"
        _keys(state_dict, {"skipped", "consecutive"}, who, form)
        skipped, consecutive = state_dict["skipped"], state_dict["consecutive"]
        if skipped is None and consecutive is None:
            return None, None
        for key, t in (("skipped", skipped), ("consecutive", consecutive)):
            if not (
                isinstance(t, torch.Tensor)
                and t.ndim == 0
                and not t.is_floating_point()
                and not t.is_complex()
                and t.dtype != torch.bool
            ):
                raise TypeError(
                    f"{who}: '{key}' must be a 0-dim integer tensor (or both None), got {t!r}"
                )
        if skipped.device != consecutive.device:
            raise ValueError(f"{who}: 'skipped' and 'consecutive' are on different devices")
        # Read on the host once, at load time.
        if not bool((consecutive >= 0) & (consecutive <= skipped)):
            raise ValueError(
                f"{who}: need 0 <= 'consecutive' <= 'skipped', got {int(consecutive)} and "
                f"{int(skipped)}"
            )
        return skipped, consecutive

    def _set_state(self, checked: Any) -> None:
        skipped, consecutive = checked
        # Copies: the counters are updated in place, the caller's state dict must not move.
        self.skipped = None if skipped is None else skipped.to(torch.int64, copy=True)
        self.consecutive = None if consecutive is None else consecutive.to(torch.int64, copy=True)
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
        self.k = check_int(k, "k", "accumulate", low=1)
        self.count = 0
        self._sums: list[torch.Tensor] | None = None
        # The first micro-step's variables and their names (None after load_state_dict:
        # then shapes are checked).
        self._first: tuple[list[torch.Tensor], list[str] | Callable[[], list[str]]] | None = None

    def __call__(self, step: GradientStep) -> None:
        if self.k == 1:
            return
        grads = step.grads
        if self.count:
            self._check_same_variables(step)
        if step.skip is not None:
            keep = ~step.skip
            for i, g in enumerate(grads):
                grads[i] = map_values(g, lambda v: torch.where(keep, v, 0))
        if self.count == 0:
            self._sums = pack_like(grads)
            self._first = (list(step.params), step._names)
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
        self._first = None

    def _check_same_variables(self, step: GradientStep) -> None:
        """Micro-step ``count + 1`` must have the first one's variables, in the same order
        (the running sums are positional); raises naming them, before anything changes."""
        sums, first = self._sums or [], self._first
        if len(step.params) == len(sums) and (
            all(map(_is, first[0], step.params))
            if first is not None
            else all(
                s.shape == g.shape and s.dtype == g.dtype and s.device == g.device
                for s, g in zip(sums, step.grads)
            )
        ):
            return
        if first is None:
            had = f"{len(sums)} of shapes {[tuple(t.shape) for t in sums[:10]]}"
        else:
            names = first[1]() if callable(first[1]) else first[1]
            had = f"{len(names)}: {names[:10]}"
        raise ValueError(
            f"accumulate: the variables changed in the middle of an accumulation: micro-step "
            f"{self.count + 1} of {self.k} has {len(step.params)}: {step.names[:10]}, the first "
            f"had {had}. Every micro-step must apply gradients to the same variables; finish "
            "the accumulation (or build a new accumulate) before changing them."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sums": list(self._sums) if self.count else None}

    def _check_state(self, state_dict: Mapping[str, Any]) -> Any:
        who = "accumulate.load_state_dict"
        check_mapping(state_dict, "state_dict", who)
        _keys(state_dict, {"count", "sums"}, who, "{'count': int, 'sums': list or None}")
        count = check_int(state_dict["count"], "'count'", who, low=0)
        if count >= self.k:
            raise ValueError(f"{who}: 'count' must be in [0, {self.k}), got {count}")
        sums = state_dict["sums"]
        if count == 0:
            if sums is not None:
                raise ValueError(f"{who}: 'sums' must be None when 'count' is 0")
            return 0, None
        if not (
            isinstance(sums, (list, tuple))
            and sums
            and all(isinstance(t, torch.Tensor) for t in sums)
        ):
            raise TypeError(f"{who}: 'sums' must be a non-empty list of tensors, got {sums!r}")
        return count, sums

    def _set_state(self, checked: Any) -> None:
        count, sums = checked
        self.count = count
        # Copies: the sums are added to in place, the caller's state dict must not move.
        self._sums = None if sums is None else [t.clone() for t in sums]
        self._first = None


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
        if not callable(select):
            if not isinstance(select, Collection) or not all(isinstance(n, str) for n in select):
                raise TypeError(
                    "masked: select must be a collection of parameter names or a predicate "
                    f"(name, param) -> bool, got {select!r}"
                )
            if not select:
                raise ValueError("masked: select is empty, so nothing would be masked in; omit "
                                 "the transform instead")
            select = frozenset(select)
        self.inner = inner
        self.select = select
        self._checked_names = False

    def _chosen(self, name: str, param: torch.Tensor) -> bool:
        if callable(self.select):
            return bool(self.select(name, param))
        return name in self.select

    def _check_names(self, step: GradientStep) -> None:
        """Every selected name must name a parameter (checked once, at the first step)."""
        known = step.known_names
        unknown = sorted(n for n in self.select if n not in known)  # type: ignore[union-attr]
        if unknown:
            raise ValueError(
                f"masked: {unknown} name no parameter (a typo?); the parameters are named "
                f"{sorted(known)[:20]}{' ...' if len(known) > 20 else ''}"
            )
        self._checked_names = True

    def __call__(self, step: GradientStep) -> None:
        if not self._checked_names and not callable(self.select):
            self._check_names(step)
        idx = [i for i, (n, p) in enumerate(zip(step.names, step.params)) if self._chosen(n, p)]
        if not idx:
            return
        sub = GradientStep(
            [step.params[i] for i in idx],
            [step.grads[i] for i in idx],
            [step.names[i] for i in idx],
            known_names=lambda: step.known_names,
        )
        sub.skip = step.skip
        self.inner(sub)
        for j, i in enumerate(idx):
            step.grads[i] = sub.grads[j]
        step.apply = sub.apply
        step.skip = sub.skip

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def _check_state(self, state_dict: Mapping[str, Any]) -> Any:
        return [(self.inner, checked_state(self.inner, state_dict))]

    def _set_state(self, checked: Any) -> None:
        set_states(checked)
