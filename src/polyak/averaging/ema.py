"""Exponential moving averages of tensors: TensorFlow's ``tf.train.ExponentialMovingAverage``.

Per tracked entry, one update step is::

    shadow = decay * shadow + (1 - decay) * value        # a lerp towards value

with ``decay = min(decay, (1 + n) / (10 + n))`` when ``num_updates`` is given, computed in
float32 as TF does. Shadows of *variables* (parameters, module buffers, leaf tensors that
require grad) start at the variable's value; shadows of *values* (a loss, a batch statistic)
start at zero and, with ``zero_debias=True``, are bias-corrected exactly as TF's
``assign_moving_average(..., zero_debias=True)``.

This module is the facade; each concept behind it is a module of its own:

- :mod:`polyak.averaging.decay`: what each call does (copy, nothing, or a lerp with which
  weight), TF's float32 decay arithmetic, the zero-debias factor;
- :mod:`polyak.averaging.entries`: the tracked entries, their TF-style names, the checks of
  a ``var_list``;
- :mod:`polyak.averaging.plan`: the kernels of a step over memory (shadows in one buffer per
  (device, dtype), merged spans, one ``lerp_`` for a flattened model);
- :mod:`polyak.averaging.values`: TF's ``assign_moving_average`` for values;
- :mod:`polyak.averaging.interop`: ``copy_to``, ``average_parameters``, ``average_module``;
- :mod:`polyak.averaging.state`: ``state_dict`` and its checked loading.

Nothing in a step waits for the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polyak._checks import check_bool, check_device, check_dtype
from polyak.averaging import interop, state
from polyak.averaging.decay import Decay, DecayRule, NumUpdates, Weight
from polyak.averaging.entries import Entry, Registry, VarList, check_unchanged
from polyak.averaging.names import BufferPolicy, canonical_name
from polyak.averaging.plan import Plans, UpdatePlan
from polyak.averaging.state import IncompatibleKeys
from polyak.averaging.values import average_value, copy_value

__all__ = ["ExponentialMovingAverage", "IncompatibleKeys"]


class ExponentialMovingAverage:
    """Shadow copies of tensors that follow them with an exponential moving average.

    Args:
        decay: a float in [0, 1], or a schedule ``callable(step) -> float`` (see
            :mod:`polyak.schedules`); ``step`` counts the averaging steps taken so far.
        num_updates: ``None``, an ``int``, a 0-dim tensor or a :class:`polyak.GlobalStep`,
            read at each step: ``decay = min(decay, (1 + n) / (10 + n))``, in float32 as TF.
        zero_debias: bias-correct the shadows of *values* (they start at zero), as TF.
        name: the suffix of shadow names, ``"<variable>/<name>"``.
        update_every: average on every ``k``-th call only. The decay is then ``decay ** k``
            (same averaging horizon in steps) unless ``compound_decay=False``.
        update_after: the first ``update_after`` calls copy the variables instead of
            averaging (schedules then start at step 0).
        compound_decay: see ``update_every``.
        shadow_dtype: dtype of the shadows of floating entries (e.g. ``torch.float32`` for a
            bf16 model: bf16 cannot represent a 1e-4 step of a decay-0.9999 average).
        device: where shadows live (e.g. ``"cpu"`` to keep them off the accelerator).
        buffers: a module's persistent buffers: ``"average"`` floating ones (integer ones are
            copied), ``"copy"`` all, or ``"ignore"``.
        exact_tf: update variables with TF's op sequence ``v -= (v - value) * (1 - decay)``,
            each op rounded on its own, which is bitwise TF's float32 result. The default
            fused lerp rounds once (it is the more accurate of the two) and runs at the memory
            roofline, but may differ from TF by an ulp per step. Values always use TF's ops.

    TF equivalent: ``tf.train.ExponentialMovingAverage(decay, num_updates, zero_debias, name)``;
    ``apply`` creates the shadows and takes one step, ``update()`` is running the returned op.
    """

    def __init__(
        self,
        decay: Decay = 0.999,
        num_updates: NumUpdates = None,
        zero_debias: bool = False,
        name: str = "ExponentialMovingAverage",
        *,
        update_every: int = 1,
        update_after: int = 0,
        compound_decay: bool = True,
        shadow_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        buffers: BufferPolicy = "average",
        exact_tf: bool = False,
    ) -> None:
        who = "ExponentialMovingAverage"
        self._rule = DecayRule(
            decay,
            num_updates,
            update_every=update_every,
            update_after=update_after,
            compound_decay=compound_decay,
            who=who,
        )
        if shadow_dtype is not None:
            shadow_dtype = check_dtype(shadow_dtype, "shadow_dtype", who)
        if buffers not in ("average", "copy", "ignore"):
            raise ValueError(
                f"{who}: buffers must be 'average', 'copy' or 'ignore', got {buffers!r}"
            )
        if not isinstance(name, str) or not name:
            raise TypeError(f"{who}: name must be a non-empty string, got {name!r}")
        self.zero_debias = check_bool(zero_debias, "zero_debias", who)
        self.name = name
        self.shadow_dtype = shadow_dtype
        self.device = check_device(device, "device", who) if device is not None else None
        self.buffers: BufferPolicy = buffers
        self.exact_tf = check_bool(exact_tf, "exact_tf", who)
        self._registry = Registry()
        self._plans = Plans()
        self._step = 0

    # ------------------------------------------------------------------ public API

    @property
    def step(self) -> int:
        """Calls to :meth:`apply`/:meth:`update` so far (copy and skipped calls included)."""
        return self._step

    @property
    def decay(self) -> float | torch.Tensor:
        """The decay the next averaging step will use (after schedule and ``num_updates``)."""
        return self._rule.decay_at(max(self._step - self._rule.update_after, 0))

    @property
    def update_every(self) -> int:
        return self._rule.update_every

    @property
    def update_after(self) -> int:
        return self._rule.update_after

    @property
    def compound_decay(self) -> bool:
        return self._rule.compound_decay

    def apply(self, var_list: VarList | None = None) -> None:
        """Track new entries of ``var_list``, then take one step for every entry listed.

        ``var_list`` is a module (its parameters and buffers, by qualified name), a mapping
        ``{name: tensor}``, or an iterable of variables (keyed by identity). New variables
        get a shadow equal to their value, new values (tensors that are not variables) a
        zero shadow. Entries tracked earlier but not listed are left alone, as in TF.
        ``None`` (TF's default, "all variables") is :meth:`update`.
        """
        if var_list is None:
            self.update()
            return
        weight = self._rule.weight(self._step)  # a bad schedule raises before any change
        variables, values = self._prepare(var_list)
        key = tuple(e.name for e in variables)
        plan = self._plans.get(key, self._registry.generation) or self._new_plan(key, variables)
        for entry, value in values:
            check_unchanged(entry, value)
        self._take_step(plan, values, weight)

    def track(self, var_list: VarList) -> None:
        """Create shadows for the new entries of ``var_list`` without taking a step.

        Useful to build an average up front (a target network starts equal to its online
        network); :meth:`apply` is ``track`` followed by one step over the listed entries.
        """
        self._prepare(var_list)

    def update(self) -> None:
        """One step for every tracked variable, reading its current value.

        A variable tracked from a module must still be that module's tensor: after
        ``m.weight = nn.Parameter(...)`` (or ``load_state_dict(assign=True)``) this raises
        ``ValueError`` naming it, instead of averaging the tensor the model dropped; call
        ``ema.track(model)`` (or ``apply(model)``) to follow the new one.
        """
        plan, weight = self._pending_update()
        if plan is None:
            self._step += 1
            return
        single = plan.single
        if single is not None and type(weight) is float and not self.exact_tf:
            # The hot path, without further calls. Weight 1 (decay 0: a hard target's copy) is
            # a copy: lerp's b - (b - a) * 0 would turn an inf on either side into NaN.
            if weight == 1.0:
                single[0].copy_(single[1])
            else:
                single[0].lerp_(single[1], weight)
            self._step += 1
            return
        self._take_step(plan, (), weight)

    def average(self, var: torch.Tensor | str) -> torch.Tensor | None:
        """The shadow of ``var`` (a tracked tensor or its name), or ``None``."""
        entry = self._registry.lookup(var)
        return None if entry is None else entry.shadow

    def average_name(self, var: torch.Tensor | str) -> str:
        """``"<variable name>/<name>"``, the name of ``var``'s shadow (TF's ``average_name``)."""
        entry = self._registry.lookup(var)
        if entry is not None:
            return f"{entry.name}/{self.name}"
        if isinstance(var, str):
            return f"{canonical_name(var)}/{self.name}"
        raise ValueError(
            "average_name: this tensor is not tracked, so it has no name; pass its name, or "
            "apply() it first"
        )

    def variables_to_restore(self) -> dict[str, torch.Tensor]:
        """``{average_name(v): v}`` for every tracked variable, as TF's method.

        Restoring a checkpoint through this map loads each shadow into its variable::

            saved = {ema.average_name(n): t for n, t in ema.state_dict()["averages"].items()}
            for key, var in ema.variables_to_restore().items():
                var.data.copy_(saved[key])
        """
        return {f"{e.name}/{self.name}": e.source for e in self._registry.variables()}  # type: ignore[misc]

    def copy_to(self, target: VarList) -> None:
        """Write the shadows into ``target``: a module, a mapping by name, or tracked tensors.

        Every tracked variable must find its place in a module or mapping target.
        """
        interop.copy_into(self._registry, target)

    def average_parameters(self, model: VarList) -> contextlib.AbstractContextManager[VarList]:
        """Swap the shadows into ``model`` for the ``with`` block, restore it on exit.

        The original values are restored also when the block raises.
        """
        return interop.swapped_in(self._registry, model)

    def average_module(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` whose tracked parameters and buffers ARE the shadows, in eval
        mode.

        No second copy of the averaged weights is made: the returned module's parameters
        share memory with the shadows (``requires_grad=False``), so every EMA step updates it.
        Untracked tensors are deep-copied. After :meth:`to` or :meth:`load_state_dict` with
        new entries, call this again.

        Its buffers that are shadows (BatchNorm's running statistics) must not be written by
        the module itself: a forward pass of a submodule holding one while it is in training
        mode (which would store batch statistics in the average) raises ``RuntimeError``
        before it runs. The module is returned in eval mode; ``train()`` works for
        submodules without such buffers (dropout).
        """
        return interop.average_module(self._registry, model)

    def state_dict(self) -> dict[str, Any]:
        """``{"step", "averages": {name: shadow}, "values": {name: debias state}}``.

        Tensors are the shadows themselves (no copy), as ``nn.Module.state_dict``; it loads
        with ``torch.load(weights_only=True)``.
        """
        return state.state_dict(self._registry, self._step)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> IncompatibleKeys:
        """Load shadows, step counter and debias state saved by :meth:`state_dict`.

        Values (non-variable entries) in ``state_dict`` are created if not tracked yet, so a
        resumed run finds them before its first ``apply``. With ``strict``, missing and
        unexpected names raise a ``ValueError`` listing all of them; nothing changes unless
        everything fits.
        """
        checked = state.check_state_dict(self._registry, state_dict, strict)
        state.load_state(
            self._registry,
            checked,
            shadow_dtype=self.shadow_dtype,
            device=self.device,
            zero_debias=self.zero_debias,
        )
        self._step = checked.step
        return checked.incompatible

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ExponentialMovingAverage:
        """Move the shadows (``dtype`` applies to floating ones) into new contiguous buffers.

        The shadow tensor objects stay the same; modules from :meth:`average_module` made
        before this call no longer share memory with them.
        """
        who = "ExponentialMovingAverage.to"
        new_device = check_device(device, "device", who) if device is not None else None
        new_dtype = check_dtype(dtype, "dtype", who) if dtype is not None else None
        self._registry.move_shadows(new_device, new_dtype)
        if new_device is not None:
            self.device = new_device
        if new_dtype is not None:
            self.shadow_dtype = new_dtype
        return self

    def __repr__(self) -> str:
        rule = self._rule
        decay = rule.schedule if rule.schedule is not None else rule.value
        return (
            f"ExponentialMovingAverage(decay={decay!r}, num_updates={rule.num_updates!r}, "
            f"zero_debias={self.zero_debias}, entries={len(self._registry)}, step={self._step})"
        )

    # ------------------------------------------------------------------ internals

    def _prepare(self, var_list: VarList) -> tuple[list[Entry], list[tuple[Entry, torch.Tensor]]]:
        return self._registry.prepare(
            var_list,
            buffers=self.buffers,
            shadow_dtype=self.shadow_dtype,
            device=self.device,
            zero_debias=self.zero_debias,
        )

    def _new_plan(self, key: tuple[str, ...] | None, variables: list[Entry]) -> UpdatePlan:
        """A plan for ``variables`` (``key`` names them; ``None``: all of them), after
        checking they still fit their shadows."""
        for e in variables:
            check_unchanged(e, e.source)  # type: ignore[arg-type]
        return self._plans.put(key, UpdatePlan(variables))

    def _pending_update(self) -> tuple[UpdatePlan | None, Weight | None]:
        """What :meth:`update` does now, without doing it: the plan (``None``: the call
        touches no tensor, as a hard target's N - 1 calls in N) and the lerp weight (``None``:
        a copy, before ``update_after``)."""
        weight = self._rule.weight(self._step)
        if weight is None and not self._rule.copies(self._step):
            return None, None
        self._registry.check_owners()
        plan = self._plans.get(None, self._registry.generation)
        if plan is None:
            plan = self._new_plan(None, self._registry.variables())
        return plan, weight

    def _take_step(
        self,
        plan: UpdatePlan,
        values: Sequence[tuple[Entry, torch.Tensor]],
        weight: Weight | None,
        *,
        lerps_done: bool = False,
    ) -> None:
        """Average with ``weight``, or copy (before ``update_after``), or nothing (between
        ``update_every`` calls); then count the call. ``lerps_done``: the plan's lerps
        already ran elsewhere (:class:`polyak.averaging.multi.EMAGroup`)."""
        if weight is not None:
            if not lerps_done:
                plan.lerp_(weight, exact_tf=self.exact_tf)
            plan.copy_(averaged=False)
            for entry, value in values:
                average_value(entry, value, weight)
        elif self._rule.copies(self._step):
            plan.copy_()
            for entry, value in values:
                copy_value(entry, value)
        self._step += 1


