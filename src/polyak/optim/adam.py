"""``tf.compat.v1.train.AdamOptimizer``."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch

from polyak.optim._arith import Arith, to_float32
from polyak.optim._base import (
    FRACTION_BELOW_ONE,
    NONNEGATIVE,
    Operand,
    Ops,
    Params,
    Rule,
    Tensors,
    TFOptimizer,
)
from polyak.optim._exact import add_scaled_quotient_, sqrt
from polyak.optim._sparse import as_rows, slices, sum_duplicates

__all__ = ["AdamOptimizer"]


class _Scalars(NamedTuple):
    alpha: float  # lr * sqrt(1 - beta2_power) / (1 - beta1_power)
    one_minus_beta1: float
    one_minus_beta2: float
    epsilon: float
    beta1: float
    beta2: float


class AdamOptimizer(TFOptimizer):
    """Adam as TF1's ``AdamOptimizer(learning_rate=0.001, beta1=0.9, beta2=0.999,
    epsilon=1e-08)``.

    Update (kernel ``ApplyAdam``), slots ``"m"`` and ``"v"`` (start at 0)::

        lr_t = lr * sqrt(1 - beta2_power) / (1 - beta1_power)
        m += (grad - m) * (1 - beta1)
        v += (grad * grad - v) * (1 - beta2)
        var -= (m * lr_t) / (sqrt(v) + epsilon)

    then, once per step, ``beta1_power *= beta1`` and ``beta2_power *= beta2``. The powers are
    float32 (TF's non-slot variables, created at ``beta1``/``beta2``), kept once per param
    group in ``group["beta1_power"]``/``group["beta2_power"]`` and advanced at *every* step
    that updates anything, so a parameter that had no gradient for a while gets the same bias
    correction as the others, as in TF. A group added later with ``add_param_group`` starts
    its own powers at ``beta1``/``beta2`` unless the group passes them (TF would share the
    optimizer's: pass ``beta1_power=opt.param_groups[0]["beta1_power"]`` and the same for
    ``beta2_power``).

    A sparse gradient is TF's ``_apply_sparse``: duplicates summed, then ``m = m * beta1``
    and ``v = v * beta2`` on *every* row, ``(1 - beta1) * grad`` and ``(1 - beta2) * grad**2``
    added on the touched rows, and every row moves by ``lr_t * m / (sqrt(v) + epsilon)``.

    torch's nearest, ``torch.optim.Adam(params, lr, betas=(beta1, beta2), eps)``, divides the
    bias-corrected ``m`` by ``sqrt(v / (1 - beta2**t)) + eps``. Written that way, TF's
    denominator is ``sqrt(v / (1 - beta2**t)) + epsilon / sqrt(1 - beta2**t)``: TF's epsilon
    ("epsilon hat" in the paper) weighs ``1 / sqrt(1 - beta2**t)`` times more, about 31.6 times
    at the first step with ``beta2=0.999``, falling to 1 as training goes on. The two agree
    while epsilon is negligible against ``sqrt(v)``; with a large epsilon (Inception used 1.0)
    or small gradients they train differently. torch also counts steps per parameter, so a
    parameter that had no gradients lags in bias correction.
    """

    rules: ClassVar[dict[str, Rule]] = {
        "lr": NONNEGATIVE,
        "beta1": FRACTION_BELOW_ONE,
        "beta2": FRACTION_BELOW_ONE,
        "epsilon": NONNEGATIVE,
        "beta1_power": FRACTION_BELOW_ONE,
        "beta2_power": FRACTION_BELOW_ONE,
    }

    def __init__(
        self,
        params: Params,
        learning_rate: float = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-08,
    ) -> None:
        super().__init__(
            params, {"lr": learning_rate, "beta1": beta1, "beta2": beta2, "epsilon": epsilon}
        )

    def _slot_fills(self, group: Any) -> dict[str, float]:
        return {"m": 0.0, "v": 0.0}

    def _derived(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "beta1_power": to_float32(float(group["beta1"])),
            "beta2_power": to_float32(float(group["beta2"])),
        }

    def _scalars(self, group: dict[str, Any], arith: Arith) -> _Scalars:
        a = arith
        beta1_power, beta2_power = a.round(group["beta1_power"]), a.round(group["beta2_power"])
        beta1, beta2 = a.hyper(group["beta1"]), a.hyper(group["beta2"])
        root = a.sqrt(a.sub(1.0, beta2_power))
        alpha = a.div(a.mul(a.hyper(group["lr"]), root), a.sub(1.0, beta1_power))
        return _Scalars(
            alpha, a.sub(1.0, beta1), a.sub(1.0, beta2), a.hyper(group["epsilon"]), beta1, beta2
        )

    def _update(
        self, s: _Scalars, ops: Ops, params: Operand, grads: Operand, *slots: Operand
    ) -> None:
        m, v = slots
        ops.add_scaled_(m, ops.sub(0, grads, m), s.one_minus_beta1)
        delta = ops.mul(0, grads, grads)
        ops.sub_(delta, v)
        ops.add_scaled_(v, delta, s.one_minus_beta2)
        denominator = ops.sqrt(0, v)
        ops.add_(denominator, s.epsilon)
        ops.add_scaled_quotient_(params, m, denominator, -s.alpha)

    def _update_sparse(
        self, s: _Scalars, param: torch.Tensor, grad: torch.Tensor, slots: Tensors
    ) -> None:
        k = grad.sparse_dim()
        rows, values = sum_duplicates(*slices(grad))
        m, v = (as_rows(t, k) for t in slots)
        m.mul_(s.beta1).index_add_(0, rows, values * s.one_minus_beta1)
        # TF writes (grad * grad) * (1 - beta2); its graph optimizer (grappler's
        # MinimizeBroadcasts) multiplies the scalar in first: grad * (1 - beta2) * grad.
        v.mul_(s.beta2).index_add_(0, rows, (values * s.one_minus_beta2).mul_(values))
        (denominator,) = sqrt([v])
        denominator.add_(s.epsilon)
        add_scaled_quotient_([param.view(m.shape)], [m], [denominator], -s.alpha)

    def _after_step(self) -> None:
        for group in self.param_groups:  # TF's _finish: float32 products
            group["beta1_power"] = to_float32(group["beta1_power"] * to_float32(group["beta1"]))
            group["beta2_power"] = to_float32(group["beta2_power"] * to_float32(group["beta2"]))
