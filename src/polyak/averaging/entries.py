"""The entries of an average: one per tracked tensor, found by name or by identity.

TF keys a shadow by its variable's name (``<variable>/ExponentialMovingAverage``); here an
entry's name is

- the qualified name of a module's parameter or buffer, without wrapper prefixes
  (:func:`polyak.averaging.names.canonical_name`), for a module;
- the key, for a ``{name: tensor}`` mapping;
- TF's default variable names ``Variable``, ``Variable_1``, ... for tensors passed without
  names (and the tensor's identity finds the entry again).

Two kinds of entries, as TF's Variable and Tensor: a *variable* (a ``Parameter``, a module
buffer, a leaf tensor that requires grad) is re-read at every step, and its shadow starts at
its value; a *value* (a loss, a batch statistic) is a new tensor at every step, passed by
name, and its shadow starts at zero (with TF's zero-debias state when asked).

:class:`Registry` checks a ``var_list`` completely before it creates or repoints anything,
and it notices when a module stops holding a tracked variable (``m.weight =
nn.Parameter(...)``) at the cost of one int compare per step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from polyak.averaging import assignments
from polyak.averaging.names import BufferPolicy, canonical_name, module_tensors, tensor_owners
from polyak.flat import pack

__all__ = [
    "Entry",
    "Registry",
    "VarList",
    "check_can_average",
    "check_dense",
    "check_unchanged",
    "is_variable",
    "tensor_list",
]

VarList = nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor] | torch.Tensor
# (name, tensor, average?, is value?) for each entry of a var_list.
Item = tuple[str, torch.Tensor, bool, bool]


class Entry:
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


class Registry:
    """The entries of one average, by name (in tracking order) and by tensor identity.

    ``generation`` changes whenever an entry is created or follows a new tensor, so that
    whatever was built from the entries (an update plan) knows to rebuild.
    """

    __slots__ = ("_assignments_seen", "by_id", "entries", "generation")

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.by_id: dict[int, Entry] = {}
        self.generation = 0
        self._assignments_seen = assignments.count()

    def __len__(self) -> int:
        return len(self.entries)

    def variables(self) -> list[Entry]:
        """The entries of variables, in tracking order."""
        return [e for e in self.entries.values() if not e.is_value]

    def lookup(self, var: torch.Tensor | str) -> Entry | None:
        """The entry of a tracked tensor or of a name (wrapper prefixes removed), or None."""
        if isinstance(var, str):
            return self.entries.get(canonical_name(var))
        if isinstance(var, torch.Tensor):
            return self.by_id.get(id(var))
        raise TypeError(
            f"ExponentialMovingAverage: var must be a tracked tensor or its name, got "
            f"{type(var).__name__}"
        )

    # ------------------------------------------------------------------ tracking

    def prepare(
        self,
        var_list: VarList,
        *,
        buffers: BufferPolicy,
        shadow_dtype: torch.dtype | None,
        device: torch.device | None,
        zero_debias: bool,
    ) -> tuple[list[Entry], list[tuple[Entry, torch.Tensor]]]:
        """Check ``var_list``, track its new entries, return its variables and its values
        (each with the tensor passed now)."""
        items = self._resolve(var_list, buffers)
        new: list[Item] = []
        repoint: list[tuple[Entry, torch.Tensor]] = []
        listed: list[Entry | None] = []  # None: created below, in the order of `new`
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
            check_dense(name, tensor)
            entry = self.entries.get(name)
            if not is_value:
                first = variables.setdefault(id(tensor), name)
                tracked = self.by_id.get(id(tensor))
                if first != name or (tracked is not None and tracked.name != name):
                    other = (
                        f"listed as '{first}'"
                        if first != name
                        else (
                            f"tracked as '{tracked.name}'"  # type: ignore[union-attr]
                        )
                    )
                    raise ValueError(
                        f"ExponentialMovingAverage: the tensor listed as '{name}' is also "
                        f"{other}; a variable has one average: pass it once, under one name"
                    )
            if entry is None:
                check_can_average(name, tensor, average)
                new.append(item)
            else:
                _check_same_kind(entry, tensor, is_value)
                if not is_value and entry.source is not tensor:
                    _check_may_follow(entry, var_list)
                    repoint.append((entry, tensor))
            listed.append(entry)
        # Everything is checked: from here on the entries change (track undoes its own work
        # if an allocation or copy fails).
        created = iter(
            self.track(new, shadow_dtype=shadow_dtype, device=device, zero_debias=zero_debias)
        )
        for entry, tensor in repoint:
            self.by_id.pop(id(entry.source), None)
            entry.source = tensor
            self.by_id[id(tensor)] = entry
        if repoint:
            self.generation += 1
        entries = [e if e is not None else next(created) for e in listed]
        if isinstance(var_list, nn.Module):
            self._record_owners(var_list, entries, {id(e) for e, _ in repoint})
        values = [(e, item[1]) for e, item in zip(entries, items) if e.is_value]
        return [e for e in entries if not e.is_value], values

    def track(
        self,
        new: list[Item],
        *,
        shadow_dtype: torch.dtype | None,
        device: torch.device | None,
        zero_debias: bool,
    ) -> list[Entry]:
        """Create shadows for ``new`` entries in fresh contiguous buffers: a variable's
        starts at its value, a value's at zero (with a zero ``biased`` when debiasing)."""
        if not new:
            return []
        specs = []
        for _, tensor, average, _ in new:
            dtype = tensor.dtype
            if average and shadow_dtype is not None:
                dtype = shadow_dtype
            specs.append((tensor.shape, dtype, device or tensor.device))
        entries = []
        with torch.no_grad():
            for (name, tensor, average, is_value), shadow in zip(new, pack(specs, zeros=True)):
                biased = None
                if is_value:
                    if zero_debias:
                        biased = torch.zeros_like(shadow)
                    source = None
                else:
                    shadow.copy_(tensor.detach())
                    source = tensor
                entries.append(Entry(name, source, shadow, average, biased))
        # Only now, with every shadow made, do the entries join the average.
        for entry in entries:
            if entry.source is not None:
                self.by_id[id(entry.source)] = entry
            self.entries[entry.name] = entry
        self.generation += 1
        return entries

    def move_shadows(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """Move every shadow (``dtype`` applies to floating ones) into new contiguous buffers,
        keeping the shadow tensor objects. Everything is allocated and copied before any
        shadow is repointed, so a failure (out of memory) leaves the entries as they were."""
        entries = list(self.entries.values())
        specs = [
            (
                e.shadow.shape,
                dtype if (dtype and e.shadow.is_floating_point()) else e.shadow.dtype,
                e.shadow.device if device is None else device,
            )
            for e in entries
        ]
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
        self.generation += 1

    def _resolve(self, var_list: VarList, buffers: BufferPolicy) -> list[Item]:
        """``(name, tensor, average?, is_value?)`` for each entry of ``var_list``."""
        if isinstance(var_list, nn.Module):
            return [(n, t, avg, False) for n, t, avg in module_tensors(var_list, buffers)]
        if isinstance(var_list, Mapping):
            items = []
            for key, tensor in var_list.items():
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(
                        f"ExponentialMovingAverage.apply: '{key}' is a "
                        f"{type(tensor).__name__}, not a tensor"
                    )
                tracked = self.by_id.get(id(tensor))
                is_value = tracked is None and not is_variable(tensor)
                items.append((canonical_name(str(key)), tensor, True, is_value))
            return items
        tensors = tensor_list(var_list, "ExponentialMovingAverage.apply", "var_list")
        items = []
        fresh_names = self._fresh_names()
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"ExponentialMovingAverage.apply: entry {i} is a {type(tensor).__name__}; "
                    "pass a module, a {name: tensor} mapping, or a list of tensors"
                )
            entry = self.by_id.get(id(tensor))
            if entry is not None:
                items.append((entry.name, tensor, entry.average, False))
                continue
            if not is_variable(tensor):
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
            if name not in self.entries:
                yield name

    # ------------------------------------------------------------------ owner modules

    def check_owners(self) -> None:
        """Raise if a variable tracked from a module is no longer that module's tensor
        (looked at only after some module anywhere had a tensor or submodule assigned)."""
        if self._assignments_seen == assignments.count():
            return
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
        self._assignments_seen = assignments.count()

    def _record_owners(self, module: nn.Module, entries: list[Entry], repointed: set[int]) -> None:
        """Remember which attributes of ``module``'s submodules hold the variables of
        ``entries`` (walking the module only when an entry is new to it or was repointed)."""
        fresh = [e for e in entries if e.owners is None or id(e) in repointed]
        if not fresh:
            return
        assignments.watch()
        owners = tensor_owners(module)
        for e in fresh:
            e.owners = (module, owners.get(id(e.source), []))
        if self._assignments_seen == assignments.count() or self._find_replaced() is None:
            self._assignments_seen = assignments.count()

    def _find_replaced(self) -> tuple[Entry, str] | None:
        for e in self.entries.values():
            where = e.replaced_in()
            if where is not None:
                return e, where
        return None


