"""``tf.train.Optimizer``'s three-step API over any ``torch.optim.Optimizer``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polyak import _torch_compat as torch_compat
from polyak._checks import check_mapping
from polyak.flat import has_grad_slot, landed_gradients
from polyak.grad._buffers import RunCache, flat_copy
from polyak.grad.functional import as_tensor_list, gradients
from polyak.grad.stepping import InnerStepper
from polyak.grad.transforms import (
    GradientStep,
    Transform,
    chain,
    checked_state,
    set_states,
)
from polyak.step import GlobalStep

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
        if not isinstance(transforms, (Transform, Iterable)) or isinstance(transforms, str):
            raise TypeError(
                "Optimizer: transforms must be a polyak transform or a list of them (e.g. "
                f"[polyak.transforms.clip_by_global_norm(1.0)]), got {type(transforms).__name__}"
            )
        self.inner = inner
        self.transform = transforms if isinstance(transforms, Transform) else chain(*transforms)
        self._given_names = _check_names(names)
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
        _check_loss(loss, grad_loss, "compute_gradients")
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
        _check_global_step(global_step)
        pairs = self._pairs(grads_and_vars)
        params = [v for g, v in pairs if g is not None]
        grads = [g for g, _ in pairs if g is not None]
        if not params:
            self._no_gradients([v for _, v in pairs])
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
        ``.grad`` are untouched) and the transforms edit them there. A variable the loss does
        not reach is skipped, as in ``apply_gradients``, also when its gradient lives in a
        flat slot (:func:`polyak.flatten_parameters_`; its ``.grad`` is then ``None``).

        Arguments are checked before any ``.grad`` is touched. If the backward pass itself
        fails (a freed graph), ``.grad`` tensors that were dropped are put back; flat slots,
        zeroed in place, stay zero.
        """
        params = wanted = self._var_list(var_list, "minimize")
        _check_global_step(global_step)
        _check_loss(loss, grad_loss, "minimize")
        if not loss.requires_grad:
            self._no_gradients(wanted)
        if grad_loss is None and loss.numel() != 1:
            grad_loss = torch.ones_like(loss)
        dropped, zeroed = self._clear_grads(params)
        landed = landed_gradients()
        if zeroed:
            landed.clear()
        try:
            loss.backward(gradient=grad_loss, inputs=params)
        except BaseException:
            for p, g in dropped:
                p.grad = g
            if zeroed:
                torch_compat.foreach_zero_([p.grad for p in zeroed])  # partial sums: zero again
            raise
        if zeroed and not all(map(landed.__contains__, map(id, zeroed))):
            for p in zeroed:
                if id(p) not in landed and has_grad_slot(p):
                    p.grad = None  # the loss did not reach it: its slot holds the zeros
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if not params:
            for p, g in dropped:
                p.grad = g
            self._no_gradients(wanted)
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
        """Load what :meth:`state_dict` returned. Everything is checked first (the transforms'
        state, and that the inner state belongs to these parameters: same groups, same
        number of parameters, per-parameter state of each parameter's shape for torch's
        optimizers), so a state dict that does not fit raises ``ValueError``/``TypeError``
        naming the culprit and changes nothing."""
        who = "Optimizer.load_state_dict"
        check_mapping(state_dict, "state_dict", who)
        if set(state_dict) != {"inner", "transforms"}:
            missing = sorted({"inner", "transforms"} - set(state_dict))
            extra = sorted(map(str, set(state_dict) - {"inner", "transforms"}))
            raise ValueError(
                f"{who}: missing keys {missing}, unexpected keys {extra}; expected the output "
                "of polyak.Optimizer.state_dict(): {'inner', 'transforms'}"
            )
        checked = checked_state(self.transform, state_dict["transforms"])
        self._check_inner_state(state_dict["inner"])
        before = self.inner.state_dict()
        self.inner.load_state_dict(state_dict["inner"])
        try:
            set_states([(self.transform, checked)])
        except BaseException:
            self.inner.load_state_dict(before)
            raise
        finally:
            self._stepper.reset()

    def _check_inner_state(self, inner: Any) -> None:
        """Raise unless ``inner`` is a state dict of this inner optimizer's parameters."""
        who = "Optimizer.load_state_dict"
        check_mapping(inner, "'inner'", who)
        if not {"state", "param_groups"} <= set(inner):
            raise ValueError(
                f"{who}: 'inner' must be a torch optimizer state dict ({{'state', "
                f"'param_groups'}}), got keys {sorted(map(str, inner))}"
            )
        check_mapping(inner["state"], "'inner'['state']", who)
        saved_groups = inner["param_groups"]
        groups = self.inner.param_groups
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError(
                f"{who}: 'inner'['param_groups'] must be a list, got {type(saved_groups).__name__}"
            )
        if len(saved_groups) != len(groups):
            got = len(saved_groups)
            raise ValueError(
                f"{who}: the state has {got} param groups, this optimizer {len(groups)}; it "
                "was saved from another optimizer"
            )
        by_id: dict[Any, torch.Tensor] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, groups)):
            ids = saved.get("params") if isinstance(saved, Mapping) else None
            if not isinstance(ids, (list, tuple)) or len(ids) != len(group["params"]):
                got = len(ids) if isinstance(ids, (list, tuple)) else ids
                raise ValueError(
                    f"{who}: param group {gi} has {got} parameters in the state, "
                    f"{len(group['params'])} here; it was saved from another model"
                )
            by_id.update(zip(ids, group["params"]))
            for key, value in saved.items():
                if key != "params" and not _finite_hyper(value):
                    raise ValueError(
                        f"{who}: param group {gi} has {key}={value} in the state; a "
                        "hyper-parameter must be finite"
                    )
        shaped = _per_parameter_state(self.inner)
        for key, entry in inner["state"].items():
            param = by_id.get(key)
            if param is None:
                raise ValueError(
                    f"{who}: the state has an entry for parameter id {key!r}, which no param "
                    "group lists"
                )
            check_mapping(entry, f"the state of {self._name(param)}", who)
            for name, value in entry.items():
                if not isinstance(value, torch.Tensor) or value.ndim == 0 or not shaped:
                    continue
                fits = value.ndim == param.ndim and all(
                    v in (1, p) for v, p in zip(value.shape, param.shape)
                )
                if not fits:
                    raise ValueError(
                        f"{who}: state '{name}' of parameter {self._name(param)} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(param.shape)}; the state "
                        "was saved from another model"
                    )

    # ------------------------------------------------------------------ internals

    def _apply(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        global_step: GlobalStep | None,
        runs: RunCache | list[torch.Tensor] | None = None,
    ) -> None:
        step = GradientStep(
            params,
            grads,
            lambda: [self._name(p) for p in params],
            runs=runs if isinstance(runs, RunCache) else None,
            known_names=self._known_names,
        )
        if isinstance(runs, list):
            step.seed_runs(runs)
        self.transform(step)
        if not step.apply:
            return
        self._stepper.step(params, step.grads, step.skip)
        if global_step is not None:
            global_step.increment()

    def _no_gradients(self, variables: Sequence[torch.Tensor]) -> None:
        raise ValueError(
            "No gradients provided for any variable: "
            f"{[self._name(v) for v in variables]}. Check that the loss depends on them "
            "and that they require grad."
        )

    def _known_names(self) -> set[str]:
        return {self._name(p) for g in self.inner.param_groups for p in g["params"]}

    def _has_transforms(self) -> bool:
        return not (isinstance(self.transform, chain) and not self.transform.transforms)

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.inner.param_groups for p in g["params"] if p.requires_grad]

    def _var_list(self, var_list: Iterable[torch.Tensor] | None, caller: str) -> list:
        if var_list is None:
            params = self._trainable()
        else:
            params = as_tensor_list(var_list, "var_list", caller)
            twice = self._repeated(params)
            if twice:
                raise ValueError(
                    f"{caller}: var_list lists {twice} more than once; list each variable once"
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
        if not isinstance(grads_and_vars, Iterable):
            raise TypeError(
                "apply_gradients: grads_and_vars must be a list of (gradient, variable) pairs, "
                f"got {type(grads_and_vars).__name__}"
            )
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
        variables = [v for _, v in pairs]
        twice = self._repeated(variables)
        if twice:
            raise ValueError(
                f"apply_gradients: {twice} listed more than once; each variable "
                "takes one optimizer step (TF would apply the pairs one after the other): "
                "sum its gradients into one pair"
            )
        self._check_owned(variables, "apply_gradients")
        return pairs

    def _repeated(self, tensors: Sequence[torch.Tensor]) -> list[str]:
        """Names of the tensors listed more than once (none: one set of ids, no names)."""
        if len(set(map(id, tensors))) == len(tensors):
            return []
        seen: set[int] = set()
        twice = {self._name(t) for t in tensors if id(t) in seen or seen.add(id(t))}
        return sorted(twice)

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

    def _clear_grads(
        self, params: Sequence[torch.Tensor]
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """Discard ``.grad``: zero it in place where it lies in a flat buffer (the next
        backward accumulates there), drop it elsewhere (the next backward allocates, as
        zero_grad()). Returns the dropped ``(param, grad)`` pairs and the zeroed params."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return [], []
        grads = [p.grad for p in with_grad]
        dropped: list[tuple[torch.Tensor, torch.Tensor]] = []
        if any(g.is_sparse for g in grads):  # type: ignore[union-attr]
            for p in with_grad:
                if p.grad.is_sparse:  # type: ignore[union-attr]
                    dropped.append((p, p.grad))  # type: ignore[arg-type]
                    p.grad = None
            with_grad = [p for p in with_grad if p.grad is not None]
            grads = [p.grad for p in with_grad]
        _, lone, merged = self._clear_cache.layout(grads)  # type: ignore[arg-type]
        if merged:
            torch_compat.foreach_zero_(merged)
        for i in lone:
            p = with_grad[i]
            dropped.append((p, p.grad))  # type: ignore[arg-type]
            p.grad = None
        if not merged:
            return dropped, []
        if not lone:
            return dropped, with_grad
        alone = set(lone)
        return dropped, [p for i, p in enumerate(with_grad) if i not in alone]


def _check_global_step(global_step: Any) -> None:
    if global_step is not None and not isinstance(global_step, GlobalStep):
        raise TypeError(
            f"global_step must be a polyak.GlobalStep (or None), got {type(global_step).__name__}"
        )


def _check_loss(loss: Any, grad_loss: Any, caller: str) -> None:
    """``loss`` a tensor; ``grad_loss`` None or a tensor of its shape, dtype and device."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{caller}: loss must be a torch.Tensor, got {type(loss).__name__}")
    if grad_loss is None:
        return
    if not isinstance(grad_loss, torch.Tensor):
        raise TypeError(
            f"{caller}: grad_loss must be a torch.Tensor or None, got {type(grad_loss).__name__}"
        )
    given = (grad_loss.shape, grad_loss.dtype, grad_loss.device)
    if given != (loss.shape, loss.dtype, loss.device):
        raise ValueError(
            f"{caller}: grad_loss is {tuple(grad_loss.shape)} {grad_loss.dtype} on "
            f"{grad_loss.device}, the loss {tuple(loss.shape)} {loss.dtype} on {loss.device}; "
            "grad_loss is the loss's upstream gradient and must match it"
        )


def _check_names(names: Any) -> dict[str, torch.Tensor]:
    if names is None:
        return {}
    if isinstance(names, nn.Module):
        return dict(names.named_parameters())
    if isinstance(names, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in names.items()
    ):
        return dict(names)
    raise TypeError(
        "Optimizer: names must be a module or a {name: parameter} mapping, got "
        f"{type(names).__name__}"
    )


def _per_parameter_state(inner: torch.optim.Optimizer) -> bool:
    """Whether every non-scalar state tensor of ``inner`` is shaped like its parameter (or
    broadcasts to it, as Adafactor's factored moments): torch's optimizers but L-BFGS, whose
    state is one flat history. Other optimizers' state is not checked."""
    kind = type(inner)
    return kind.__module__.startswith("torch.optim") and not issubclass(kind, torch.optim.LBFGS)


def _finite_hyper(value: Any) -> bool:
    """False for a NaN or infinite float hyper-parameter (also inside a tuple such as Adam's
    betas, or a one-element tensor: read once, at load time)."""
    if isinstance(value, (tuple, list)):
        return all(map(_finite_hyper, value))
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    return not isinstance(value, float) or math.isfinite(value)
