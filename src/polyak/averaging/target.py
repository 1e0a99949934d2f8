"""Target networks: a slowly following copy of an online network, as in DQN, DDPG and TD3."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polyak.averaging.ema import ExponentialMovingAverage, IncompatibleKeys

__all__ = ["TargetNetwork"]


class TargetNetwork:
    """A target network kept by an :class:`ExponentialMovingAverage` of the online network.

    - Soft (Polyak) updates, ``TargetNetwork(online, tau=0.005)``: every ``update()`` moves the
      target towards the online weights, ``target = (1 - tau) * target + tau * online``
      (an EMA with ``decay = 1 - tau``, the DDPG paper's and the founding document's
      ``tf.train.ExponentialMovingAverage(decay=1 - TAU)``).
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
        if tau is not None and every is not None:
            raise ValueError(
                "TargetNetwork: give tau (soft updates) or every (hard updates), not both"
            )
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise ValueError(f"TargetNetwork: every must be an int >= 1, got {every!r}")
            self.ema = ExponentialMovingAverage(0.0, update_every=every, **ema_kwargs)
        else:
            tau = 0.005 if tau is None else tau
            if not 0.0 <= tau <= 1.0:
                raise ValueError(f"TargetNetwork: tau must be in [0, 1], got {tau}")
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
