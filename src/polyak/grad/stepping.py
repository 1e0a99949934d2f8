"""Stepping a torch optimizer on given gradients: on flat buffers when it can, with an
on-device undo for vetoed steps.

Flat path. When every parameter of a param group has a gradient and the parameters and
gradients lie back to back in memory (:func:`polyak.flatten_parameters_`), the group is stepped
by a *twin*: an instance of the inner optimizer's class whose parameters are the contiguous
runs (one tensor per buffer). Its state tensors are flat too, and the inner optimizer's
per-parameter state entries are made *views* into them (0-dim entries such as Adam's ``step``
are the same tensor object), so ``inner.state`` stays the one source of truth and either
path can take the next step. Hyper-parameters are copied from ``inner.param_groups`` before
every twin step, so LR schedulers attached to the inner optimizer work as usual. Only
optimizers whose update is elementwise are twinned (SGD, Adam, AdamW, without
``differentiable``): the twin then computes exactly the same numbers as the inner optimizer
over the same implementation (for-loop, foreach or fused), just in fewer kernels.

Anything else falls back to the inner optimizer on the original parameters: a parameter
without a gradient, memory that is no longer contiguous, a new ``inner.state``
(``load_state_dict``). A group leaving the flat path first gets private copies of its shared
0-dim state; it comes back when its parameters' scalar state agrees again (checked once, on the
host, which syncs if that state lives on an accelerator: capturable or fused optimizers).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from polyak.flat import coalesce, span
from polyak.grad._buffers import RunCache

__all__ = ["InnerStepper"]

_TWINNABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_NOT_HYPER = ("params", "param_names")


class _Twin:
    """A flat stand-in for param group ``index``: its runs, their optimizer, the layout key."""

    def __init__(self, inner: torch.optim.Optimizer, index: int, runs: list[torch.Tensor]) -> None:
        group = inner.param_groups[index]
        self.index = index
        self.key = _layout(runs)
        self.runs = [r.detach() for r in runs]
        accepted = inspect.signature(type(inner)).parameters
        hyper = {k: v for k, v in group.items() if k in accepted and k not in _NOT_HYPER}
        self.opt = type(inner)(self.runs, **hyper)
        # The group's params in each run, in order.
        self.members: list[list[torch.Tensor]] = []
        params = iter(group["params"])
        for run in runs:
            ms, n = [], 0
            while n < run.numel():
                ms.append(next(params))
                n += ms[-1].numel()
            self.members.append(ms)
        self.members[-1] += list(params)  # trailing empty parameters, if any


def _layout(runs: Sequence[torch.Tensor]) -> tuple:
    return tuple((r.data_ptr(), r.numel(), r.dtype, r.device) for r in runs)


class InnerStepper:
    """Steps ``inner`` with given gradients (see the module docstring)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.flat = type(inner) in _TWINNABLE
        self._twins: dict[int, _Twin] = {}
        self._failed: dict[int, tuple] = {}  # group -> layout whose state could not be merged
        self._state_obj: object = inner.state
        self._member_layouts: dict[int, RunCache] = {}  # group -> its parameters' runs

    def reset(self) -> None:
        """Forget the flat twins (after ``inner.state`` was replaced)."""
        self._twins.clear()
        self._failed.clear()
        self._state_obj = self.inner.state

    def step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        skip: torch.Tensor | None,
    ) -> None:
        """One optimizer step of ``params`` with ``grads``; other parameters do not move.

        With ``skip`` (0-dim bool), parameters and optimizer state are put back where it is
        true, without leaving the device.
        """
        inner = self.inner
        if self._state_obj is not inner.state:
            self.reset()
        given = {id(p): g for p, g in zip(params, grads)}
        twinned: list[tuple[_Twin, list[torch.Tensor]]] = []  # (twin, gradient runs)
        plain: list[tuple[dict[str, Any], list, list]] = []  # (group, params, grads): no twin
        # What the step changes: (tensor, its optimizer state) for the undo of a vetoed step.
        stepped: list[tuple[torch.Tensor, dict[str, Any]]] = []
        for gi, group in enumerate(inner.param_groups):
            gs = [given.get(id(p)) for p in group["params"]]
            found = self._flat_twin(gi, gs) if self.flat else None
            if found is not None:
                twinned.append(found)
                stepped += [(r, found[0].opt.state) for r in found[0].runs]
                continue
            self._retire(gi)
            ps = [p for p, g in zip(group["params"], gs) if g is not None]
            plain.append((group, ps, [g for g in gs if g is not None]))
            stepped += [(p, inner.state) for p in ps]
        bound: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (param, .grad to restore)
        try:
            undo, fresh = _snapshot(stepped) if skip is not None else ([], [])
            if skip is not None and any(t.device != skip.device for t, _ in undo):
                # State on another device (e.g. Adam's CPU step count when not capturable):
                # a where() cannot reach it, so the host decides (one sync per step).
                if bool(skip):
                    return
                undo, fresh, skip = [], [], None
            for twin, grad_runs in twinned:
                self._step_twin(twin, grad_runs)
            # Through inner.step(), with .grad set for exactly the plain parameters; also when
            # twins did all the work (with no .grad set it touches nothing), so that step
            # hooks and LR schedulers see every step.
            live = {id(p): g for _, ps, gs in plain for p, g in zip(ps, gs)}
            for group in inner.param_groups:
                for p in group["params"]:
                    g = live.get(id(p))
                    if p.grad is not g:
                        bound.append((p, p.grad))
                        p.grad = g
            inner.step()
            for t, old in undo:
                t.copy_(torch.where(skip, old, t))  # type: ignore[arg-type]
            if any(state.get(t) for t, state in fresh) and bool(skip):
                # This step created optimizer state (a first step): a vetoed one must not
                # leave it behind. Deleting is a host decision: one sync, on first steps only.
                self._drop_state(fresh, twinned)
        finally:
            for p, g in reversed(bound):
                p.grad = g

    def _drop_state(
        self,
        fresh: list[tuple[torch.Tensor, dict]],
        twinned: list[tuple[_Twin, list[torch.Tensor]]],
    ) -> None:
        for t, state in fresh:
            state.pop(t, None)
        for twin, _ in twinned:
            for run, members in zip(twin.runs, twin.members):
                if run not in twin.opt.state:
                    for p in members:
                        self.inner.state.pop(p, None)

    # ------------------------------------------------------------------ flat twins

    def _flat_twin(
        self, gi: int, gs: list[torch.Tensor | None]
    ) -> tuple[_Twin, list[torch.Tensor]] | None:
        """The twin that can step group ``gi`` with gradients ``gs`` and the gradient runs."""
        group = self.inner.param_groups[gi]
        if group.get("differentiable") or any(g is None or g.is_sparse for g in gs):
            return None
        members = group["params"]
        if group.get("fused") and members[0].device.type == "cpu":
            # The CPU fused kernels round vector lanes and loop tails differently, so results
            # would depend on where a tensor starts in the buffer: keep them per tensor.
            return None
        layouts = self._member_layouts.get(gi)
        if layouts is None:
            layouts = self._member_layouts[gi] = RunCache()
        if not layouts.layout(members)[2]:
            return None  # no two parameters share memory: nothing to merge (pointer check)
        runs, grad_runs = coalesce(members, gs)  # type: ignore[arg-type]
        if len(runs) < len(members) and _per_tensor_loop(group, members[0]):
            runs, grad_runs = _chunks(members, gs, runs, grad_runs)  # type: ignore[arg-type]
        if len(runs) == len(members):
            return None  # nothing merged: the inner optimizer is as fast
        key = _layout(runs)
        twin = self._twins.get(gi)
        if twin is not None and twin.key == key:
            return twin, grad_runs
        self._retire(gi)
        if self._failed.get(gi) == key:
            return None
        twin = self._build(gi, runs)
        if twin is None:
            self._failed[gi] = key
            return None
        self._twins[gi] = twin
        return twin, grad_runs

    def _build(self, gi: int, runs: list[torch.Tensor]) -> _Twin | None:
        """A twin over ``runs``, its state merged from the members' (None if they disagree)."""
        twin = _Twin(self.inner, gi, runs)
        for run, members in zip(twin.runs, twin.members):
            states = [self.inner.state.get(p, {}) for p in members]
            if not any(states):
                continue  # fresh: the twin's first step creates it
            merged = _merge_state(states, members, run)
            if merged is None:
                return None
            twin.opt.state[run] = merged
            self._alias(merged, run, members)
        return twin

    def _step_twin(self, twin: _Twin, grad_runs: list[torch.Tensor]) -> None:
        tgroup = twin.opt.param_groups[0]
        for k, v in self.inner.param_groups[twin.index].items():
            if k not in _NOT_HYPER:
                tgroup[k] = v
        fresh = [run not in twin.opt.state for run in twin.runs]
        for run, g in zip(twin.runs, grad_runs):
            run.grad = g
        try:
            twin.opt.step()
        finally:
            for run in twin.runs:
                run.grad = None
        for run, members, new in zip(twin.runs, twin.members, fresh):
            if new:
                self._alias(twin.opt.state[run], run, members)

    def _alias(
        self, flat_state: dict[str, Any], run: torch.Tensor, members: list[torch.Tensor]
    ) -> None:
        """Make ``inner.state[p]`` entries views of ``flat_state``, the state of ``run``:
        per-element entries (shaped as the run) are cut at the members' offsets, shared ones
        (Adam's ``step``) are the same tensor."""
        total = run.numel()
        offset = 0
        for p in members:
            n = p.numel()
            entry = {}
            for k, v in flat_state.items():
                if _per_element(k, v, run) and n != total:
                    # A merged run is 1-D and contiguous, and so is its state: a view.
                    v = v.reshape(-1)[offset : offset + n].view(p.shape)
                entry[k] = v
            self.inner.state[p] = entry
            offset += n

    def _retire(self, gi: int) -> None:
        """Take group ``gi`` off the flat path: its params get private 0-dim state."""
        twin = self._twins.pop(gi, None)
        if twin is None:
            return
        for members in twin.members:
            for p in members:
                entry = self.inner.state.get(p, {})
                for k, v in entry.items():
                    if isinstance(v, torch.Tensor) and v.ndim == 0:
                        entry[k] = v.clone()


