"""Averages of values: TensorFlow's ``assign_moving_average``, with its exact arithmetic.

A *value* (a loss, a batch statistic) is a new tensor at every step; its shadow starts at
zero, so early averages are biased towards zero. TF's ``zero_debias=True`` keeps a second
accumulator and a step count and divides the bias out::

    biased     = biased - (biased - value) * (1 - decay)
    local_step = local_step + 1
    shadow     = biased / (1 - decay ** local_step)

Values are few and small, so each follows TF's separately rounded ops
(``v -= (v - value) * (1 - decay)``) rather than a fused lerp: the float32 results are TF's
bit for bit.
"""

from __future__ import annotations

from typing import Protocol

import torch

from polyak.averaging.decay import Weight, debias_factor

__all__ = ["average_value", "copy_value"]


class ValueEntry(Protocol):
    """What a value's average keeps (:class:`polyak.averaging.entries.Entry`)."""

    shadow: torch.Tensor
    biased: torch.Tensor | None  # TF's `biased` accumulator when debiasing, else None
    local_step: int  # TF's `local_step`


def average_value(entry: ValueEntry, value: torch.Tensor, weight: Weight) -> None:
    """One step of ``entry``'s average towards ``value`` with weight ``1 - decay``."""
    shadow = entry.shadow
    value = value.detach().to(device=shadow.device, dtype=shadow.dtype)
    if isinstance(weight, torch.Tensor):
        weight = weight.to(device=shadow.device, dtype=shadow.dtype)
    if entry.biased is None:
        shadow.sub_((shadow - value) * weight)
        return
    biased = entry.biased
    biased.sub_((biased - value) * weight)
    entry.local_step += 1
    torch.div(biased, debias_factor(weight, entry.local_step), out=shadow)


def copy_value(entry: ValueEntry, value: torch.Tensor) -> None:
    """Set the average to ``value`` (the copies before ``update_after``); debiasing restarts
    with the first averaged step."""
    entry.shadow.copy_(value.detach())
    if entry.biased is not None:
        entry.biased.zero_()
        entry.local_step = 0
