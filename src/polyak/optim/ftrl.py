"""``tf.compat.v1.train.FtrlOptimizer``."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch

from polyak.optim._arith import Arith
from polyak.optim._base import (
    NONNEGATIVE,
    POSITIVE,
    Operand,
    Ops,
    Params,
    Real,
    Rule,
    Tensors,
    TFOptimizer,
)
from polyak.optim._exact import FRESH

__all__ = ["FtrlOptimizer"]

_FLOAT32 = Arith(torch.float32)


class _Scalars(NamedTuple):
    lr: float
    l1: float
    two_l2: float  # 2 * (l2 + beta / (2 * lr))
    power: float  # -learning_rate_power
    square_root: bool  # learning_rate_power == -0.5: TF's sqrt branch
    two_l2_shrinkage: float
    shrinkage: bool
    select: bool  # dense kernel's select(|linear| > l1, x / y, 0), where x / y can be 0 / 0
    no_l1: bool  # l1 == 0: x = 0 - linear
    no_l2: bool  # 2 * l2 == 0: y = new_accum**p / lr
    zero: float = 0.0


class FtrlOptimizer(TFOptimizer):
    """FTRL-Proximal as TF1's ``FtrlOptimizer(learning_rate, learning_rate_power=-0.5,
    initial_accumulator_value=0.1, l1_regularization_strength=0.0,
    l2_regularization_strength=0.0, l2_shrinkage_regularization_strength=0.0, beta=0.0)``.

    Slots ``"accum"`` (starts at ``initial_accumulator_value``) and ``"linear"`` (starts at 0).
    With ``p = -learning_rate_power``, ``l2 = l2_regularization_strength + beta / (2 * lr)``
    (TF's adjusted strength, computed in float32) and ``g_s = grad + 2 * l2_shrinkage * var``
    (``g_s = grad`` without shrinkage), the update (kernels ``ApplyFtrl`` / ``ApplyFtrlV2``)::

        new_accum = accum + grad * grad
        linear += g_s - (new_accum**p - accum**p) / lr * var
        x = l1 * sign(linear) - linear
        y = new_accum**p / lr + 2 * l2
        var = x / y if |linear| > l1 else 0
        accum = new_accum

    ``**p`` is ``sqrt`` for ``learning_rate_power=-0.5`` (TF's special case) and ``pow``
    otherwise (torch's and Eigen's ``pow`` differ by an ulp or two). A sparse gradient
    (``SparseApplyFtrl``) updates only its rows, duplicates summed, with ``x = clip(linear,
    -l1, l1) - linear``; for a variable whose rows are single numbers, TF's scalar branch
    (``pow`` even for -0.5, ``linear = (linear + g_s) - sigma * var``), as here.

    torch has no FTRL; the nearest built-in is ``torch.optim.Adagrad`` (FTRL-Proximal with
    ``l1 = l2 = 0`` and power -0.5 is a form of Adagrad's per-coordinate step size).
    """

    rules: ClassVar[dict[str, Rule]] = {
        "lr": POSITIVE,
        "learning_rate_power": Real(high=0.0),
        "initial_accumulator_value": NONNEGATIVE,
        "l1_regularization_strength": NONNEGATIVE,
        "l2_regularization_strength": NONNEGATIVE,
        "l2_shrinkage_regularization_strength": NONNEGATIVE,
        "beta": NONNEGATIVE,
    }

    def __init__(
        self,
        params: Params,
        learning_rate: float,
        learning_rate_power: float = -0.5,
        initial_accumulator_value: float = 0.1,
        l1_regularization_strength: float = 0.0,
        l2_regularization_strength: float = 0.0,
        l2_shrinkage_regularization_strength: float = 0.0,
        beta: float | None = 0.0,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": learning_rate,
                "learning_rate_power": learning_rate_power,
                "initial_accumulator_value": initial_accumulator_value,
                "l1_regularization_strength": l1_regularization_strength,
                "l2_regularization_strength": l2_regularization_strength,
                "l2_shrinkage_regularization_strength": l2_shrinkage_regularization_strength,
                "beta": 0.0 if beta is None else beta,  # TF's default is None, meaning 0
            },
        )

    def _slot_fills(self, group: Any) -> dict[str, float]:
        return {"accum": float(group["initial_accumulator_value"]), "linear": 0.0}

    def _scalars(self, group: dict[str, Any], arith: Arith) -> _Scalars:
        a, f = arith, _FLOAT32
        lr32 = f.hyper(group["lr"])
        # TF's _prepare, on float32 tensors: l2 + beta / (2 * maximum(lr, 1e-36)).
        l2 = f.add(
            f.hyper(group["l2_regularization_strength"]),
            f.div(f.hyper(group["beta"]), f.mul(2.0, f.max(lr32, f.hyper(1e-36)))),
        )
        l2 = a.round(l2)
        power = a.hyper(group["learning_rate_power"])
        shrinkage = float(group["l2_shrinkage_regularization_strength"])
        return _Scalars(
            lr=a.round(lr32),
            l1=a.hyper(group["l1_regularization_strength"]),
            two_l2=a.mul(2.0, l2),
            power=-power,
            square_root=power == -0.5,
            two_l2_shrinkage=a.mul(2.0, a.hyper(shrinkage)),
            shrinkage=shrinkage > 0.0,  # TF's ApplyFtrlV2 only then
            select=float(group["initial_accumulator_value"]) == 0.0 and l2 == 0.0,
            no_l1=float(group["l1_regularization_strength"]) == 0.0,
            no_l2=l2 == 0.0,
        )

    def _power(self, s: _Scalars, ops: Ops, k: int, tensors: Any) -> Any:
        """``tensors ** p`` into temporary ``k``: TF's sqrt branch for -0.5, else pow."""
        if s.square_root:
            return ops.sqrt(k, tensors)
        return ops.pow(k, tensors, s.power)

    def _update(
        self, s: _Scalars, ops: Ops, params: Operand, grads: Operand, *slots: Operand
    ) -> None:
        accum, linear = slots
        if s.shrinkage:  # g_s = grad + 2 * l2_shrinkage * var
            shrunk = ops.mul(0, params, s.two_l2_shrinkage)
            ops.add_(shrunk, grads)
        else:
            shrunk = grads
        # sigma = (new_accum**p - accum**p) / lr * var, negated (exact) to stay in place.
        minus_sigma = self._power(s, ops, 1, accum)
        ops.add_(accum, ops.mul(2, grads, grads))
        root = self._power(s, ops, 2, accum)
        ops.sub_(minus_sigma, root)
        ops.div_(minus_sigma, s.lr)
        ops.mul_(minus_sigma, params)
        ops.add_(minus_sigma, shrunk)
        ops.add_(linear, minus_sigma)
        ops.div_(root, s.lr)  # y = new_accum**p / lr + 2 * l2
        if not s.no_l2:  # adding 0 changes no y: y >= +0 (a root of new_accum >= +0) or NaN
            ops.add_(root, s.two_l2)
        if s.no_l1:
            # l1 * sign(linear) - linear is 0 - linear for linear != 0, and where linear is
            # +0 or -0 TF's select gives +0, as 0 - linear does
            x = ops.rsub(0, s.zero, linear)
        else:  # l1 * sign(linear) - linear where |linear| > l1, else (linear - linear) = 0
            x = ops.clamp(0, linear, -s.l1, s.l1)
            ops.sub_(x, linear)
        if s.select:  # y can be 0 only with a zero initial accumulator and l2 = 0
            ops.div_(x, root)
            ops.keep_where_abs_above_(x, linear, s.l1)
            ops.copy_(params, x)
        else:
            ops.assign_quotient_(params, x, root)

    def _update_rows(
        self,
        s: _Scalars,
        var: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        slots: Tensors,
    ) -> None:
        if var.shape[1:].numel() != 1:
            super()._update_rows(s._replace(select=False), var, rows, values, slots)
            return
        # TF's scalar branch, element by element.
        accum, linear = slots
        a, lin, v = (t.index_select(0, rows) for t in (accum, linear, var))
        g = values + v * s.two_l2_shrinkage if s.shrinkage else values
        new_a = a + values * values
        # TF calls pow here even for power 0.5; the square root is its exact value
        root, old_root = self._power(s._replace(square_root=s.power == 0.5), FRESH, 0, [new_a, a])
        sigma = (root - old_root).div_(s.lr)
        new_lin = (lin + g).sub_(sigma.mul_(v))
        quadratic = root.div_(s.lr).add_(s.two_l2)
        adjust = new_lin.clamp(-s.l1, s.l1)  # max(min(l, l1), -l1)
        var.index_copy_(0, rows, adjust.sub_(new_lin).div_(quadratic))
        accum.index_copy_(0, rows, new_a)
        linear.index_copy_(0, rows, new_lin)
