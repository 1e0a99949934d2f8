"""Exponential moving averages of tensors: TensorFlow's ``tf.train.ExponentialMovingAverage``.

Per tracked entry, one update step is::

    shadow = decay * shadow + (1 - decay) * value        # a lerp towards value

with ``decay = min(decay, (1 + n) / (10 + n))`` when ``num_updates`` is given, computed in
float32 as TF does. Shadows of *variables* (parameters, module buffers, leaf tensors that
require grad) start at the variable's value; shadows of *values* (a loss, a batch statistic)
start at zero and, with ``zero_debias=True``, are bias-corrected exactly as TF's
``assign_moving_average(..., zero_debias=True)``::

    biased     = biased - (biased - value) * (1 - decay)
    local_step = local_step + 1
    shadow     = biased / (1 - decay ** local_step)

Shadows live in one contiguous buffer per (device, dtype) and are handed out as views: a step
over a whole model is one ``_foreach_lerp_`` over a few spans when the model's parameters are
contiguous too (:func:`polyak.flatten_parameters_`), and per-tensor foreach kernels otherwise.
Nothing in a step waits for the device.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import numbers
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from polyak._checks import (
    check_bool,
    check_device,
    check_dtype,
    check_int,
    check_mapping,
)
from polyak.averaging.names import BufferPolicy, canonical_name, module_tensors, tensor_owners
from polyak.flat import coalesce, pack
from polyak.gradients.global_step import GlobalStep

__all__ = ["ExponentialMovingAverage", "IncompatibleKeys"]

VarList = nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor] | torch.Tensor
Decay = float | Callable[[int], float]
NumUpdates = int | torch.Tensor | GlobalStep | None


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(strict=False)`` could not match, as ``nn.Module`` reports it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32, to compute decays as TF's float32 ops do."""
    return struct.unpack("f", struct.pack("f", x))[0]


# Below this, n, 1 + n and 10 + n are exact in float32.
_F32_EXACT_INT = 2**24 - 16


def _num_updates_ratio(n: int) -> float:
    """TF's ``(1.0 + n) / (10.0 + n)`` with ``n`` cast to float32, in float32."""
    if 0 <= n < _F32_EXACT_INT:
        # Exact operands: one float64 division rounded to float32 is float32's division.
        return _f32((1.0 + n) / (10.0 + n))
    n32 = _f32(float(n))
    return _f32(_f32(1.0 + n32) / _f32(10.0 + n32))


def _num_updates_saturation(decay32: float) -> int | None:
    """The least ``n`` from which ``_num_updates_ratio(n) >= decay32`` (it is non-decreasing
    below ``_F32_EXACT_INT``), or ``None`` if there is none below that bound."""
    if decay32 >= 1.0:
        return None
    n = max(0, int((10.0 * decay32 - 1.0) / (1.0 - decay32)) - 2)
    while n < _F32_EXACT_INT and _num_updates_ratio(n) < decay32:
        n += 1
    return n if n < _F32_EXACT_INT else None


class _Entry:
    """One tracked tensor: its shadow, where it comes from, and how it is updated."""

    __slots__ = ("average", "biased", "dtype", "local_step", "name", "owners", "shadow", "source")

    def __init__(
        self,
        name: str,
        source: torch.Tensor | None,
        shadow: torch.Tensor,
        average: bool,
        biased: torch.Tensor | None,
    ) -> None:
        self.name = name
        self.source = source  # the variable; None for a value (re-passed at every apply)
        self.dtype = shadow.dtype if source is None else source.dtype  # as tracked
        self.shadow = shadow
        self.average = average  # False: copied (integer state such as num_batches_tracked)
        self.biased = biased  # TF's `biased` accumulator, for zero-debiased values
        self.local_step = 0  # TF's `local_step`, for zero-debiased values
        # The module it was tracked or applied from and the (submodule path, attribute)
        # places that held it there: a place that later holds another tensor was changed.
        self.owners: tuple[nn.Module, list[tuple[str, str]]] | None = None

    @property
    def is_value(self) -> bool:
        return self.source is None

    def replaced_in(self) -> str | None:
        """The place in its module that no longer holds the variable, if any."""
        if self.owners is None:
            return None
        root, places = self.owners
        for path, attr in places:
            try:
                holder = root.get_submodule(path)
            except AttributeError:
                return path  # the submodule itself was removed
            if getattr(holder, attr, None) is not self.source:
                return f"{path}.{attr}" if path else attr
        return None


# Assignments of a parameter, buffer or submodule to any module (``m.weight =
# nn.Parameter(...)``, ``load_state_dict(assign=True)``, ``m.fc = nn.Linear(...)``), counted
# by torch's global registration hooks once an average tracks a module. ``update`` compares
# one int to notice them; only when it changed does it look at its variables' owner modules.
_assignments = [0]
_watching: list[bool] = []


def _count_assignment(module: nn.Module, name: str, tensor: Any) -> None:
    _assignments[0] += 1


def _watch_assignments() -> None:
    if not _watching:
        hooks = torch.nn.modules.module
        hooks.register_module_parameter_registration_hook(_count_assignment)
        hooks.register_module_buffer_registration_hook(_count_assignment)
        hooks.register_module_module_registration_hook(_count_assignment)
        _watching.append(True)


_data_ptr = torch.Tensor.data_ptr


