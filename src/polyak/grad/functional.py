"""Symbolic-style gradients in eager PyTorch: ``tf.gradients`` and ``tf.stop_gradient``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch.autograd.graph import Node

__all__ = ["as_tensor_list", "gradients", "stop_gradient"]

TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def stop_gradient(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a constant for autograd: ``tf.stop_gradient(t)``, i.e. ``t.detach()``.

    The result shares memory with ``t``; no gradient flows back through it. DQN's target is
    the classic use: ``y = stop_gradient(r + gamma * q_target.max(-1).values)``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"stop_gradient: t must be a torch.Tensor, got {type(t).__name__}")
    return t.detach()


def as_tensor_list(value: TensorOrList | None, what: str, caller: str) -> list[torch.Tensor]:
    """``value`` as a list of tensors (a single tensor becomes a one-entry list)."""
    if value is None:
        return []
    if not isinstance(value, (torch.Tensor, Iterable)) or isinstance(value, (str, bytes)):
        raise TypeError(
            f"{caller}: {what} must be a tensor or a list of tensors, got {type(value).__name__}"
        )
    items = [value] if isinstance(value, torch.Tensor) else list(value)
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{caller}: {what}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return items


def gradients(
    ys: TensorOrList,
    xs: TensorOrList,
    grad_ys: TensorOrList | Sequence[torch.Tensor | None] | None = None,
    stop_gradients: TensorOrList | None = None,
    unconnected_gradients: Literal["none", "zero"] = "none",
    *,
    retain_graph: bool = False,
    create_graph: bool = False,
) -> list[torch.Tensor | None]:
    """The gradients of ``sum(ys)`` with respect to each of ``xs``, as ``tf.gradients``.

    Result ``i`` is ``sum_j VJP(ys[j], xs[i], grad_ys[j])``: the gradient of
    ``sum_j <grad_ys[j], ys[j]>`` with respect to ``xs[i]``. ``grad_ys[j]`` is the upstream
    gradient of ``ys[j]`` (the chain rule's outer factor) and defaults to ones of ``ys[j]``'s
    shape, whatever that shape is; an entry may be ``None`` for ones. DDPG's actor update is
    ``gradients(actions, actor_params, grad_ys=-dq_da / batch_size)``.

    ``stop_gradients`` are treated as constants: no gradient flows back through them (they
    may still be in ``xs``, whose gradient is then the one arriving at them), as
    ``tf.gradients(..., stop_gradients=...)``.

    An ``x`` that no ``y`` depends on (once ``stop_gradients`` are cut), or that does not
    require grad, gets ``None``, or zeros of its shape with ``unconnected_gradients="zero"``.

    ``retain_graph`` keeps the autograd graph for another call (TF graphs are reusable; eager
    graphs are freed by default); ``create_graph`` builds a graph of the result for
    higher-order derivatives.
    """
    if unconnected_gradients not in ("none", "zero"):
        raise ValueError(
            f"gradients: unconnected_gradients must be 'none' or 'zero', "
            f"got {unconnected_gradients!r}"
        )
    for flag, value in (("retain_graph", retain_graph), ("create_graph", create_graph)):
        if not isinstance(value, bool):
            raise TypeError(f"gradients: {flag} must be True or False, got {value!r}")
    y_list = as_tensor_list(ys, "ys", "gradients")
    x_list = as_tensor_list(xs, "xs", "gradients")
    seeds = _seeds(y_list, grad_ys)
    stops = as_tensor_list(stop_gradients, "stop_gradients", "gradients")

    live = [i for i, y in enumerate(y_list) if y.requires_grad]
    wanted = [i for i, x in enumerate(x_list) if x.requires_grad]
    result: list[torch.Tensor | None] = [None] * len(x_list)
    if live and wanted:
        hooks = [_cut(s) for s in stops if s.grad_fn is not None]
        try:
            grads = torch.autograd.grad(
                [y_list[j] for j in live],
                [x_list[i] for i in wanted],
                grad_outputs=[seeds[j] for j in live],
                retain_graph=retain_graph,
                create_graph=create_graph,
                allow_unused=True,
            )
        finally:
            for h in hooks:
                h.remove()
        if stops:
            # Cutting leaves zeros where TF finds no path: find which xs are still reachable.
            reach = _reachable([y_list[j] for j in live], stops)
            grads = tuple(g if _edge(x_list[i]) in reach else None for i, g in zip(wanted, grads))
        for i, g in zip(wanted, grads):
            result[i] = g
    if unconnected_gradients == "zero":
        result = [torch.zeros_like(x) if g is None else g for x, g in zip(x_list, result)]
    return result


def _seeds(
    ys: list[torch.Tensor], grad_ys: TensorOrList | Sequence[torch.Tensor | None] | None
) -> list[torch.Tensor]:
    """One upstream gradient per y: the given one (checked) or ones of y's shape."""
    if grad_ys is None:
        given: list[torch.Tensor | None] = [None] * len(ys)
    elif isinstance(grad_ys, torch.Tensor):
        given = [grad_ys]
    elif isinstance(grad_ys, Iterable) and not isinstance(grad_ys, (str, bytes)):
        given = list(grad_ys)
    else:
        raise TypeError(
            "gradients: grad_ys must be None, a tensor or a list of tensors (or None), got "
            f"{type(grad_ys).__name__}"
        )
    if len(given) != len(ys):
        raise ValueError(
            f"gradients: grad_ys has {len(given)} entries but ys has {len(ys)}; pass one per y"
        )
    seeds = []
    for j, (y, g) in enumerate(zip(ys, given)):
        if g is None:
            seeds.append(torch.ones_like(y))
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"gradients: grad_ys[{j}] must be a tensor or None, got {type(g)}")
        if g.shape != y.shape:
            raise ValueError(
                f"gradients: grad_ys[{j}] has shape {tuple(g.shape)} but ys[{j}] has shape "
                f"{tuple(y.shape)}; they must match"
            )
        if g.dtype != y.dtype or g.device != y.device:
            raise ValueError(
                f"gradients: grad_ys[{j}] is {g.dtype} on {g.device} but ys[{j}] is {y.dtype} "
                f"on {y.device}; pass grad_ys[{j}].to(ys[{j}])"
            )
        seeds.append(g)
    return seeds


