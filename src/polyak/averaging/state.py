"""An average's state dict: ``{"step", "averages": {name: shadow}, "values": {name: debias
state}}``, and loading one back with every part checked before anything changes.

Names are the entries' names (wrapper prefixes removed), so an average saved from a DDP- or
``torch.compile``-wrapped model loads into the bare model and back. The shadows are the
tensors themselves (no copy), as ``nn.Module.state_dict``; the dict loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from polyak._checks import check_bool, check_mapping
from polyak.averaging.entries import Entry, Registry, check_can_average, check_dense

__all__ = ["CheckedState", "IncompatibleKeys", "check_state_dict", "load_state", "state_dict"]


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(strict=False)`` could not match, as ``nn.Module`` reports it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class CheckedState(NamedTuple):
    """A state dict that fits: what to copy where, and which values to create first."""

    step: int
    loads: list[tuple[Entry, torch.Tensor]]
    creates: list[tuple[str, torch.Tensor]]
    values: Mapping[str, Mapping[str, Any]]
    incompatible: IncompatibleKeys


def state_dict(registry: Registry, step: int) -> dict[str, Any]:
    """The state of an average of ``registry``'s entries after ``step`` calls."""
    values: dict[str, dict[str, Any]] = {}
    for e in registry.entries.values():
        if e.is_value:
            state: dict[str, Any] = {"local_step": e.local_step}
            if e.biased is not None:
                state["biased"] = e.biased
            values[e.name] = state
    return {
        "step": step,
        "averages": {e.name: e.shadow for e in registry.entries.values()},
        "values": values,
    }


def check_state_dict(
    registry: Registry, state_dict: Mapping[str, Any], strict: bool
) -> CheckedState:
    """Check ``state_dict`` against ``registry`` completely, changing nothing.

    With ``strict``, missing and unexpected names raise a ``ValueError`` listing all of them.
    Values (non-variable entries) not tracked yet are to be created, so a resumed run finds
    them before its first ``apply``.
    """
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("averages"), Mapping):
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
    entries = registry.entries
    missing = sorted(n for n in entries if n not in averages)
    unexpected = sorted(n for n in averages if n not in entries and n not in values)
    if strict and (missing or unexpected):
        raise ValueError(
            "ExponentialMovingAverage.load_state_dict: the state dict does not fit.\n"
            f"  missing (tracked here, absent there): {missing}\n"
            f"  unexpected (there, not tracked here): {unexpected}\n"
            "Track the same variables before loading, or pass strict=False to load the rest."
        )
    loads: list[tuple[Entry, torch.Tensor]] = []
    creates: list[tuple[str, torch.Tensor]] = []
    for name, saved in averages.items():
        if not isinstance(saved, torch.Tensor):
            raise ValueError(f"load_state_dict: average of '{name}' is not a tensor")
        check_dense(name, saved)
        entry = entries.get(name)
        if entry is None:
            if name in values:
                check_can_average(name, saved, True)
                creates.append((name, saved))
            continue
        _check_fits(name, saved, entry, name in values)
        loads.append((entry, saved))
    for name, state in values.items():
        _check_debias_state(name, state, averages.get(name))
    return CheckedState(step, loads, creates, values, IncompatibleKeys(missing, unexpected))


def load_state(
    registry: Registry,
    checked: CheckedState,
    *,
    shadow_dtype: torch.dtype | None,
    device: torch.device | None,
    zero_debias: bool,
) -> None:
    """Create the new values' entries, then copy the saved shadows and debias state."""
    loads = list(checked.loads)
    new = [(n, t, True, True) for n, t in checked.creates]
    created = registry.track(new, shadow_dtype=shadow_dtype, device=device, zero_debias=zero_debias)
    saved = dict(checked.creates)
    loads += [(entry, saved[entry.name]) for entry in created]
    with torch.no_grad():
        for entry, tensor in loads:
            entry.shadow.copy_(tensor)
            state = checked.values.get(entry.name)
            if state is not None:
                entry.local_step = int(state.get("local_step", 0))
                if entry.biased is not None and "biased" in state:
                    entry.biased.copy_(state["biased"])


def _check_fits(name: str, saved: torch.Tensor, entry: Entry, saved_as_value: bool) -> None:
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
    if entry.is_value != saved_as_value:
        kind = "a value" if saved_as_value else "a variable"
        raise ValueError(f"load_state_dict: '{name}' is {kind} in the state dict but not here")


def _check_debias_state(name: str, state: Any, average: Any) -> None:
    """A value's saved state is ``{'local_step': int >= 0, 'biased': tensor shaped like its
    average}`` (``biased`` only when debiasing), beside an entry in ``averages``."""
    biased = state.get("biased") if isinstance(state, Mapping) else None
    local_step = state.get("local_step", 0) if isinstance(state, Mapping) else None
    shape = average.shape if isinstance(average, torch.Tensor) else None
    fits = (
        shape is not None
        and not isinstance(local_step, bool)
        and isinstance(local_step, int)
        and local_step >= 0
        and (
            biased is None
            or (
                isinstance(biased, torch.Tensor)
                and biased.shape == shape
                and biased.is_floating_point()
                and biased.layout == torch.strided
            )
        )
    )
    if not fits:
        raise ValueError(
            f"load_state_dict: the debias state of value '{name}' does not fit: expected "
            "{'local_step': int >= 0, 'biased': tensor shaped like its average} and an "
            f"entry in 'averages', got {state!r}"
        )