class _Plan:
    """The kernels of one step over a fixed list of variables, with the pointers they assume.

    Built once and reused while every variable still has the storage it had (one pointer
    read per variable per step); spans come from :func:`polyak.flat.coalesce`, so a
    flattened model costs one kernel per buffer. All tensors here are detached views, so a
    step records nothing for autograd without entering ``no_grad``.
    """

    __slots__ = ("copies", "entries", "fingerprint", "lerps", "single", "sources")

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries = entries
        self.sources = [e.source for e in entries]
        self.fingerprint = list(map(_data_ptr, self.sources))
        groups: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for e in entries:
            src = e.source
            assert src is not None
            key = (e.average, e.shadow.device, e.shadow.dtype, src.device, src.dtype)
            shadows, sources = groups.setdefault(key, ([], []))
            shadows.append(e.shadow)
            sources.append(src.detach())
        # (shadow spans, source spans, whether sources need a cast to the shadows' dtype/device)
        self.lerps: list[tuple[list[torch.Tensor], list[torch.Tensor], bool]] = []
        self.copies: list[tuple[list[torch.Tensor], list[torch.Tensor], bool]] = []
        for (average, s_dev, s_dtype, v_dev, v_dtype), (shadows, sources) in groups.items():
            s_spans, v_spans = coalesce(shadows, sources)
            cast = s_dev != v_dev or s_dtype != v_dtype
            (self.lerps if average else self.copies).append((s_spans, v_spans, cast))
        # The common case after flatten_parameters_: the whole step is one lerp_ of two spans.
        self.single: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.copies and len(self.lerps) == 1:
            s_spans, v_spans, cast = self.lerps[0]
            if len(s_spans) == 1 and not cast:
                self.single = (s_spans[0], v_spans[0])

    def is_current(self) -> bool:
        return list(map(_data_ptr, self.sources)) == self.fingerprint


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
        if callable(decay):
            self._schedule: Callable[[int], float] | None = decay
            self._decay = float("nan")
        else:
            if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
                raise TypeError(
                    f"{who}: decay must be a float in [0, 1] or a schedule callable(step) -> "
                    f"float, got {type(decay).__name__}"
                )
            if not 0.0 <= decay <= 1.0:
                raise ValueError(
                    f"{who}: decay must be in [0, 1], got {decay}; for a target network with "
                    "update rate tau use decay = 1 - tau"
                )
            self._schedule = None
            self._decay = float(decay)
        num_updates = _check_num_updates(num_updates, who)
        update_every = check_int(update_every, "update_every", who, low=1)
        update_after = check_int(update_after, "update_after", who, low=0)
        if shadow_dtype is not None:
            shadow_dtype = check_dtype(shadow_dtype, "shadow_dtype", who)
        if buffers not in ("average", "copy", "ignore"):
            raise ValueError(
                f"{who}: buffers must be 'average', 'copy' or 'ignore', got {buffers!r}"
            )
        if not isinstance(name, str) or not name:
            raise TypeError(f"{who}: name must be a non-empty string, got {name!r}")
        self._num_updates = num_updates
        self.zero_debias = check_bool(zero_debias, "zero_debias", who)
        self.name = name
        self.update_every = update_every
        self.update_after = update_after
        self.compound_decay = check_bool(compound_decay, "compound_decay", who)
        self.shadow_dtype = shadow_dtype
        self.device = check_device(device, "device", who) if device is not None else None
        self.buffers: BufferPolicy = buffers
        self.exact_tf = check_bool(exact_tf, "exact_tf", who)
        self._assignments_seen = _assignments[0]
        self._entries: dict[str, _Entry] = {}
        self._by_id: dict[int, _Entry] = {}
        self._plans: dict[tuple[str, ...] | None, _Plan] = {}
        self._step = 0
        # 1 - decay is computed once when it cannot change (a float decay, num_updates None or
        # an int), and TF's num_updates rule stops lowering a fixed decay once the counter
        # passes a threshold: from there on a GlobalStep needs no float32 arithmetic either.
        self._fixed_one_minus: float | None = None
        self._saturated_from: int | None = None
        if self._schedule is None and not isinstance(num_updates, (torch.Tensor, GlobalStep)):
            self._fixed_one_minus = self._one_minus(self._decay_at(0))  # type: ignore[arg-type]
        elif self._schedule is None and isinstance(num_updates, GlobalStep):
            self._saturated_from = _num_updates_saturation(_f32(self._decay))
            self._saturated_one_minus = self._one_minus(self._compounded(_f32(self._decay)))

    # ------------------------------------------------------------------ public API

    @property
    def step(self) -> int:
        """Calls to :meth:`apply`/:meth:`update` so far (copy and skipped calls included)."""
        return self._step

    @property
    def decay(self) -> float | torch.Tensor:
        """The decay the next averaging step will use (after schedule and ``num_updates``)."""
        return self._decay_at(max(self._step - self.update_after, 0))

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
        one_minus = self._next_weight()
        variables, values = self._prepare(var_list)
        self._advance(variables, tuple(e.name for e in variables), values, one_minus)

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
        plan, one_minus = self._pending_update()
        if plan is None:
            self._step += 1
            return
        single = plan.single
        if single is not None and type(one_minus) is float and not self.exact_tf:
            # The hot path, without further calls. Weight 1 (decay 0: a hard target's copy) is
            # a copy: lerp's b - (b - a) * 0 would turn an inf on either side into NaN.
            if one_minus == 1.0:
                single[0].copy_(single[1])
            else:
                single[0].lerp_(single[1], one_minus)
            self._step += 1
            return
        self._step_plan(plan, (), one_minus)

    def average(self, var: torch.Tensor | str) -> torch.Tensor | None:
        """The shadow of ``var`` (a tracked tensor or its name), or ``None``."""
        entry = self._lookup(var)
        return None if entry is None else entry.shadow

    def average_name(self, var: torch.Tensor | str) -> str:
        """``"<variable name>/<name>"``, the name of ``var``'s shadow (TF's ``average_name``)."""
        entry = self._lookup(var)
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
        return {
            f"{e.name}/{self.name}": e.source
            for e in self._entries.values()
            if e.source is not None
        }

    def copy_to(self, target: VarList) -> None:
        """Write the shadows into ``target``: a module, a mapping by name, or tracked tensors.

        Every tracked variable must find its place in a module or mapping target.
        """
        pairs = self._pairs(target, "copy_to")
        with torch.no_grad():
            _copy_spans([t for t, _ in pairs], [s for _, s in pairs])

    @contextlib.contextmanager
    def average_parameters(self, model: VarList) -> Iterator[VarList]:
        """Swap the shadows into ``model`` for the ``with`` block, restore it on exit.

        The original values are restored also when the block raises.
        """
        pairs = self._pairs(model, "average_parameters")
        targets = [t for t, _ in pairs]
        with torch.no_grad():
            backup = [t.detach().clone() for t in targets]
            _copy_spans(targets, [s for _, s in pairs])
        try:
            yield model
        finally:
            with torch.no_grad():
                _copy_spans(targets, backup)

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
        if not isinstance(model, nn.Module):
            raise TypeError(f"average_module expects an nn.Module, got {type(model).__name__}")
        memo: dict[int, Any] = {}
        for name, tensor, _ in module_tensors(model, "copy"):
            entry = self._entries.get(name)
            if entry is None or entry.is_value:
                continue
            if entry.shadow.shape != tensor.shape:
                raise ValueError(
                    f"average_module: '{name}' has shape {tuple(tensor.shape)} in the model but "
                    f"{tuple(entry.shadow.shape)} in the average"
                )
            if isinstance(tensor, nn.Parameter):
                memo[id(tensor)] = nn.Parameter(entry.shadow, requires_grad=False)
            else:
                memo[id(tensor)] = entry.shadow
        averaged = copy.deepcopy(model, memo).eval()
        shadows = {id(e.shadow) for e in self._entries.values()}
        for prefix, sub in averaged.named_modules():
            held = frozenset(id(b) for b in sub.buffers(recurse=False) if id(b) in shadows)
            if held:
                sub.register_forward_pre_hook(functools.partial(_refuse_training, prefix, held))
        return averaged

    def state_dict(self) -> dict[str, Any]:
        """``{"step", "averages": {name: shadow}, "values": {name: debias state}}``.

        Tensors are the shadows themselves (no copy), as ``nn.Module.state_dict``; it loads
        with ``torch.load(weights_only=True)``.
        """
        values: dict[str, dict[str, Any]] = {}
        for e in self._entries.values():
            if e.is_value:
                state: dict[str, Any] = {"local_step": e.local_step}
                if e.biased is not None:
                    state["biased"] = e.biased
                values[e.name] = state
        return {
            "step": self._step,
            "averages": {e.name: e.shadow for e in self._entries.values()},
            "values": values,
        }

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> IncompatibleKeys:
        """Load shadows, step counter and debias state saved by :meth:`state_dict`.

        Values (non-variable entries) in ``state_dict`` are created if not tracked yet, so a
        resumed run finds them before its first ``apply``. With ``strict``, missing and
        unexpected names raise a ``ValueError`` listing all of them; nothing changes unless
        everything fits.
        """
        if not isinstance(state_dict, Mapping) or not isinstance(
            state_dict.get("averages"), Mapping
        ):
            keys = sorted(map(str, state_dict))[:5] if isinstance(state_dict, Mapping) else "-"
            raise ValueError(
                "load_state_dict expects the dict returned by ExponentialMovingAverage."
                "state_dict() ({'step', 'averages', 'values'}), got "
                f"{type(state_dict).__name__} with keys {keys}"
            )
        who = "ExponentialMovingAverage.load_state_dict"
        check_bool(strict, "strict", who)
        step = state_dict.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"load_state_dict: 'step' must be an int >= 0, got {step!r}")
        averages: Mapping[str, torch.Tensor] = state_dict["averages"]
        values: Mapping[str, Mapping[str, Any]] = check_mapping(
            state_dict.get("values", {}), "'values'", who
        )
        for name in itertools.chain(averages, values):
            if not isinstance(name, str):
                raise TypeError(f"{who}: entry names must be strings, got {name!r}")
        missing = sorted(n for n in self._entries if n not in averages)
        unexpected = sorted(n for n in averages if n not in self._entries and n not in values)
        if strict and (missing or unexpected):
            raise ValueError(
                "ExponentialMovingAverage.load_state_dict: the state dict does not fit.\n"
                f"  missing (tracked here, absent there): {missing}\n"
                f"  unexpected (there, not tracked here): {unexpected}\n"
                "Track the same variables before loading, or pass strict=False to load the rest."
            )
        loads: list[tuple[_Entry, torch.Tensor]] = []
        creates: list[tuple[str, torch.Tensor]] = []
        for name, saved in averages.items():
            if not isinstance(saved, torch.Tensor):
                raise ValueError(f"load_state_dict: average of '{name}' is not a tensor")
            _check_dense(name, saved)
            entry = self._entries.get(name)
            if entry is None:
                if name in values:
                    _check_can_average(name, saved, True)
                    creates.append((name, saved))
                continue
            if saved.shape != entry.shadow.shape:
                raise ValueError(
                    f"load_state_dict: '{name}' has shape {tuple(saved.shape)} in the state "
                    f"dict but {tuple(entry.shadow.shape)} here"
                )
            if saved.is_floating_point() != entry.shadow.is_floating_point():
                raise ValueError(
                    f"load_state_dict: '{name}' is {saved.dtype} in the state dict but "
                    f"{entry.shadow.dtype} here"
                )
            if entry.is_value != (name in values):
                kind = "a value" if name in values else "a variable"
                raise ValueError(
                    f"load_state_dict: '{name}' is {kind} in the state dict but not here"
                )
            loads.append((entry, saved))
        for name, state in values.items():
            biased = state.get("biased") if isinstance(state, Mapping) else None
            local_step = state.get("local_step", 0) if isinstance(state, Mapping) else None
            shape = averages[name].shape if isinstance(averages.get(name), torch.Tensor) else None
            if (
                shape is None
                or isinstance(local_step, bool)
                or not isinstance(local_step, int)
                or local_step < 0
                or not (
                    biased is None
                    or (
                        isinstance(biased, torch.Tensor)
                        and biased.shape == shape
                        and biased.is_floating_point()
                        and biased.layout == torch.strided
                    )
                )
            ):
                raise ValueError(
                    f"load_state_dict: the debias state of value '{name}' does not fit: expected "
                    "{'local_step': int >= 0, 'biased': tensor shaped like its average} and an "
                    f"entry in 'averages', got {state!r}"
                )
        # Everything is checked: from here on the EMA changes.
        for entry in self._track([(n, t, True, True) for n, t in creates]):
            loads.append((entry, averages[entry.name]))
        with torch.no_grad():
            for entry, saved in loads:
                entry.shadow.copy_(saved)
                state = values.get(entry.name)
                if state is not None:
                    entry.local_step = int(state.get("local_step", 0))
                    if entry.biased is not None and "biased" in state:
                        entry.biased.copy_(state["biased"])
        self._step = step
        return IncompatibleKeys(missing, unexpected)

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
        entries = list(self._entries.values())
        specs = [
            (
                e.shadow.shape,
                new_dtype if (new_dtype and e.shadow.is_floating_point()) else e.shadow.dtype,
                e.shadow.device if new_device is None else new_device,
            )
            for e in entries
        ]
        # Everything is allocated and copied before any shadow is repointed, so a failure
        # (out of memory) leaves the average as it was.
        with torch.no_grad():
            views = pack(specs)
            for entry, view in zip(entries, views):
                view.copy_(entry.shadow)
            biased = [
                None if e.biased is None else e.biased.to(device=v.device, dtype=v.dtype)
                for e, v in zip(entries, views)
            ]
            for entry, view, b in zip(entries, views, biased):
                entry.shadow.data = view
                if entry.biased is not None:
                    entry.biased.data = b
        if new_device is not None:
            self.device = new_device
        if new_dtype is not None:
            self.shadow_dtype = new_dtype
        self._plans.clear()
        return self

    def __repr__(self) -> str:
        decay = self._schedule if self._schedule is not None else self._decay
        return (
            f"ExponentialMovingAverage(decay={decay!r}, num_updates={self._num_updates!r}, "
            f"zero_debias={self.zero_debias}, entries={len(self._entries)}, step={self._step})"
        )

    # ------------------------------------------------------------------ seam for EMAGroup
    # polyak.averaging.multi.EMAGroup runs the lerps of several averages of the same variables
    # in one pass; these methods split update() into deciding, lerping and finishing.

    def _pending_update(self) -> tuple[_Plan | None, float | torch.Tensor | None]:
        """What :meth:`update` does now, without doing it: the plan (``None``: the call
        touches no tensor, as a hard target's N - 1 calls in N) and the lerp weight (``None``:
        a copy, before ``update_after``)."""
        one_minus = self._next_weight()
        if one_minus is None and self._step >= self.update_after:
            # A call between update_every steps (a hard target's N - 1 calls in N) touches no
            # tensor: count it without checking the plan.
            return None, None
        if self._assignments_seen != _assignments[0]:
            self._check_owners()
        plan = self._plans.get(None)
        if plan is None or not plan.is_current():
            plan = self._plan(None, [e for e in self._entries.values() if not e.is_value])
        return plan, one_minus

    def _cached_update_plan(self) -> _Plan | None:
        return self._plans.get(None)

    def _fusable_weight(self, one_minus: float | torch.Tensor | None) -> bool:
        """Whether a step with ``one_minus`` is a plain ``lerp_`` that may run elsewhere."""
        return type(one_minus) is float and one_minus != 1.0 and not self.exact_tf

    def _finish_update(
        self, plan: _Plan | None, one_minus: float | torch.Tensor | None, lerps_done: bool
    ) -> None:
        """Complete the update that :meth:`_pending_update` decided; ``lerps_done``: the
        caller has already applied ``plan.lerps`` with ``one_minus``."""
        if plan is not None and lerps_done:
            for shadows, sources, _ in plan.copies:
                _copy_each(shadows, sources)
            self._step += 1
        elif plan is not None:
            self._step_plan(plan, (), one_minus)
        else:
            self._step += 1

    def _variables(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of every tracked variable, in tracking order."""
        return [(e.name, e.source) for e in self._entries.values() if e.source is not None]

    # ------------------------------------------------------------------ internals

    def _prepare(
        self, var_list: VarList
    ) -> tuple[list[_Entry], list[tuple[_Entry, torch.Tensor]]]:
        """Check ``var_list``, track its new entries, return its variables and values."""
        items = self._resolve(var_list)
        new: list[tuple[str, torch.Tensor, bool, bool]] = []
        repoint: list[tuple[_Entry, torch.Tensor]] = []
        listed: list[_Entry | None] = []  # None: created below, in the order of `new`
        seen: set[str] = set()
        variables: dict[int, str] = {}  # id of each listed variable -> its name here
        for item in items:
            name, tensor, average, is_value = item
            if name in seen:
                raise ValueError(
                    f"ExponentialMovingAverage: '{name}' is listed twice; names must be unique "
                    "(after removing wrapper prefixes such as 'module.')"
                )
            seen.add(name)
            _check_dense(name, tensor)
            entry = self._entries.get(name)
            if not is_value:
                first = variables.setdefault(id(tensor), name)
                tracked = self._by_id.get(id(tensor))
                if first != name or (tracked is not None and tracked.name != name):
                    other = f"listed as '{first}'" if first != name else (
                        f"tracked as '{tracked.name}'"  # type: ignore[union-attr]
                    )
                    raise ValueError(
                        f"ExponentialMovingAverage: the tensor listed as '{name}' is also "
                        f"{other}; a variable has one average: pass it once, under one name"
                    )
            if entry is None:
                _check_can_average(name, tensor, average)
                new.append(item)
            else:
                self._check_same_kind(entry, tensor, is_value)
                if not is_value and entry.source is not tensor:
                    _check_may_follow(entry, var_list)
                    repoint.append((entry, tensor))
            listed.append(entry)
        # Everything is checked: from here on the EMA changes (_track undoes its own work
        # if an allocation or copy fails).
        created = iter(self._track(new))
        for entry, tensor in repoint:
            self._by_id.pop(id(entry.source), None)
            entry.source = tensor
            self._by_id[id(tensor)] = entry
        if repoint:
            self._plans.clear()
        entries = [e if e is not None else next(created) for e in listed]
        if isinstance(var_list, nn.Module):
            self._record_owners(var_list, entries, {id(e) for e, _ in repoint})
        values = [(e, item[1]) for e, item in zip(entries, items) if e.is_value]
        return [e for e in entries if not e.is_value], values

    def _record_owners(
        self, module: nn.Module, entries: list[_Entry], repointed: set[int]
    ) -> None:
        """Remember which attributes of ``module``'s submodules hold the variables of
        ``entries`` (walking the module only when an entry is new to it or was repointed)."""
        fresh = [e for e in entries if e.owners is None or id(e) in repointed]
        if not fresh:
            return
        _watch_assignments()
        owners = tensor_owners(module)
        for e in fresh:
            e.owners = (module, owners.get(id(e.source), []))
        if self._assignments_seen == _assignments[0] or self._find_replaced() is None:
            self._assignments_seen = _assignments[0]

    def _find_replaced(self) -> tuple[_Entry, str] | None:
        for e in self._entries.values():
            where = e.replaced_in()
            if where is not None:
                return e, where
        return None

    def _check_owners(self) -> None:
        """Raise if a variable tracked from a module is no longer that module's tensor."""
        found = self._find_replaced()
        if found is not None:
            entry, where = found
            raise ValueError(
                f"ExponentialMovingAverage: '{entry.name}' is no longer the module's tensor "
                f"({where} now holds another one, e.g. after m.weight = nn.Parameter(...) or "
                "load_state_dict(assign=True)), so the average would keep following the "
                "dropped one. Call ema.track(model) (or ema.apply(model)) to follow the new "
                "tensor: its shadow is kept."
            )
        self._assignments_seen = _assignments[0]

    def _resolve(self, var_list: VarList) -> list[tuple[str, torch.Tensor, bool, bool]]:
        """``(name, tensor, average?, is_value?)`` for each entry of ``var_list``."""
        if isinstance(var_list, nn.Module):
            return [(n, t, avg, False) for n, t, avg in module_tensors(var_list, self.buffers)]
        if isinstance(var_list, Mapping):
            items = []
            for key, tensor in var_list.items():
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(
                        f"ExponentialMovingAverage.apply: '{key}' is a "
                        f"{type(tensor).__name__}, not a tensor"
                    )
                tracked = self._by_id.get(id(tensor))
                is_value = tracked is None and not _is_variable(tensor)
                items.append((canonical_name(str(key)), tensor, True, is_value))
            return items
        tensors = _tensor_list(var_list, "ExponentialMovingAverage.apply", "var_list")
        items = []
        fresh_names = self._fresh_names()
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"ExponentialMovingAverage.apply: entry {i} is a {type(tensor).__name__}; "
                    "pass a module, a {name: tensor} mapping, or a list of tensors"
                )
            entry = self._by_id.get(id(tensor))
            if entry is not None:
                items.append((entry.name, tensor, entry.average, False))
                continue
            if not _is_variable(tensor):
                raise TypeError(
                    f"ExponentialMovingAverage.apply: entry {i} (shape {tuple(tensor.shape)}) is "
                    "a value, not a variable (not a Parameter nor a leaf that requires grad): its "
                    "tensor is new at every step, so it must be passed by name, e.g. "
                    "ema.apply({'loss': loss})"
                )
            items.append((next(fresh_names), tensor, True, False))
        return items

    def _fresh_names(self) -> Iterator[str]:
        """TF's default variable names not yet taken: ``Variable``, ``Variable_1``, ..."""
        for index in itertools.count():
            name = "Variable" if index == 0 else f"Variable_{index}"
            if name not in self._entries:
                yield name

    def _check_same_kind(self, entry: _Entry, tensor: torch.Tensor, is_value: bool) -> None:
        if entry.is_value != is_value:
            was = "a value" if entry.is_value else "a variable"
            now = "a value" if is_value else "a variable"
            raise TypeError(
                f"ExponentialMovingAverage: '{entry.name}' was tracked as {was} and is now "
                f"{now}; use a different name for it"
            )
        _check_unchanged(entry, tensor)

    def _track(self, new: list[tuple[str, torch.Tensor, bool, bool]]) -> list[_Entry]:
        """Create shadows for ``new`` entries in fresh contiguous buffers."""
        if not new:
            return []
        specs = []
        for _, tensor, average, _ in new:
            dtype = tensor.dtype
            if average and self.shadow_dtype is not None:
                dtype = self.shadow_dtype
            specs.append((tensor.shape, dtype, self.device or tensor.device))
        entries = []
        with torch.no_grad():
            for (name, tensor, average, is_value), shadow in zip(new, pack(specs, zeros=True)):
                biased = None
                if is_value:
                    if self.zero_debias:
                        biased = torch.zeros_like(shadow)
                    source = None
                else:
                    shadow.copy_(tensor.detach())
                    source = tensor
                entries.append(_Entry(name, source, shadow, average, biased))
        # Only now, with every shadow made, do the entries join the average.
        for entry in entries:
            if entry.source is not None:
                self._by_id[id(entry.source)] = entry
            self._entries[entry.name] = entry
        self._plans.clear()
        return entries

    def _lookup(self, var: torch.Tensor | str) -> _Entry | None:
        if isinstance(var, str):
            return self._entries.get(canonical_name(var))
        if isinstance(var, torch.Tensor):
            return self._by_id.get(id(var))
        raise TypeError(
            f"ExponentialMovingAverage: var must be a tracked tensor or its name, got "
            f"{type(var).__name__}"
        )

    def _pairs(self, target: VarList, caller: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(target tensor, shadow) for every tracked variable, located in ``target``."""
        variables = [e for e in self._entries.values() if not e.is_value]
        if isinstance(target, (nn.Module, Mapping)):
            named = (
                {n: t for n, t, _ in module_tensors(target, "copy")}
                if isinstance(target, nn.Module)
                else {canonical_name(str(k)): t for k, t in target.items()}
            )
            missing = [e.name for e in variables if e.name not in named]
            if missing:
                raise ValueError(
                    f"{caller}: the target has no place for {len(missing)} tracked "
                    f"variable(s): {missing[:10]}{' ...' if len(missing) > 10 else ''}"
                )
            pairs = [(named[e.name], e.shadow) for e in variables]
            for name, t in named.items():
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{caller}: '{name}' is a {type(t).__name__}, not a tensor")
        else:
            tensors = _tensor_list(target, caller, "the target")
            pairs = []
            for i, tensor in enumerate(tensors):
                entry = self._by_id.get(id(tensor))
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"{caller}: entry {i} is a {type(tensor).__name__}")
                if entry is None:
                    raise ValueError(
                        f"{caller}: tensor {i} (shape {tuple(tensor.shape)}) is not tracked; "
                        "pass the module or a {name: tensor} mapping to match by name"
                    )
                pairs.append((tensor, entry.shadow))
        for tensor, shadow in pairs:
            if tensor.shape != shadow.shape:
                raise ValueError(
                    f"{caller}: shape {tuple(tensor.shape)} in the target does not match the "
                    f"average's {tuple(shadow.shape)}"
                )
        return pairs

    def _decay_at(self, t: int) -> float | torch.Tensor:
        """The decay of averaging step ``t``: schedule, TF's num_updates rule, compounding."""
        if self._schedule is not None:
            given = self._schedule(t)
            if isinstance(given, bool) or not isinstance(given, (numbers.Real, torch.Tensor)):
                raise TypeError(
                    f"decay schedule {self._schedule!r} gave {given!r} at step {t}; a schedule "
                    "returns a float in [0, 1]"
                )
            decay = float(given)
            if not 0.0 <= decay <= 1.0:
                raise ValueError(
                    f"decay schedule {self._schedule!r} gave {decay} at step {t}; a decay must "
                    "be in [0, 1]"
                )
        else:
            decay = self._decay
        # TF converts the decay to a float32 tensor before anything else.
        d: float | torch.Tensor = _f32(decay)
        n = self._num_updates
        if isinstance(n, torch.Tensor):
            nf = n.detach().to(torch.float32)
            d = torch.clamp((1.0 + nf) / (10.0 + nf), max=d)
        elif n is not None:
            d = min(d, _num_updates_ratio(int(n)))  # type: ignore[type-var]
        return self._compounded(d)

    def _plan(self, key: tuple[str, ...] | None, variables: list[_Entry]) -> _Plan:
        """A fresh plan for ``variables``, after checking they still fit their shadows."""
        for e in variables:
            _check_unchanged(e, e.source)  # type: ignore[arg-type]
        plan = self._plans[key] = _Plan(variables)
        return plan

    def _advance(
        self,
        variables: list[_Entry],
        key: tuple[str, ...],
        values: list[tuple[_Entry, torch.Tensor]],
        one_minus: float | torch.Tensor | None,
    ) -> None:
        """One step over the given variables and values."""
        plan = self._plans.get(key)
        if plan is None or not plan.is_current():
            plan = self._plan(key, variables)
        for entry, value in values:
            _check_unchanged(entry, value)
        self._step_plan(plan, values, one_minus)

    def _next_weight(self) -> float | torch.Tensor | None:
        """What this call does: ``None`` copies or skips (see :meth:`_step_plan`), otherwise
        the lerp weight ``1 - decay``. Computed before anything changes, so a schedule that
        returns a bad decay leaves the EMA as it was."""
        t = self._step - self.update_after
        if t < 0 or not (self.update_every == 1 or (t + 1) % self.update_every == 0):
            return None
        if self._fixed_one_minus is not None:
            return self._fixed_one_minus
        if self._saturated_from is not None and (
            self._saturated_from <= int(self._num_updates) < _F32_EXACT_INT  # type: ignore[arg-type]
        ):
            return self._saturated_one_minus
        return self._one_minus(self._decay_at(t))

    @staticmethod
    def _one_minus(decay: float | torch.Tensor) -> float | torch.Tensor:
        """The lerp weight ``1 - decay``, rounded to float32 as TF's ``1.0 - decay`` op."""
        return 1.0 - decay if isinstance(decay, torch.Tensor) else _f32(1.0 - decay)

    def _compounded(self, decay: float | torch.Tensor) -> float | torch.Tensor:
        """``decay ** update_every`` when compounding, else ``decay``."""
        if self.update_every == 1 or not self.compound_decay:
            return decay
        if isinstance(decay, torch.Tensor):
            return decay**self.update_every
        return _f32(decay**self.update_every)

    def _step_plan(
        self,
        plan: _Plan,
        values: Sequence[tuple[_Entry, torch.Tensor]],
        one_minus: float | torch.Tensor | None,
    ) -> None:
        """Average with weight ``one_minus``, or copy (before ``update_after``), or skip (between
        ``update_every`` calls); then count the step."""
        if one_minus is not None:
            self._average_step(plan, values, one_minus)
        elif self._step < self.update_after:
            self._copy_step(plan, values)
        self._step += 1

    def _copy_step(self, plan: _Plan, values: Sequence[tuple[_Entry, torch.Tensor]]) -> None:
        for shadows, sources, _ in plan.lerps + plan.copies:
            _copy_each(shadows, sources)  # the plan's spans: already merged and detached
        for entry, value in values:
            entry.shadow.copy_(value.detach())
            if entry.biased is not None:
                # Debiasing restarts with the first averaged step.
                entry.biased.zero_()
                entry.local_step = 0

    def _average_step(
        self,
        plan: _Plan,
        values: Sequence[tuple[_Entry, torch.Tensor]],
        one_minus: float | torch.Tensor,
    ) -> None:
        """``shadow = lerp(shadow, value, 1 - decay)`` for each span; values as TF."""
        for shadows, sources, cast in plan.lerps:
            if cast:
                sources = [v.to(device=s.device, dtype=s.dtype) for s, v in zip(shadows, sources)]
            weight: float | list[torch.Tensor] = one_minus  # type: ignore[assignment]
            if isinstance(one_minus, torch.Tensor):
                w = one_minus.to(device=shadows[0].device, dtype=shadows[0].dtype)
                weight = [w] * len(shadows)
            if self.exact_tf:
                # TF's op sequence: v -= (v - value) * (1 - decay), each op rounded on its own.
                diff = torch._foreach_sub(shadows, sources)
                torch._foreach_mul_(diff, weight)
                torch._foreach_sub_(shadows, diff)
            elif weight == 1.0:  # decay 0: a copy (see update())
                _copy_each(shadows, sources)
            elif len(shadows) == 1 and not isinstance(weight, list):
                shadows[0].lerp_(sources[0], weight)
            else:
                torch._foreach_lerp_(shadows, sources, weight)
        for shadows, sources, _ in plan.copies:
            _copy_each(shadows, sources)
        for entry, value in values:
            _average_value(entry, value, one_minus)


def _refuse_training(name: str, shadows: frozenset[int], module: nn.Module, args: Any) -> None:
    """Forward pre-hook of an averaged submodule holding the shadows ``shadows`` (ids) as
    buffers (a deep copy of the module holds copies: it may train)."""
    if module.training and any(id(b) in shadows for b in module.buffers(recurse=False)):
        raise RuntimeError(
            f"average_module: '{name or type(module).__name__}' of the averaged module is in "
            "training mode, and its forward pass would write batch statistics into the "
            "average's shadows of its buffers. Call .eval() on the averaged module (it is "
            "returned in eval mode); to train a copy, copy.deepcopy(model) instead."
        )


def _average_value(entry: _Entry, value: torch.Tensor, one_minus: float | torch.Tensor) -> None:
    """TF's ``assign_moving_average`` on a value, with its exact arithmetic.

    Values are few and small (losses, statistics), so this follows TF's three separately
    rounded ops instead of a fused lerp: ``v -= (v - value) * (1 - decay)``.
    """
    shadow = entry.shadow
    value = value.detach().to(device=shadow.device, dtype=shadow.dtype)
    if isinstance(one_minus, torch.Tensor):
        one_minus = one_minus.to(device=shadow.device, dtype=shadow.dtype)
    if entry.biased is None:
        shadow.sub_((shadow - value) * one_minus)
        return
    biased = entry.biased
    biased.sub_((biased - value) * one_minus)
    entry.local_step += 1
    # bias_factor = 1 - (1 - (1 - decay)) ** local_step, each op rounded as TF's float32 ops.
    if isinstance(one_minus, torch.Tensor):
        factor: float | torch.Tensor = 1.0 - (1.0 - one_minus) ** entry.local_step
    else:
        factor = _f32(1.0 - _f32(_f32(1.0 - one_minus) ** entry.local_step))
    torch.div(biased, factor, out=shadow)


def _copy_spans(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` with as few kernels as the memory layout allows."""
    if targets:
        _copy_each(*coalesce(targets, [s.detach() for s in sources]))


def _copy_each(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])``: one foreach kernel when no copy crosses devices."""
    if all(t.device == s.device for t, s in zip(targets, sources)):
        torch._foreach_copy_(targets, sources)
    else:
        for t, s in zip(targets, sources):
            t.copy_(s)


def _is_variable(t: torch.Tensor) -> bool:
    """TF's Variable, in PyTorch: a Parameter, or a leaf tensor that requires grad."""
    return isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad)


def _check_may_follow(entry: _Entry, var_list: VarList) -> None:
    """An entry tracked from a module follows another tensor of the same name only if that
    module dropped its own (a replaced parameter): two modules with the same names (twin
    critics) would otherwise take turns moving one average."""
    if entry.owners is None or entry.owners[0] is var_list or entry.replaced_in() is not None:
        return
    raise ValueError(
        f"ExponentialMovingAverage: '{entry.name}' is tracked from another module, which still "
        "holds its own tensor of that name. Names are relative to the module passed, so two "
        "modules with the same names cannot share one average: use one "
        "ExponentialMovingAverage per module, or name them apart "
        "({f'critic2.{n}': p for n, p in critic2.named_parameters()}). To move an average to "
        "a new copy of the model, build a new one and load this one's state_dict()."
    )


def _tensor_list(value: Any, who: str, what: str) -> list[Any]:
    """A single tensor or an iterable of entries, as a list (entries are checked later)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{who}: {what} must be a module, a {{name: tensor}} mapping or a list of tensors, "
            f"got {type(value).__name__}"
        )
    return list(value)


def _check_num_updates(n: NumUpdates, who: str) -> NumUpdates:
    """``num_updates`` as given, after checking it is a counter that cannot make the decay
    leave [0, 1] (TF's rule gives ``(1 + n) / (10 + n) < 0`` for ``-10 < n < -1``)."""
    if n is None or isinstance(n, GlobalStep):
        return n
    if isinstance(n, torch.Tensor):
        if n.dim() != 0 or n.dtype == torch.bool or n.is_complex():
            raise TypeError(
                f"{who}: num_updates must be a 0-dim real tensor, got shape {tuple(n.shape)} "
                f"{n.dtype}"
            )
        # Read once here (a sync if it lives on an accelerator); never per step.
        if not bool(n.detach() >= 0):
            raise ValueError(f"{who}: num_updates must be >= 0, got {n.item()}")
        return n
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(
            f"{who}: num_updates must be None, an int, a 0-dim tensor or a polyak.GlobalStep, "
            f"got {n!r}"
        )
    return check_int(n, "num_updates", who, low=0)


def _check_dense(name: str, tensor: torch.Tensor) -> None:
    if tensor.layout != torch.strided:
        raise TypeError(
            f"ExponentialMovingAverage: '{name}' is a {tensor.layout} tensor; only dense "
            "(strided) tensors can be averaged: pass t.to_dense(), or leave it out"
        )


def _check_can_average(name: str, tensor: torch.Tensor, average: bool) -> None:
    if average and not tensor.is_floating_point():
        raise TypeError(
            f"ExponentialMovingAverage: '{name}' is {tensor.dtype}; only floating tensors can be "
            "averaged (as TF: half, bfloat16, float or double). Integer state such as a "
            "counter is copied when it is a module buffer: pass the module, or leave it out."
        )


def _check_unchanged(entry: _Entry, tensor: torch.Tensor) -> None:
    """A variable keeps the shape and dtype it was tracked with; a value its shape."""
    changed = tensor.shape != entry.shadow.shape or (
        tensor.dtype != entry.dtype
        if not entry.is_value
        else tensor.is_floating_point() != entry.dtype.is_floating_point
    )
    if changed:
        raise ValueError(
            f"ExponentialMovingAverage: '{entry.name}' was tracked with shape "
            f"{tuple(entry.shadow.shape)} ({entry.dtype}) and now has shape "
            f"{tuple(tensor.shape)} ({tensor.dtype}). A changed model needs a new "
            "ExponentialMovingAverage (load the old one's state_dict with strict=False to keep "
            "what still fits), or ema.to(dtype=...) for a new shadow dtype."
        )
