"""``tf.compat.v1.train.RMSPropOptimizer``."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch

from polyak.optim._arith import Arith
from polyak.optim._base import (
    FRACTION,
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
from polyak.optim._exact import sqrt

__all__ = ["RMSPropOptimizer"]


class _Scalars(NamedTuple):
    lr: float
    decay: float
    one_minus_decay: float
    momentum: float
    epsilon: float
    centered: bool


class RMSPropOptimizer(TFOptimizer):
    """RMSProp as TF1's ``RMSPropOptimizer(learning_rate, decay=0.9, momentum=0.0,
    epsilon=1e-10, centered=False)``.

    Update (kernels ``ApplyRMSProp`` / ``ApplyCenteredRMSProp``), slots ``"rms"`` (starts at
    **1**), ``"momentum"`` (starts at 0) and, if centered, ``"mg"`` (starts at 0)::

        rms += (grad * grad - rms) * (1 - decay)
        mg  += (grad - mg) * (1 - decay)                              # centered
        denominator = rms + epsilon                                   # plain
        denominator = (rms - mg * mg) + epsilon                       # centered
        momentum = momentum * momentum_coefficient + (grad * lr) / sqrt(denominator)
        var -= momentum

    A sparse gradient (``SparseApplyRMSProp``) updates only its rows, duplicates summed, with
    the kernel's other grouping: ``rms = rms * decay + grad**2 * (1 - decay)``, ``momentum =
    momentum * coefficient + rsqrt(denominator) * lr * grad`` (centered: ``denominator = rms +
    epsilon - mg**2``).

    torch's nearest, ``torch.optim.RMSprop(params, lr, alpha=decay, eps, momentum,
    centered)``, differs in three ways that change training: its mean square starts at 0, not
    1, so its first steps move about ``lr / sqrt(1 - decay)`` (3.2 ``lr``) whatever the
    gradients' scale, where TF's move about ``lr * |grad|`` for gradients well below 1; its
    epsilon is
    added outside the square root (``sqrt(v) + eps``, with default 1e-8); and its momentum
    buffer holds ``grad / denominator`` with the learning rate applied after, so a learning-rate
    change acts at once on the whole velocity, where TF's keeps the old rates in it. Measured
    in docs/optim.md. timm's ``RMSpropTF`` and Stable-Baselines3's ``RMSpropTFLike`` reproduce
    TF's rule with a per-tensor Python loop.
    """

    rules: ClassVar[dict[str, Rule]] = {
        "lr": NONNEGATIVE,
        "decay": FRACTION,
        "momentum": FRACTION_BELOW_ONE,
        "epsilon": NONNEGATIVE,
        "centered": Flag(),
    }

    def __init__(
        self,
        params: Params,
        learning_rate: float,
        decay: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-10,
        centered: bool = False,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": learning_rate,
                "decay": decay,
                "momentum": momentum,
                "epsilon": epsilon,
                "centered": centered,
            },
        )

    def _slot_fills(self, group: Any) -> dict[str, float]:
        if group["centered"]:
            return {"rms": 1.0, "momentum": 0.0, "mg": 0.0}
        return {"rms": 1.0, "momentum": 0.0}

    def _scalars(self, group: dict[str, Any], arith: Arith) -> _Scalars:
        decay = arith.hyper(group["decay"])
        return _Scalars(
            arith.hyper(group["lr"]),
            decay,
            arith.sub(1.0, decay),
            arith.hyper(group["momentum"]),
            arith.hyper(group["epsilon"]),
            group["centered"],
        )

    def _update(
        self, s: _Scalars, ops: Ops, params: Operand, grads: Operand, *slots: Operand
    ) -> None:
        rms, mom = slots[0], slots[1]
        delta = ops.mul(0, grads, grads)
        ops.sub_(delta, rms)
        ops.add_scaled_(rms, delta, s.one_minus_decay)
        if s.centered:
            mg = slots[2]
            ops.add_scaled_(mg, ops.sub(0, grads, mg), s.one_minus_decay)
            denominator = ops.sub(1, rms, ops.mul(0, mg, mg))
            ops.add_(denominator, s.epsilon)
        else:
            denominator = ops.add(1, rms, s.epsilon)
        ops.sqrt_(denominator)
        ops.mul_(mom, s.momentum)
        ops.add_scaled_quotient_(mom, grads, denominator, s.lr)
        ops.sub_(params, mom)

    def _update_rows(
        self,
        s: _Scalars,
        var: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        slots: Tensors,
    ) -> None:
        picked = [t.index_select(0, rows) for t in slots]
        rms, mom = picked[0], picked[1]
        rms.mul_(s.decay).add_((values * values).mul_(s.one_minus_decay))
        denominator = rms + s.epsilon
        if s.centered:
            mg = picked[2]
            mg.mul_(s.decay).add_(values * s.one_minus_decay)
            denominator.sub_(mg * mg)
        (scale,) = sqrt([denominator], out=[denominator])
        scale.reciprocal_().mul_(s.lr).mul_(values)
        mom.mul_(s.momentum).add_(scale)
        var.index_copy_(0, rows, var.index_select(0, rows).sub_(mom))
        for t, r in zip(slots, picked):
            t.index_copy_(0, rows, r)