# ---------------------------------------------------------------------- checks


def is_variable(t: torch.Tensor) -> bool:
    """TF's Variable, in PyTorch: a Parameter, or a leaf tensor that requires grad."""
    return isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad)


def tensor_list(value: Any, who: str, what: str) -> list[Any]:
    """A single tensor or an iterable of entries, as a list (entries are checked later)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{who}: {what} must be a module, a {{name: tensor}} mapping or a list of tensors, "
            f"got {type(value).__name__}"
        )
    return list(value)


def check_dense(name: str, tensor: torch.Tensor) -> None:
    if tensor.layout != torch.strided:
        raise TypeError(
            f"ExponentialMovingAverage: '{name}' is a {tensor.layout} tensor; only dense "
            "(strided) tensors can be averaged: pass t.to_dense(), or leave it out"
        )


def check_can_average(name: str, tensor: torch.Tensor, average: bool) -> None:
    if average and not tensor.is_floating_point():
        raise TypeError(
            f"ExponentialMovingAverage: '{name}' is {tensor.dtype}; only floating tensors can be "
            "averaged (as TF: half, bfloat16, float or double). Integer state such as a "
            "counter is copied when it is a module buffer: pass the module, or leave it out."
        )


def check_unchanged(entry: Entry, tensor: torch.Tensor) -> None:
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


def _check_same_kind(entry: Entry, tensor: torch.Tensor, is_value: bool) -> None:
    if entry.is_value != is_value:
        was = "a value" if entry.is_value else "a variable"
        now = "a value" if is_value else "a variable"
        raise TypeError(
            f"ExponentialMovingAverage: '{entry.name}' was tracked as {was} and is now "
            f"{now}; use a different name for it"
        )
    check_unchanged(entry, tensor)


def _check_may_follow(entry: Entry, var_list: VarList) -> None:
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
