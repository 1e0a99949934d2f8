"""``tf.compat.v1.train.MomentumOptimizer``."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch

from polyak.optim._arith import Arith
from polyak.optim._base import (
    FRACTION_BELOW_ONE,
    NONNEGATIVE,
    Flag,
    Operand,
    Ops,
    Params,
    Rule,
    Tensors,
    TFOptimizer,
)

__all__ = ["MomentumOptimizer"]


class _Scalars(NamedTuple):
    lr: float
    momentum: float
    lr_momentum: float  # lr * momentum, rounded: the sparse Nesterov kernel's factor
    nesterov: bool


class MomentumOptimizer(TFOptimizer):
    """Momentum as TF1's ``MomentumOptimizer(learning_rate, momentum, use_nesterov=False)``.

    Update (kernel ``ApplyMomentum``), slot ``"momentum"`` (``accum``, starts at 0)::

        accum = accum * momentum + grad
        var -= accum * lr                                      # use_nesterov=False
        var -= grad * lr + accum * momentum * lr               # use_nesterov=True

    A sparse gradient (``SparseApplyMomentum``) updates only its rows, duplicates summed; its
    Nesterov form groups the factors as ``lr * g + (lr * momentum) * accum``.

    torch's nearest, ``torch.optim.SGD(params, lr, momentum, nesterov=...)``, is the same rule
    (its buffer also holds raw gradients, so a learning-rate change scales the whole velocity in
    both; Keras's later ``SGD`` folds ``lr`` into the velocity instead). Only roundings differ:
    torch fuses ``var + (-lr) * buf`` into one multiply-add (and Nesterov's ``grad + momentum *
    buf``), TF rounds each product; the trajectories drift apart by ulps.
    """

    rules: ClassVar[dict[str, Rule]] = {
        "lr": NONNEGATIVE,
        "momentum": FRACTION_BELOW_ONE,
        "use_nesterov": Flag(),
    }

    def __init__(
        self, params: Params, learning_rate: float, momentum: float, use_nesterov: bool = False
    ) -> None:
        super().__init__(
            params, {"lr": learning_rate, "momentum": momentum, "use_nesterov": use_nesterov}
        )

    def _slot_fills(self, group: Any) -> dict[str, float]:
        return {"momentum": 0.0}

    def _scalars(self, group: dict[str, Any], arith: Arith) -> _Scalars:
        lr, momentum = arith.hyper(group["lr"]), arith.hyper(group["momentum"])
        return _Scalars(lr, momentum, arith.mul(lr, momentum), group["use_nesterov"])

    def _update(
        self, s: _Scalars, ops: Ops, params: Operand, grads: Operand, *slots: Operand
    ) -> None:
        (accum,) = slots
        ops.scale_add_(accum, s.momentum, grads)
        if not s.nesterov:
            ops.add_scaled_(params, accum, -s.lr)
            return
        step = ops.mul(0, grads, s.lr)
        ops.add_scaled_(step, ops.mul(1, accum, s.momentum), s.lr)
        ops.sub_(params, step)

    def _update_rows(
        self,
        s: _Scalars,
        var: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        slots: Tensors,
    ) -> None:
        if not s.nesterov:
            super()._update_rows(s, var, rows, values, slots)
            return
        (accum,) = slots
        a = accum.index_select(0, rows).mul_(s.momentum).add_(values)
        step = (values * s.lr).add_(a * s.lr_momentum)
        var.index_copy_(0, rows, var.index_select(0, rows).sub_(step))
        accum.index_copy_(0, rows, a)
