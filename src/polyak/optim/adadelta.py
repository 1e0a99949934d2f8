"""``tf.compat.v1.train.AdadeltaOptimizer``."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

from polyak.optim._arith import Arith
from polyak.optim._base import (
    FRACTION,
    NONNEGATIVE,
    Operand,
    Ops,
    Params,
    Rule,
    TFOptimizer,
)

__all__ = ["AdadeltaOptimizer"]


class _Scalars(NamedTuple):
    lr: float
    rho: float
    one_minus_rho: float
    epsilon: float


class AdadeltaOptimizer(TFOptimizer):
    """Adadelta as TF1's ``AdadeltaOptimizer(learning_rate=0.001, rho=0.95, epsilon=1e-08)``.

    Update (kernel ``ApplyAdadelta``, also ``SparseApplyAdadelta`` on the touched rows of a
    sparse gradient, duplicates summed), slots ``"accum"`` and ``"accum_update"`` (start at 0)::

        accum = accum * rho + grad * grad * (1 - rho)
        update = sqrt(accum_update + epsilon) * rsqrt(accum + epsilon) * grad
        var -= update * lr
        accum_update = accum_update * rho + update * update * (1 - rho)

    ``rsqrt`` is ``1 / sqrt`` here; TF's vectorized CPU kernel uses Eigen's fast estimate, a few
    ulps off (docs/optim.md has the measured drift).

    torch's nearest, ``torch.optim.Adadelta(params, lr, rho, eps)``, is the same rule (its
    default ``lr=1.0`` against TF's 0.001) computed as ``sqrt(acc_delta + eps) /
    sqrt(square_avg + eps) * grad`` with fused multiply-adds: equal up to rounding.
    """

    rules: ClassVar[dict[str, Rule]] = {"lr": NONNEGATIVE, "rho": FRACTION, "epsilon": NONNEGATIVE}

    def __init__(
        self,
        params: Params,
        learning_rate: float = 0.001,
        rho: float = 0.95,
        epsilon: float = 1e-08,
    ) -> None:
        super().__init__(params, {"lr": learning_rate, "rho": rho, "epsilon": epsilon})

    def _slot_fills(self, group: Any) -> dict[str, float]:
        return {"accum": 0.0, "accum_update": 0.0}

    def _scalars(self, group: dict[str, Any], arith: Arith) -> _Scalars:
        rho = arith.hyper(group["rho"])
        return _Scalars(
            arith.hyper(group["lr"]), rho, arith.sub(1.0, rho), arith.hyper(group["epsilon"])
        )

    def _update(
        self, s: _Scalars, ops: Ops, params: Operand, grads: Operand, *slots: Operand
    ) -> None:
        accum, accum_update = slots
        ops.mul_(accum, s.rho)
        ops.add_scaled_(accum, ops.mul(0, grads, grads), s.one_minus_rho)
        update = ops.add(0, accum_update, s.epsilon)
        ops.sqrt_(update)
        inverse_root = ops.add(1, accum, s.epsilon)  # rsqrt as 1 / sqrt, both rounded
        ops.sqrt_(inverse_root)
        ops.reciprocal_(inverse_root)
        ops.mul_(update, inverse_root)
        ops.mul_(update, grads)
        ops.add_scaled_(params, update, -s.lr)
        ops.mul_(accum_update, s.rho)
        ops.mul_(update, update)
        ops.add_scaled_(accum_update, update, s.one_minus_rho)