# A CPU for-loop step makes ~10 passes over each tensor before the next one: over a whole
# flat buffer those passes stream from memory, over L2-sized pieces they stay in cache.
_CPU_CHUNK = 1 << 17  # elements (512 KB of fp32, a few arrays of it fit in a 1 MB L2)


def _per_tensor_loop(group: dict[str, Any], p: torch.Tensor) -> bool:
    """Whether the group's optimizer steps tensor by tensor on the CPU (torch's default there:
    neither ``foreach`` nor ``fused``)."""
    return p.device.type == "cpu" and not group.get("foreach") and not group.get("fused")


def _chunks(
    members: list[torch.Tensor],
    gs: list[torch.Tensor],
    runs: list[torch.Tensor],
    grad_runs: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``runs`` cut at parameter boundaries into pieces of about ``_CPU_CHUNK`` elements (a
    parameter larger than that is a piece of its own). Elementwise updates give the same bits
    whatever the cut."""
    if any(m.numel() == 0 for m in members):
        return runs, grad_runs
    out_p: list[torch.Tensor] = []
    out_g: list[torch.Tensor] = []
    i = 0
    for run in runs:
        total, n = run.numel(), 0
        start, size = i, 0
        while n < total:
            m = members[i].numel()
            if size and size + m > _CPU_CHUNK:
                out_p.append(span(members, start, i))
                out_g.append(span(gs, start, i))
                start, size = i, 0
            size += m
            n += m
            i += 1
        out_p.append(span(members, start, i))
        out_g.append(span(gs, start, i))
    return out_p, out_g


def _snapshot(
    stepped: list[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, dict]]]:
    """Copies of the tensors and existing state a step changes, and the stepped tensors that
    have no state yet."""
    undo, fresh = [], []
    for t, state in stepped:
        entry = state.get(t)
        if not entry:
            fresh.append((t, state))
        targets = [t.detach()]
        targets += [v for v in (entry or {}).values() if isinstance(v, torch.Tensor)]
        undo += [(v, v.clone()) for v in targets]
    return undo, fresh


# The twinnable optimizers' state that is one number for a whole tensor (Adam's step count),
# whatever the tensor's shape; their other tensor state holds one number per element.
_SHARED_STATE = frozenset({"step"})


def _per_element(key: str, value: Any, param: torch.Tensor) -> bool:
    """Whether optimizer state ``value`` under ``key`` holds one number per element of
    ``param`` (Adam's moments, SGD's momentum) rather than one for the whole tensor."""
    return (
        isinstance(value, torch.Tensor) and key not in _SHARED_STATE and value.shape == param.shape
    )


def _merge_state(
    states: list[dict[str, Any]], members: list[torch.Tensor], run: torch.Tensor
) -> dict[str, Any] | None:
    """The state of ``run`` from its members' states (None when they cannot be one).

    Per-element entries are concatenated in member order and shaped as ``run`` (a merged run
    is 1-D; a run of one parameter is that parameter, in its own shape), shared entries must
    agree among the members.
    """
    keys = states[0].keys()
    if any(s.keys() != keys for s in states):
        return None
    merged: dict[str, Any] = {}
    for k in keys:
        values = [s[k] for s in states]
        first = values[0]
        per_element = [_per_element(k, v, p) for v, p in zip(values, members)]
        if any(per_element):
            if not all(per_element) or any(v.dtype != first.dtype for v in values):
                return None
            merged[k] = torch.cat([v.reshape(-1) for v in values]).view(run.shape)
        elif isinstance(first, torch.Tensor):
            # Shared 0-dim state (Adam's step) must agree; comparing device values syncs.
            if any(
                not isinstance(v, torch.Tensor) or v.ndim != 0 or not torch.equal(v, first)
                for v in values
            ):
                return None
            merged[k] = first.clone()
        else:
            if any(v != first for v in values):
                return None
            merged[k] = first
    return merged