def _edge(t: torch.Tensor) -> tuple[Node | None, int]:
    """The autograd edge a gradient for ``t`` arrives on: (node, output index)."""
    if t.grad_fn is not None:
        return t.grad_fn, t.output_nr
    # A leaf's accumulator node is cached while the tensor lives; a view reaches it.
    return t.view_as(t).grad_fn.next_functions[0][0], 0


def _cut(t: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Zero the gradient entering ``t``'s node for ``t``'s output only (siblings keep theirs).

    A node pre-hook runs after ``autograd.grad`` captured the gradient of ``t`` itself, so a
    stopped tensor can still be one of the ``xs``.
    """
    node, nr = t.grad_fn, t.output_nr

    def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
        out = list(grad_outputs)
        if out[nr] is not None:
            out[nr] = torch.zeros_like(out[nr])
        return tuple(out)

    return node.register_prehook(hook)


def _reachable(ys: list[torch.Tensor], stops: list[torch.Tensor]) -> set[tuple[Node, int]]:
    """Edges reachable backwards from ``ys`` without crossing a stopped tensor."""
    blocked = {_edge(s) for s in stops if s.requires_grad}
    todo = [_edge(y) for y in ys]
    seen: set[tuple[Node, int]] = set()
    visited: set[Node] = set()
    while todo:
        edge = todo.pop()
        if edge[0] is None or edge in seen:
            continue
        seen.add(edge)
        if edge in blocked or edge[0] in visited:
            continue
        visited.add(edge[0])
        todo.extend(e for e in edge[0].next_functions if e[0] is not None)
    return seen
