"""``tf.train.Optimizer``'s three-step API over any ``torch.optim.Optimizer``."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polyak import _torch_compat as torch_compat
from polyak.gradients._buffers import RunCache, flat_copy
from polyak.gradients.functional import as_tensor_list, gradients
from polyak.gradients.global_step import GlobalStep
from polyak.gradients.stepping import InnerStepper
from polyak.gradients.transforms import GradientStep, Transform, chain

__all__ = ["Optimizer"]

GradsAndVars = list[tuple[torch.Tensor | None, torch.Tensor]]


class Optimizer:
    """A torch optimizer driven as ``tf.train.Optimizer``, with gradient transforms.

    ``inner`` is any ``torch.optim.Optimizer`` (its param groups, hyper-parameters and LR
    schedulers, attached to ``inner`` as usual, are used unchanged). ``transforms`` run between
    the gradients and the step, in order (see :mod:`polyak.transforms`). ``names`` names the
    parameters for error messages and ``transforms.masked``: a module (its
    ``named_parameters()``) or a ``{name: param}`` mapping; by default the ``param_names`` of
    the inner optimizer's groups (``torch.optim.Adam(model.named_parameters())``), else
    ``"group<g>.<i>"``.

    - :meth:`compute_gradients` -> ``[(grad or None, param)]``, leaving ``.grad`` alone;
    - :meth:`apply_gradients` -> transforms, ``inner.step()``, ``global_step += 1``;
    - :meth:`minimize` does both, backpropagating straight into ``.grad`` (in the flat buffers
      of :func:`polyak.flatten_parameters_`, where the transforms and the optimizer step then
      run one kernel per buffer).

    No per-step host sync is added, with one documented exception: ``skip_nonfinite`` with
    optimizer state on another device than the gradients (e.g. Adam's step counter on the CPU
    when not ``capturable``/``fused``) or on a state-creating first step.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        transforms: Transform | Sequence[Transform] = (),
        *,
        names: nn.Module | Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                f"Optimizer: inner must be a torch.optim.Optimizer (e.g. torch.optim.Adam("
                f"model.parameters())), got {type(inner).__name__}"
            )
        self.inner = inner
        self.transform = transforms if isinstance(transforms, Transform) else chain(*transforms)
        self._given_names = dict(
            names.named_parameters() if isinstance(names, nn.Module) else (names or {})
        )
        self._stepper = InnerStepper(inner)
        self._names: dict[int, str] = {}
        # Per-step layouts, keyed on data pointers: .grad before the backward (what to zero
        # in place), .grad after it (the transforms' runs).
        self._clear_cache = RunCache()
        self._grad_cache = RunCache()

    # ------------------------------------------------------------------ passthrough

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"polyak.Optimizer({self.inner!r}, transforms={self.transform!r})"

    # ------------------------------------------------------------------ TF API

    def compute_gradients(
        self,
        loss: torch.Tensor,
        var_list: Iterable[torch.Tensor] | None = None,
        grad_loss: torch.Tensor | None = None,
    ) -> GradsAndVars:
        """``[(d loss / d v, v)]`` for ``v`` in ``var_list`` (default: the inner optimizer's
        trainable parameters), ``None`` for a ``v`` the loss does not depend on, as TF.

        ``grad_loss`` is the upstream gradient of ``loss`` (default ones, so ``loss`` may have
        any shape). ``.grad`` is not read or written; the autograd graph is freed.
        """
        params = self._var_list(var_list, "compute_gradients")
        grads = gradients(loss, params, grad_ys=None if grad_loss is None else [grad_loss])
        return list(zip(grads, params))

    def apply_gradients(
        self,
        grads_and_vars: Iterable[tuple[torch.Tensor | None, torch.Tensor]],
        global_step: GlobalStep | None = None,
    ) -> None:
        """Run the transforms on the given gradients, step the inner optimizer on their
        variables (other parameters do not move), then add one to ``global_step``.

        ``None`` gradients are skipped; if all are ``None`` this raises ``ValueError`` naming
        the variables, as TF. The caller's gradient tensors are not modified, and ``.grad`` is
        as before afterwards. When a transform defers the step (``accumulate``) neither the
        optimizer nor ``global_step`` moves.
        """
        pairs = self._pairs(grads_and_vars)
        params = [v for g, v in pairs if g is not None]
        grads = [g for g, _ in pairs if g is not None]
        if not params:
            raise ValueError(
                "No gradients provided for any variable: "
                f"{[self._name(v) for _, v in pairs]}. Check that the loss depends on them "
                "and that they require grad."
            )
        runs = None
        if self._has_transforms():
            grads, runs = flat_copy(grads)  # never edit the caller's tensors
        self._apply(params, grads, global_step, runs)

    def minimize(
        self,
        loss: torch.Tensor,
        global_step: GlobalStep | None = None,
        var_list: Iterable[torch.Tensor] | None = None,
        grad_loss: torch.Tensor | None = None,
    ) -> None:
        """``apply_gradients(compute_gradients(loss, var_list, grad_loss), global_step)``, on
        the fast path: ``loss.backward(inputs=var_list)`` writes the gradients into ``.grad``
        (previous ``.grad`` values of ``var_list`` are discarded first; other tensors'
        ``.grad`` are untouched) and the transforms edit them there.
        """
        params = wanted = self._var_list(var_list, "minimize")
        self._clear_grads(params)
        if grad_loss is None and loss.numel() != 1:
            grad_loss = torch.ones_like(loss)
        if loss.requires_grad:
            loss.backward(gradient=grad_loss, inputs=params)
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if not params:
            raise ValueError(
                "No gradients provided for any variable: "
                f"{[self._name(v) for v in wanted]}. Check that the loss depends on them "
                "and that they require grad."
            )
        self._apply(params, grads, global_step, self._grad_cache)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """``{"inner": inner.state_dict(), "transforms": ...}``; ``"inner"`` loads into a plain
        instance of the inner optimizer's class (0-dim state shared by the flat path is
        copied per parameter)."""
        inner = self.inner.state_dict()
        inner["state"] = {
            k: {
                name: v.clone() if isinstance(v, torch.Tensor) and v.ndim == 0 else v
                for name, v in entry.items()
            }
            for k, entry in inner["state"].items()
        }
        return {"inner": inner, "transforms": self.transform.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        missing = {"inner", "transforms"} - set(state_dict)
        if missing:
            raise ValueError(
                f"Optimizer.load_state_dict: missing keys {sorted(missing)}; expected the "
                "output of polyak.Optimizer.state_dict()"
            )
        self.inner.load_state_dict(state_dict["inner"])
        self.transform.load_state_dict(state_dict["transforms"])
        self._stepper.reset()

    # ------------------------------------------------------------------ internals

    def _apply(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        global_step: GlobalStep | None,
        runs: RunCache | list[torch.Tensor] | None = None,
    ) -> None:
        if global_step is not None and not isinstance(global_step, GlobalStep):
            raise TypeError(
                f"global_step must be a polyak.GlobalStep, got {type(global_step).__name__}"
            )
        step = GradientStep(
            params,
            grads,
            lambda: [self._name(p) for p in params],
            runs=runs if isinstance(runs, RunCache) else None,
        )
        if isinstance(runs, list):
            step.seed_runs(runs)
        self.transform(step)
        if not step.apply:
            return
        self._stepper.step(params, step.grads, step.skip)
        if global_step is not None:
            global_step.increment()

    def _has_transforms(self) -> bool:
        return not (isinstance(self.transform, chain) and not self.transform.transforms)

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.inner.param_groups for p in g["params"] if p.requires_grad]

    def _var_list(self, var_list: Iterable[torch.Tensor] | None, caller: str) -> list:
        if var_list is None:
            params = self._trainable()
        else:
            params = as_tensor_list(
                var_list if isinstance(var_list, torch.Tensor) else list(var_list),
                "var_list",
                caller,
            )
            self._check_owned(params, caller)  # the default list is owned by construction
        if not params:
            raise ValueError(f"{caller}: no variables to optimize (var_list is empty)")
        return params

    def _check_owned(self, params: Sequence[torch.Tensor], caller: str) -> None:
        groups = self.inner.param_groups
        owned = set(map(id, itertools.chain.from_iterable(g["params"] for g in groups)))
        if all(map(owned.__contains__, map(id, params))):
            return
        for p in params:
            if id(p) not in owned:
                raise ValueError(
                    f"{caller}: variable {self._name(p)} is not a parameter of the inner "
                    "optimizer; add it with inner.add_param_group({'params': [...]}) or "
                    "leave it out of var_list"
                )

    def _pairs(
        self, grads_and_vars: Iterable[tuple[torch.Tensor | None, torch.Tensor]]
    ) -> GradsAndVars:
        pairs = []
        for i, pair in enumerate(grads_and_vars):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(
                    f"apply_gradients: entry {i} must be a (gradient, variable) pair, got "
                    f"{type(pair).__name__}"
                )
            g, v = pair
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"apply_gradients: variable {i} is {type(v).__name__}")
            if g is not None and (not isinstance(g, torch.Tensor) or g.shape != v.shape):
                raise ValueError(
                    f"apply_gradients: gradient for {self._name(v)} has "
                    f"{getattr(g, 'shape', type(g).__name__)}, expected a tensor of shape "
                    f"{tuple(v.shape)}"
                )
            if g is not None and (g.dtype != v.dtype or g.device != v.device):
                raise ValueError(
                    f"apply_gradients: gradient for {self._name(v)} is {g.dtype} on {g.device}, "
                    f"but the variable is {v.dtype} on {v.device}; pass g.to(v) (as .grad "
                    "requires)"
                )
            pairs.append((g, v))
        if not pairs:
            raise ValueError("apply_gradients: grads_and_vars is empty")
        self._check_owned([v for _, v in pairs], "apply_gradients")
        return pairs

    def _name(self, param: torch.Tensor) -> str:
        name = self._names.get(id(param))
        if name is None:  # a new parameter (or first use): rebuild the table
            self._names = {id(p): n for n, p in self._given_names.items()}
            for gi, group in enumerate(self.inner.param_groups):
                names = group.get("param_names")
                for i, p in enumerate(group["params"]):
                    self._names.setdefault(id(p), names[i] if names else f"group{gi}.{i}")
            name = self._names.get(id(param), f"<tensor of shape {tuple(param.shape)}>")
        return name

    def _clear_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Discard ``.grad``: zero it in place where it lies in a flat buffer (the next
        backward accumulates there), drop it elsewhere (the next backward allocates, as
        zero_grad())."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        grads = [p.grad for p in with_grad]
        if any(g.is_sparse for g in grads):  # type: ignore[union-attr]
            for p in with_grad:
                if p.grad.is_sparse:  # type: ignore[union-attr]
                    p.grad = None
            with_grad = [p for p in with_grad if p.grad is not None]
            grads = [p.grad for p in with_grad]
        _, lone, merged = self._clear_cache.layout(grads)  # type: ignore[arg-type]
        if merged:
            torch_compat.foreach_zero_(merged)
        for i in lone:
            with_grad[i].grad = None
