"""The training step counter, as TensorFlow's ``global_step`` variable."""

from __future__ import annotations

from typing import Any

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
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"GlobalStep: value must be a non-negative int, got {value!r}")
        self.value = value

    def increment(self, by: int = 1) -> int:
        """Add ``by`` and return the new value (``tf.compat.v1.assign_add(global_step, by)``)."""
        self.value += by
        return self.value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"GlobalStep({self.value})"

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        value = state_dict.get("value")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                "GlobalStep.load_state_dict: expected {'value': non-negative int}, "
                f"got {state_dict!r}"
            )
        self.value = value
