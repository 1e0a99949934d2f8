"""The kernels of an averaging step, laid out over memory: the one place that knows where
shadows and variables live.

A step over a model is, per entry, ``shadow.lerp_(variable, 1 - decay)`` (or a copy for
integer entries). Done tensor by tensor that is hundreds of kernel launches; here the entries
are grouped by (shadow device and dtype, variable device and dtype) and every run of entries
that lies back to back in memory on both sides is merged into one span
(:func:`polyak.flat.coalesce`). Shadows are allocated contiguously (:func:`polyak.flat.pack`),
so once the variables are too (:func:`polyak.flatten_parameters_`) a whole step is one
``lerp_`` over two spans.

A plan is built once for a list of entries and reused while every variable keeps its storage:
:meth:`UpdatePlan.is_current` reads one data pointer per variable. Everything here holds
detached views, so a step records nothing for autograd without entering ``no_grad``.

Seams:

- the memory a step reads and writes for a variable or a shadow is :func:`local` of it, the
  tensor itself here; a sharded tensor (a ``DTensor``) maps to the shard this process holds
  there, and every kernel below then runs on local memory only;
- several averages of the same variables read each variable once per step:
  :meth:`UpdatePlan.averaged` hands the (variable, shadow) pairs that lerp to
  :class:`polyak.averaging.multi.FanOutLerp`, and :meth:`UpdatePlan.lerp_` is skipped for the
  averages it served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from polyak import _torch_compat as torch_compat
from polyak.flat import coalesce

__all__ = ["Plans", "UpdatePlan", "copy_each", "copy_spans", "local"]

_data_ptr = torch.Tensor.data_ptr


class Tracked(Protocol):
    """What a plan reads of an entry (:class:`polyak.averaging.entries.Entry`)."""

    source: torch.Tensor | None
    shadow: torch.Tensor
    average: bool


def local(t: torch.Tensor) -> torch.Tensor:
    """The memory a step reads or writes for ``t``: ``t`` itself, detached (no autograd)."""
    return t.detach()


# (shadow spans, variable spans, whether the variables need a cast to the shadows' dtype/device)
Spans = tuple[list[torch.Tensor], list[torch.Tensor], bool]


class UpdatePlan:
    """The kernels of one step over a fixed list of variable entries.

    ``lerps`` are the spans of entries that average, ``copies`` those that are copied
    (integer buffers); ``single`` is the common case after ``flatten_parameters_``: the
    whole step is one ``lerp_`` of two spans.
    """

    __slots__ = ("copies", "entries", "fingerprint", "lerps", "single", "sources")

    def __init__(self, entries: Sequence[Tracked]) -> None:
        self.entries = list(entries)
        self.sources = [e.source for e in entries]
        self.fingerprint = list(map(_data_ptr, self.sources))
        groups: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for e in entries:
            src = e.source
            assert src is not None
            key = (e.average, e.shadow.device, e.shadow.dtype, src.device, src.dtype)
            shadows, sources = groups.setdefault(key, ([], []))
            shadows.append(local(e.shadow))
            sources.append(local(src))
        self.lerps: list[Spans] = []
        self.copies: list[Spans] = []
        for (average, s_dev, s_dtype, v_dev, v_dtype), (shadows, sources) in groups.items():
            s_spans, v_spans = coalesce(shadows, sources)
            cast = s_dev != v_dev or s_dtype != v_dtype
            (self.lerps if average else self.copies).append((s_spans, v_spans, cast))
        self.single: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.copies and len(self.lerps) == 1:
            s_spans, v_spans, cast = self.lerps[0]
            if len(s_spans) == 1 and not cast:
                self.single = (s_spans[0], v_spans[0])

    def is_current(self) -> bool:
        """Whether every variable still has the storage this plan was built on."""
        return list(map(_data_ptr, self.sources)) == self.fingerprint

    def lerp_(self, weight: float | torch.Tensor, *, exact_tf: bool) -> None:
        """``shadow = lerp(shadow, variable, weight)`` over every averaging span.

        ``exact_tf``: TF's op sequence ``shadow -= (shadow - variable) * weight``, each op
        rounded on its own (bitwise TF's float32 result); otherwise one fused lerp, rounded
        once. Weight 1 (decay 0) copies: lerp's ``b - (b - a) * 0`` would turn an inf on
        either side into NaN.
        """
        for shadows, sources, cast in self.lerps:
            if cast:
                sources = [v.to(device=s.device, dtype=s.dtype) for s, v in zip(shadows, sources)]
            w: float | list[torch.Tensor] = weight  # type: ignore[assignment]
            if isinstance(weight, torch.Tensor):
                w = [weight.to(device=shadows[0].device, dtype=shadows[0].dtype)] * len(shadows)
            if exact_tf:
                diff = torch_compat.foreach_sub(shadows, sources)
                torch_compat.foreach_mul_(diff, w)
                torch_compat.foreach_sub_(shadows, diff)
            elif w == 1.0:
                copy_each(shadows, sources)
            elif len(shadows) == 1 and not isinstance(w, list):
                shadows[0].lerp_(sources[0], w)
            else:
                torch_compat.foreach_lerp_(shadows, sources, w)

    def copy_(self, *, averaged: bool = True) -> None:
        """Copy the variables into their shadows: the copied entries, and with ``averaged``
        the averaging ones too (before ``update_after``)."""
        for shadows, sources, _ in (self.lerps + self.copies) if averaged else self.copies:
            copy_each(shadows, sources)

    def averaged(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(variables, shadows)`` of the entries that average, in entry order, as the
        memory a step touches (:func:`local`)."""
        pairs = [(local(e.source), local(e.shadow)) for e in self.entries if e.average]  # type: ignore[arg-type]
        return [v for v, _ in pairs], [s for _, s in pairs]  # type: ignore[misc]

    def lerp_layout(self) -> tuple[tuple[torch.dtype, torch.device], ...]:
        """The dtype and device of each averaging group's shadows: plans of equal layout can
        share one pass."""
        return tuple((s[0].dtype, s[0].device) for s, _, _ in self.lerps)


class Plans:
    """The plans of one average, by the entries they cover (``None``: every variable, as
    ``update()`` takes them), rebuilt when storage moved or the entries changed."""

    __slots__ = ("_generation", "_plans")

    def __init__(self) -> None:
        self._plans: dict[tuple[str, ...] | None, UpdatePlan] = {}
        self._generation = -1

    def get(self, key: tuple[str, ...] | None, generation: int) -> UpdatePlan | None:
        """The plan for ``key`` if it is still good for entries of ``generation``."""
        if generation != self._generation:
            self._plans.clear()
            self._generation = generation
            return None
        plan = self._plans.get(key)
        return plan if plan is not None and plan.is_current() else None

    def put(self, key: tuple[str, ...] | None, plan: UpdatePlan) -> UpdatePlan:
        self._plans[key] = plan
        return plan

    def cached(self, key: tuple[str, ...] | None) -> UpdatePlan | None:
        """The plan last built for ``key``, current or not."""
        return self._plans.get(key)


def copy_each(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])``: one foreach kernel when no copy crosses devices."""
    if all(t.device == s.device for t, s in zip(targets, sources)):
        torch_compat.foreach_copy_(targets, sources)
    else:
        for t, s in zip(targets, sources):
            t.copy_(s)


def copy_spans(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` with as few kernels as the memory layout allows."""
    if targets:
        copy_each(*coalesce(targets, [local(s) for s in sources]))
