"""``tf.compat.v1.train.AdagradOptimizer``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from polyak.optim._arith import Arith
from polyak.optim._base import (
    NONNEGATIVE,
    POSITIVE,
    Operand,
    Ops,
    Params,
    Rule,
    Tensors,
    TFOptimizer,
)
from polyak.optim._exact import add_scaled_quotient_, sqrt

__all__ = ["AdagradOptimizer"]


class AdagradOptimizer(TFOptimizer):
    """Adagrad as TF1's ``AdagradOptimizer(learning_rate, initial_accumulator_value=0.1)``.

    Update (kernel ``ApplyAdagrad``), slot ``"accumulator"`` (starts at
    ``initial_accumulator_value``, which must be > 0)::

        accumulator += grad * grad
        var -= grad * lr * rsqrt(accumulator)

    ``rsqrt`` is computed as ``1 / sqrt`` (two roundings), TF's scalar form; TF's vectorized
    CPU kernels use Eigen's fast ``rsqrt`` (a hardware estimate refined once, a few ulps off
    and machine-dependent), so over many steps the two drift apart by ulps (docs/optim.md has
    the measured figures). A sparse gradient (``SparseApplyAdagrad``) updates only its rows,
    duplicates summed; for a variable whose rows are single numbers TF's kernel computes
    ``var -= lr * grad / sqrt(accumulator)`` instead, and so does this class.

    torch's nearest, ``torch.optim.Adagrad(params, lr, initial_accumulator_value=0.1,
    eps=1e-10)``, divides by ``sqrt(accumulator) + eps`` and starts at 0 by default: with
    ``initial_accumulator_value=0.1, eps=0`` it is the same rule up to rounding.
    """

    rules: ClassVar[dict[str, Rule]] = {"lr": NONNEGATIVE, "initial_accumulator_value": POSITIVE}

    def __init__(
        self, params: Params, learning_rate: float, initial_accumulator_value: float = 0.1
    ) -> None:
        super().__init__(
            params, {"lr": learning_rate, "initial_accumulator_value": initial_accumulator_value}
        )

    def _slot_fills(self, group: Any) -> dict[str, float]:
        return {"accumulator": float(group["initial_accumulator_value"])}

    def _scalars(self, group: dict[str, Any], arith: Arith) -> float:
        return arith.hyper(group["lr"])

    def _update(
        self, lr: float, ops: Ops, params: Operand, grads: Operand, *slots: Operand
    ) -> None:
        (accum,) = slots
        ops.add_(accum, ops.mul(0, grads, grads))
        inverse_root = ops.sqrt(0, accum)  # rsqrt as 1 / sqrt, both rounded
        ops.reciprocal_(inverse_root)
        step = ops.mul(1, grads, lr)
        ops.mul_(step, inverse_root)
        ops.sub_(params, step)

    def _update_rows(
        self,
        lr: float,
        var: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        slots: Tensors,
    ) -> None:
        if var.shape[1:].numel() != 1:
            super()._update_rows(lr, var, rows, values, slots)
            return
        (accum,) = slots  # TF's scalar branch: lr * g / sqrt(a)
        a = accum.index_select(0, rows).add_(values * values)
        v = var.index_select(0, rows)
        add_scaled_quotient_([v], [values], sqrt([a]), -lr)
        var.index_copy_(0, rows, v)
        accum.index_copy_(0, rows, a)
