"""A torch optimizer's update without ``Optimizer.step``: the functional form that step calls.

``Optimizer.step`` wraps the update in a profiler range, step hooks, a grad-mode switch and a
lazy state check. On a CPU that costs about 45 us per call, as much as the fused Adam kernel
itself for a 67k-parameter network (the DQN's), so for small networks it is a visible share of
a gradient step. Once a param group's state exists, :func:`functional_update` calls the same
public functional update (``torch.optim.adam.adam``, ``torch.optim.adamw.adamw``,
``torch.optim.sgd.sgd``) with the arguments ``step`` would pass, so the result is the same bits.

Where ``step`` would do anything more, the caller uses ``step``:

- step hooks registered (on the optimizer or globally);
- ``step`` replaced on the instance (LR schedulers wrap it to see that it was called);
- the autograd profiler running (its trace shows ``Optimizer.step#Adam.step`` as usual), or
  ``torch.compile`` tracing;
- ``differentiable`` groups;
- sparse gradients;
- a parameter without state yet (``step`` creates it and runs its checks), and fused SGD
  before its first step (``step`` checks the devices and dtypes once).

Adam and AdamW run the optimizer's own graph-capture check first, as their ``step`` does
(``capturable=False`` under CUDA graph capture raises the same error). Not seen by the direct
path: a wrapper put on the class's ``step`` (``torch.optim.Adam.step = ...``) rather than on
the instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.adam import adam
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from polyak import _torch_compat as torch_compat

__all__ = ["functional_update"]

Update = Callable[[dict[str, Any], Sequence[torch.Tensor], Sequence[torch.Tensor]], bool]


def functional_update(opt: torch.optim.Optimizer) -> Update | None:
    """``update(group, params, grads) -> bool`` stepping ``params`` (members of ``group`` of
    ``opt``) with ``grads`` as ``opt.step()`` would; it returns False and changes nothing when
    that group must go through ``step``. ``None`` when every call must (see the module
    docstring)."""
    kind = type(opt)
    if kind not in _UPDATES:
        return None
    if "step" in vars(opt) or torch_compat.step_hooks_registered(opt):
        return None
    if torch_compat.profiler_enabled() or torch.compiler.is_compiling():
        return None
    update = _UPDATES[kind]

    def step(
        group: dict[str, Any], params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
    ) -> bool:
        if group["differentiable"] or any(g.is_sparse for g in grads):
            return False
        with torch.no_grad():
            return update(opt, group, params, grads)

    return step


def _adam(
    opt: torch.optim.Optimizer,
    group: dict[str, Any],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
) -> bool:
    state = opt.state
    entries = [state.get(p) for p in params]
    if not all(entries):
        return False
    check = torch_compat.graph_capture_check(opt)
    if check is None:
        return False
    check()  # as step(): raises under graph capture unless capturable
    amsgrad = group["amsgrad"]
    beta1, beta2 = group["betas"]
    is_adamw = type(opt) is torch.optim.AdamW
    kwargs: dict[str, Any] = {}
    # torch >= 2.7 folds AdamW into Adam: adam() takes the flag, and both classes' groups
    # carry it. Decided from the function, not the group: a group loaded from a newer torch's
    # state dict carries the key on an older torch too.
    if torch_compat.adam_decouples_weight_decay():
        kwargs["decoupled_weight_decay"] = group.get("decoupled_weight_decay", is_adamw)
        update = adam
    else:
        update = adamw if is_adamw else adam
    update(
        list(params),
        list(grads),
        [e["exp_avg"] for e in entries],  # type: ignore[index]
        [e["exp_avg_sq"] for e in entries],  # type: ignore[index]
        [e["max_exp_avg_sq"] for e in entries] if amsgrad else [],  # type: ignore[index]
        [e["step"] for e in entries],  # type: ignore[index]
        foreach=group["foreach"],
        capturable=group["capturable"],
        differentiable=False,
        fused=group["fused"],
        grad_scale=getattr(opt, "grad_scale", None),
        found_inf=getattr(opt, "found_inf", None),
        has_complex=any(map(torch.is_complex, params)),
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
        **kwargs,
    )
    return True


def _sgd(
    opt: torch.optim.Optimizer,
    group: dict[str, Any],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
) -> bool:
    if group["fused"] and torch_compat.fused_check_pending(opt):
        return False  # step() checks devices and dtypes once, on the first fused step
    buffers: list[torch.Tensor | None] = []
    if group["momentum"] != 0:
        state = opt.state
        buffers = [state.get(p, {}).get("momentum_buffer") for p in params]
        if any(b is None for b in buffers):
            return False  # step() creates the buffers and stores them in the state
    sgd(
        list(params),
        list(grads),
        buffers,
        has_sparse_grad=False,
        foreach=group["foreach"],
        fused=group["fused"],
        grad_scale=getattr(opt, "grad_scale", None),
        found_inf=getattr(opt, "found_inf", None),
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        lr=group["lr"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
    )
    return True


_UPDATES = {torch.optim.Adam: _adam, torch.optim.AdamW: _adam, torch.optim.SGD: _sgd}
