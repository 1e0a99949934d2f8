"""The training step counter, as TensorFlow's ``global_step`` variable.

The optimizer advances it and averages and schedules read it, so it sits below both layers
and depends on nothing else in polyak.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from polyak._checks import check_int, check_mapping

__all__ = ["GlobalStep"]


class GlobalStep:
    """An integer counter of optimizer steps (``tf.train.get_or_create_global_step``).

    ``Optimizer.apply_gradients(..., global_step=step)`` adds one after each applied step,
    ``ExponentialMovingAverage(num_updates=step)`` and schedules read it. It lives on the host,
    so reading it never waits for the device.

    >>> step = GlobalStep()
    >>> step.increment(); int(step)
    1
    """

    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        self.value = check_int(value, "value", "GlobalStep", low=0)

    def increment(self, by: int = 1) -> int:
        """Add ``by`` (an int >= 0: the counter never goes back) and return the new value
        (``tf.compat.v1.assign_add(global_step, by)``)."""
        self.value += check_int(by, "by", "GlobalStep.increment", low=0)
        return self.value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"GlobalStep({self.value})"

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        who = "GlobalStep.load_state_dict"
        check_mapping(state_dict, "state_dict", who)
        if set(state_dict) != {"value"}:
            keys = sorted(map(str, state_dict))
            raise ValueError(f"{who}: expected {{'value': int >= 0}}, got keys {keys}")
        self.value = check_int(state_dict["value"], "'value'", who, low=0)