# ---------------------------------------------------------------------- seam for EMAGroup
# polyak.averaging.multi.EMAGroup runs the lerps of several averages of the same variables in
# one pass over the variables; these functions split update() into deciding and finishing.


class PendingUpdate:
    """What one :meth:`ExponentialMovingAverage.update` call will do, decided and checked
    but not done; :meth:`finish` does it (or what the shared pass left of it)."""

    __slots__ = ("_ema", "plan", "weight")

    def __init__(
        self, ema: ExponentialMovingAverage, plan: UpdatePlan | None, weight: Weight | None
    ) -> None:
        self._ema = ema
        self.plan = plan  # None: the call touches no tensor
        self.weight = weight  # None: a copy (before update_after)

    @property
    def fusable(self) -> bool:
        """Whether the lerps are a plain ``lerp_`` with a float weight that may run in a
        shared pass (not a copy, not TF's exact op sequence, not a tensor weight)."""
        w = self.weight
        return self.plan is not None and type(w) is float and w != 1.0 and not self._ema.exact_tf

    def finish(self, *, lerps_done: bool) -> None:
        """Complete the call; ``lerps_done``: ``plan.lerp_`` ran already with ``weight``."""
        if self.plan is None:
            self._ema._step += 1
        else:
            self._ema._take_step(self.plan, (), self.weight, lerps_done=lerps_done)


def pending_update(ema: ExponentialMovingAverage) -> PendingUpdate:
    """Decide ``ema.update()`` now (check, build the plan) without changing any tensor."""
    return PendingUpdate(ema, *ema._pending_update())


def update_plan(ema: ExponentialMovingAverage) -> UpdatePlan | None:
    """The plan ``ema.update()`` last used (current or not), or None."""
    return ema._plans.cached(None)


def tracked_variables(ema: ExponentialMovingAverage) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every variable ``ema`` tracks, in tracking order."""
    return [(e.name, e.source) for e in ema._registry.variables()]  # type: ignore[misc]
