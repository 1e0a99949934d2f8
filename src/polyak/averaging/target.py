"""Target networks: a slowly following copy of an online network, as in DQN, DDPG and TD3."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polyak._checks import check_int, check_real
from polyak.averaging.ema import ExponentialMovingAverage, IncompatibleKeys

__all__ = ["TargetNetwork"]


class TargetNetwork:
    """A target network kept by an :class:`ExponentialMovingAverage` of the online network.

    - Soft (Polyak) updates, ``TargetNetwork(online, tau=0.005)``: every ``update()`` moves the
      target towards the online weights, ``target = (1 - tau) * target + tau * online``
      (an EMA with ``decay = 1 - tau``: DDPG's target update, Lillicrap et al. 2016, written
      in TF1 as ``tf.train.ExponentialMovingAverage(decay=1 - TAU)``).
    - Hard updates, ``TargetNetwork(online, every=N)``: every ``N``-th ``update()`` copies the
      online weights (DQN's ``C``; an EMA with decay 0 stepping every ``N`` calls).

    The target starts equal to the online network. ``target.module`` is an ``nn.Module`` whose
    parameters are the EMA's shadows (no second copy; ``requires_grad=False``), and
    ``target(x)`` calls it. Extra keyword arguments go to the EMA (``shadow_dtype``,
    ``device``, ``buffers``, ``update_after``).
    """

    def __init__(
        self,
        online: nn.Module,
        tau: float | None = None,
        *,
        every: int | None = None,
        **ema_kwargs: Any,
    ) -> None:
        who = "TargetNetwork"
        if not isinstance(online, nn.Module):
            raise TypeError(
                f"{who}: online must be the online network (an nn.Module), got "
                f"{type(online).__name__}"
            )
        if tau is not None and every is not None:
            raise ValueError(f"{who}: give tau (soft updates) or every (hard updates), not both")
        taken = sorted({"decay", "update_every"} & set(ema_kwargs))
        if taken:
            raise TypeError(
                f"{who}: {taken} are set by tau (decay = 1 - tau) or every (update_every = "
                "every); pass those instead"
            )
        if every is not None:
            every = check_int(every, "every", who, low=1)
            self.ema = ExponentialMovingAverage(0.0, update_every=every, **ema_kwargs)
        else:
            tau = check_real(
                0.005 if tau is None else tau,
                "tau",
                who,
                low=0.0,
                high=1.0,
                hint="tau is the fraction of the way to the online weights, in [0, 1]",
            )
            self.ema = ExponentialMovingAverage(1.0 - tau, **ema_kwargs)
        self.tau = tau
        self.every = every
        self.online = online
        self.ema.track(online)
        self.module = self.ema.average_module(online)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def update(self) -> None:
        """One soft step, or one call towards the next hard copy."""
        self.ema.update()

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> IncompatibleKeys:
        return self.ema.load_state_dict(state_dict, strict=strict)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TargetNetwork:
        """Move the target's weights; ``.module`` is rebuilt on them."""
        self.ema.to(device=device, dtype=dtype)
        self.module = self.ema.average_module(self.online)
        return self

    def __repr__(self) -> str:
        rule = f"every={self.every}" if self.every is not None else f"tau={self.tau}"
        return f"TargetNetwork({type(self.online).__name__}, {rule}, step={self.ema.step})"
