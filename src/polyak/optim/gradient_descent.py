"""``tf.compat.v1.train.GradientDescentOptimizer``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from polyak.optim._arith import Arith
from polyak.optim._base import NONNEGATIVE, Operand, Ops, Params, Rule, Tensors, TFOptimizer
from polyak.optim._sparse import as_rows, slices

__all__ = ["GradientDescentOptimizer"]


class GradientDescentOptimizer(TFOptimizer):
    """Gradient descent as TF1's ``GradientDescentOptimizer(learning_rate)``.

    Update (kernel ``ApplyGradientDescent``): ``var -= grad * lr``, the product rounded, then
    the difference. A sparse gradient is applied as TF's ``scatter_sub(var, indices,
    values * lr)``: duplicate indices are *not* summed first, each entry is subtracted in turn.

    torch's nearest, ``torch.optim.SGD(params, lr)``, computes ``var + (-lr) * grad`` as one
    fused multiply-add on the CPU's vector lanes and on CUDA (one rounding instead of two), so
    it differs from TF by an ulp here and there; this class gives TF's bits.
    """

    rules: ClassVar[dict[str, Rule]] = {"lr": NONNEGATIVE}
    one_pass = True

    def __init__(self, params: Params, learning_rate: float) -> None:
        super().__init__(params, {"lr": learning_rate})

    def _scalars(self, group: dict[str, Any], arith: Arith) -> float:
        return arith.hyper(group["lr"])

    def _update(
        self, lr: float, ops: Ops, params: Operand, grads: Operand, *slots: Operand
    ) -> None:
        ops.add_scaled_(params, grads, -lr)

    def _update_sparse(
        self, lr: float, param: torch.Tensor, grad: torch.Tensor, slots: Tensors
    ) -> None:
        rows, values = slices(grad)
        # alpha=-1 is exact: var + (-u) == var - u, one rounding per entry, in entry order.
        as_rows(param, grad.sparse_dim()).index_add_(0, rows, values * lr, alpha=-1)
