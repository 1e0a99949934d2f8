"""What TF1's optimizers share here: argument checks, slots, the foreach step per (device,
dtype), sparse gradients and state-dict checks. Each optimizer adds its hyper-parameters, its
slots and its update rule (:meth:`TFOptimizer._update`)."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import torch

from polyak.flat import pack
from polyak.optim._arith import Arith
from polyak.optim._batches import Layout, by_device_dtype, pieces
from polyak.optim._exact import FRESH, ForeachOps, Reused
from polyak.optim._sparse import as_rows, slices, sum_duplicates

try:
    from polyak.optim._arrays import ArrayOps, ArrayPlan, writable
except ImportError:  # pragma: no cover - numpy comes with the test and RL extras
    ArrayOps = ArrayPlan = writable = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Flag", "Operand", "Ops", "Real", "TFOptimizer"]

Tensors = list[torch.Tensor]
_data_ptr = torch.Tensor.data_ptr
Ops: TypeAlias = "ForeachOps | ArrayOps"
Operand: TypeAlias = "Tensors | np.ndarray"
"""What an update rule computes on: parallel lists of tensors (:class:`ForeachOps`) or one
array each (:class:`~polyak.optim._arrays.ArrayOps`)."""

# CPU dtypes updated through NumPy (polyak.optim._arrays) when torch runs on one thread; the
# others, and all with more threads (torch spreads a large tensor's operations over them, NumPy
# does not), through torch's foreach.
ARRAY_DTYPES = frozenset({torch.float32, torch.float64} if ArrayPlan is not None else ())


def _one_thread() -> bool:
    return torch.get_num_threads() == 1


Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]

# Constructor argument names of the group keys that differ from them.
_ARGUMENT = {"lr": "learning_rate"}


@dataclass(frozen=True)
class Real:
    """A real-valued hyper-parameter, finite, within optional bounds."""

    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False

    def problem(self, value: Any) -> tuple[type[Exception], str] | None:
        """``(error class, the requirement value misses)``, or None if ``value`` is valid."""
        if isinstance(value, torch.Tensor):
            return TypeError, "a Python number (a tensor would need a host sync every step)"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return TypeError, "a real number"
        v = float(value)
        if not math.isfinite(v):
            return ValueError, f"finite{self._bounds()}"
        low_ok = self.low is None or (v > self.low if self.low_open else v >= self.low)
        high_ok = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return None if low_ok and high_ok else (ValueError, self._bounds().strip())

    def _bounds(self) -> str:
        if self.low is not None and self.high is not None:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            return f" in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return ""


@dataclass(frozen=True)
class Flag:
    """A boolean hyper-parameter."""

    def problem(self, value: Any) -> tuple[type[Exception], str] | None:
        return None if isinstance(value, bool) else (TypeError, "True or False")


Rule = Real | Flag

NONNEGATIVE = Real(0.0)
POSITIVE = Real(0.0, low_open=True)
FRACTION = Real(0.0, high=1.0)  # [0, 1]
FRACTION_BELOW_ONE = Real(0.0, high=1.0, high_open=True)  # [0, 1)


class TFOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that updates as a TensorFlow 1.x optimizer.

    Subclasses name their hyper-parameters and rules (:attr:`rules`; ``"lr"`` is TF's
    ``learning_rate``, so LR schedulers find it), their slots (:meth:`_slot_fills`: TF's slot
    names and initial values) and their update (:meth:`_update`, written once with an operation
    set: :class:`~polyak.optim._exact.ForeachOps` on lists of tensors of one device and dtype,
    or :class:`~polyak.optim._arrays.ArrayOps` on NumPy arrays; TF's op order, each op one
    rounding). This base:

    - checks every hyper-parameter at construction, in :meth:`add_param_group`, and before each
      step (a scheduler may have set it), raising ``ValueError``/``TypeError`` that names it,
      before anything changes; parameters must be real floating-point tensors;
    - creates slots when a parameter first has a gradient, packed in parameter order into one
      buffer per (device, dtype), so parameters flattened by :func:`polyak.flatten_parameters_`
      get flat slots and each update runs one kernel per buffer;
    - steps each param group per (device, dtype) with scalars rounded as TF's kernels round them
      (:class:`~polyak.optim._arith.Arith`), computed on the host: no per-step host sync;
      float32 and float64 tensors on the CPU through NumPy, chunk by chunk
      (:mod:`polyak.optim._arrays`) when torch runs on one thread, the others with torch's
      foreach operations; what does not change from step to step (groupings, chunks, scalars)
      is kept;
    - hands sparse COO gradients to :meth:`_update_sparse` (TF's ``_apply_sparse``);
    - refuses a state dict that is not of its own kind, naming what differs.
    """

    rules: ClassVar[dict[str, Rule]]
    one_pass: ClassVar[bool] = False
    """Whether :meth:`_update` is one exact fused operation (gradient descent): then nothing is
    gained by keeping pieces of the tensors in cache through several passes, and one torch
    foreach call over all of them is the cheapest on the CPU too."""

    def __init__(self, params: Params, defaults: dict[str, Any]) -> None:
        if isinstance(params, (torch.Tensor, str, bytes, Mapping)) or not isinstance(
            params, Iterable
        ):
            raise TypeError(
                f"{type(self).__name__}: params must be an iterable of parameters, of (name, "
                "parameter) pairs or of param group dicts (model.parameters(), "
                f"model.named_parameters()), got {type(params).__name__}"
            )
        self._check_hyper(defaults, None, defaults)
        self._init_caches()
        self._checked: dict[int, list[Any]] = {}  # group -> the values last checked (identity)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ hooks

    def _slot_fills(self, group: Mapping[str, Any]) -> dict[str, float]:
        """TF's slots of a variable in ``group``: name -> initial value, in creation order."""
        return {}

    def _derived(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """Group entries derived from the hyper-parameters when absent (Adam's powers)."""
        return {}

    def _scalars(self, group: Mapping[str, Any], arith: Arith) -> Any:
        """The scalars of one step of ``group`` in ``arith``'s dtype, for :meth:`_update`."""
        raise NotImplementedError

    def _update(self, s: Any, ops: Ops, params: Operand, grads: Operand, *slots: Operand) -> None:
        """One dense step of ``params`` (all of one device and dtype) with ``grads``; ``slots``
        as :meth:`_slot_fills` names them; written with ``ops`` (intermediate results in its
        temporaries). Must not modify ``grads``."""
        raise NotImplementedError

    def _update_sparse(
        self, s: Any, param: torch.Tensor, grad: torch.Tensor, slots: Tensors
    ) -> None:
        """TF1's ``_apply_sparse`` (the default: duplicates summed, then
        :meth:`_update_rows` on the touched rows)."""
        k = grad.sparse_dim()
        rows, values = sum_duplicates(*slices(grad))
        self._update_rows(s, as_rows(param, k), rows, values, [as_rows(t, k) for t in slots])

    def _update_rows(
        self,
        s: Any,
        var: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        slots: Tensors,
    ) -> None:
        """TF's ``SparseApply*`` kernel on distinct ``rows`` of ``var`` (and of its slots):
        by default the dense rule, applied to those rows only."""
        v = var.index_select(0, rows)
        picked = [t.index_select(0, rows) for t in slots]
        self._update(s, FRESH, [v], [values], *([t] for t in picked))
        var.index_copy_(0, rows, v)
        for t, r in zip(slots, picked):
            t.index_copy_(0, rows, r)

    def _after_step(self) -> None:
        """Once per step that updated anything, after the updates (TF's ``_finish``)."""

    # ------------------------------------------------------------------ torch API

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, Mapping):
            raise TypeError(
                f"{type(self).__name__}: a param group must be a dict, got "
                f"{type(param_group).__name__}"
            )
        if "learning_rate" in param_group:
            raise ValueError(
                f"{type(self).__name__}: param groups name the learning rate 'lr' (as torch's "
                "LR schedulers read it); rename the 'learning_rate' key"
            )
        index = len(self.param_groups)
        group = dict(param_group)
        if "params" not in group:
            raise ValueError(
                f"{type(self).__name__}: param group {index} has no 'params' (a dict such as "
                "{'params': model.fc.parameters(), 'lr': 0.01})"
            )
        raw = group["params"]
        if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, (torch.Tensor, Iterable)):
            raise TypeError(
                f"{type(self).__name__}: 'params' of param group {index} must be a tensor or an "
                f"iterable of them, got {type(raw).__name__}"
            )
        if not isinstance(raw, (torch.Tensor, list, tuple, set)):
            group["params"] = raw = list(raw)  # a generator: read it once
        filled = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        self._check_hyper(filled, index, self.defaults)
        for key, value in self._derived(filled).items():
            group.setdefault(key, value)
            filled.setdefault(key, value)
        self._check_hyper(filled, index)
        items = [raw] if isinstance(raw, torch.Tensor) else raw
        self._check_params(
            [x[1] if isinstance(x, tuple) and len(x) == 2 else x for x in items], index
        )
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient (``.grad``, dense or sparse COO);
        the others and their slots keep their values. Returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        checked = self._checked
        for gi, group in enumerate(self.param_groups):
            values = [group.get(key) for key in self.rules]
            seen = checked.get(gi)
            if seen is None or any(map(operator.is_not, values, seen)):
                self._check_hyper(group, gi)  # a scheduler or the user may have set it
                checked[gi] = values
            dense: Tensors = []
            sparse: Tensors = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.layout is torch.strided:
                    dense.append(p)
                else:
                    self._check_sparse(p, gi)  # .grad accepts sparse COO only
                    sparse.append(p)
            batches = self._batches(gi, dense) if dense else []
            # A parameter whose data became complex after it was added (p.data = ...).
            for _, dtype, _ in batches:
                self._check_dtype(dtype, f"a parameter of param group {gi}")
            if dense or sparse:
                work.append((gi, group, dense, batches, sparse))
        if not work:
            return loss
        for gi, group, dense, batches, sparse in work:
            self._step_group(gi, group, dense, batches, sparse)
        self._after_step()
        return loss

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """torch's ``load_state_dict``, after checking that ``state_dict`` is one of this
        optimizer's kind for these parameters (else ``ValueError``, nothing loaded)."""
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)  # type: ignore[arg-type]
        self._init_caches()
        self._repack_slots()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_caches()
        self._checked = {}

    # ------------------------------------------------------------------ internals

    def _init_caches(self) -> None:
        """What :meth:`step` keeps from step to step, rebuilt when what it describes changes."""
        # (group, device, dtype) -> the foreach layout or the NumPy chunks of its tensors
        self._plans: dict[tuple[int, torch.device, torch.dtype], Any] = {}
        # group -> (data pointers of its dense parameters, their (device, dtype, indices))
        self._groups: dict[int, tuple[list[int], list[tuple[Any, Any, list[int]]]]] = {}
        self._reused = Reused()  # temporaries of CPU foreach pieces
        # group -> (its values, dtype -> the scalars of a step computed from them)
        self._scalar_cache: dict[int, tuple[list[Any], dict[torch.dtype, Any]]] = {}
        self._array_ops: dict[torch.dtype, Any] = {}

    def _batches(self, gi: int, dense: Tensors) -> list[tuple[Any, Any, list[int]]]:
        """``dense``'s indices per (device, dtype), kept while the same memory is stepped (a
        parameter given new memory drops the group's plans, whose views describe the old)."""
        ptrs = list(map(_data_ptr, dense))
        cached = self._groups.get(gi)
        if cached is None or cached[0] != ptrs:
            for key in [k for k in self._plans if k[0] == gi]:  # views of the old memory
                del self._plans[key]
            batches = [(d, t, idx) for (d, t), idx in by_device_dtype(dense).items()]
            cached = self._groups[gi] = (ptrs, batches)
        return cached[1]

    def _step_group(
        self,
        gi: int,
        group: dict[str, Any],
        dense: Tensors,
        batches: list[tuple[Any, Any, list[int]]],
        sparse: Tensors,
    ) -> None:
        fills = self._slot_fills(group)
        slots = self._slots(dense + sparse, fills) if fills else []
        values = list(group.values())
        cached = self._scalar_cache.get(gi)
        if (
            cached is None
            or len(cached[0]) != len(values)
            or any(map(operator.is_not, values, cached[0]))
        ):
            # the same values (floats and bools, immutable): the same scalars
            cached = self._scalar_cache[gi] = (values, {})
        scalars: dict[torch.dtype, Any] = cached[1]

        def scalars_for(dtype: torch.dtype, arrays: bool = False) -> Any:
            """The step's scalars in ``dtype``: floats, or :class:`ArrayOps` scalars."""
            s = scalars.get((dtype, arrays))
            if s is None:
                if arrays:
                    s = self._ops_for(dtype).scalars(scalars_for(dtype))
                else:
                    s = self._scalars(group, Arith(dtype))
                scalars[(dtype, arrays)] = s
            return s

        count = len(dense)
        for device, dtype, idx in batches:
            if len(idx) == count:
                ps, ss = dense, [sl[:count] for sl in slots]
            else:
                ps, ss = [dense[i] for i in idx], [[sl[i] for i in idx] for sl in slots]
            grads = [p.grad for p in ps]
            key = (gi, device, dtype)
            cpu = device.type == "cpu"
            plan = self._plans.get(key)
            if cpu and dtype in ARRAY_DTYPES and not self.one_pass and _one_thread():
                if not (isinstance(plan, ArrayPlan) and plan.matches(ps, ss)):
                    plan = ArrayPlan(ps, ss) if all(map(writable, ps)) else Layout()
                    self._plans[key] = plan
                if isinstance(plan, ArrayPlan):
                    plan.run(self._update, scalars_for(dtype, True), self._ops_for(dtype), grads)
                    continue
            if plan is None:
                plan = self._plans[key] = Layout()
            merged = plan.merge([ps, grads, *ss])
            ops = self._reused if cpu else FRESH
            for piece in [merged] if self.one_pass else pieces(merged, device):
                self._update(scalars_for(dtype), ops, *piece)
        for i, p in enumerate(sparse):
            self._update_sparse(scalars_for(p.dtype), p, p.grad, [sl[count + i] for sl in slots])

    def _ops_for(self, dtype: torch.dtype) -> Any:
        """The :class:`ArrayOps` of ``dtype`` (its scalars' 0-d arrays are kept)."""
        ops = self._array_ops.get(dtype)
        if ops is None:
            ops = self._array_ops[dtype] = ArrayOps(dtype)
        return ops

    def _slots(self, params: Tensors, fills: dict[str, float]) -> list[Tensors]:
        """The slots of ``params``, a list per name of ``fills``; missing ones are created,
        packed in parameter order into one buffer per (device, dtype), filled."""
        state = self.state
        dicts = [state[p] for p in params]
        out = []
        for name, value in fills.items():
            slots = [d.get(name) for d in dicts]
            missing = [i for i, t in enumerate(slots) if t is None]
            if missing:
                fresh = pack(
                    [(params[i].shape, params[i].dtype, params[i].device) for i in missing]
                )
                for i, slot in zip(missing, fresh):
                    slots[i] = dicts[i][name] = slot.fill_(value)
            out.append(slots)
        return out

    def _repack_slots(self) -> None:
        """Give loaded slots storage of their own, packed per group as :meth:`_slots`
        packs them (torch's load aliases the state dict's tensors and keeps their layout)."""
        state = self.state
        for group in self.param_groups:
            params = [p for p in group["params"] if state.get(p)]
            for name in self._slot_fills(group):
                fresh = pack([(p.shape, p.dtype, p.device) for p in params])
                for p, slot in zip(params, fresh):
                    state[p][name] = slot.copy_(state[p][name])

    def _check_hyper(
        self, values: Mapping[str, Any], group: int | None, keys: Iterable[str] | None = None
    ) -> None:
        """Raise if any of ``keys`` (default: all :attr:`rules`) of ``values`` is missing or
        breaks its rule; ``group`` None means constructor arguments."""
        for key in self.rules if keys is None else keys:
            rule = self.rules.get(key)
            if rule is None:
                continue
            if key not in values:
                raise ValueError(f"{type(self).__name__}: param group {group} has no {key!r}")
            value = values[key]
            problem = rule.problem(value)
            if problem is not None:
                kind, requirement = problem
                what = (
                    _ARGUMENT.get(key, key) if group is None else f"{key!r} of param group {group}"
                )
                raise kind(f"{type(self).__name__}: {what} must be {requirement}, got {value!r}")

    def _check_params(self, params: Sequence[Any], group: int) -> None:
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"{type(self).__name__}: parameter {i} of param group {group} is a "
                    f"{type(p).__name__}, not a tensor (params takes parameters or (name, "
                    "parameter) pairs)"
                )
            self._check_dtype(p.dtype, f"parameter {i} of param group {group}")
            first = seen.setdefault(id(p), i)
            if first != i:
                raise ValueError(
                    f"{type(self).__name__}: parameter {i} of param group {group} is parameter "
                    f"{first} again; it would be updated twice per step. List it once."
                )

    def _check_dtype(self, dtype: torch.dtype, what: str) -> None:
        if dtype.is_complex or not dtype.is_floating_point:
            raise TypeError(
                f"{type(self).__name__}: {what} is {dtype}; TF1's update rules are defined here "
                "for real floating-point tensors only (view a complex parameter as real pairs "
                "with torch.view_as_real)"
            )

    def _check_sparse(self, p: torch.Tensor, group: int) -> None:
        self._check_dtype(p.dtype, f"a parameter of param group {group}")
        if not p.is_contiguous():
            raise ValueError(
                f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} in param group "
                f"{group} has a sparse gradient but is not contiguous; its rows must be "
                "addressable in place (param.data = param.data.contiguous())"
            )

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        name = type(self).__name__
        who = f"{name}.load_state_dict"
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(
                f"{who}: expected the output of {name}.state_dict() "
                "({'state': ..., 'param_groups': [...]})"
            )
        state, groups = state_dict["state"], state_dict["param_groups"]
        if not isinstance(state, Mapping):
            raise TypeError(f"{who}: 'state' must be a dict, got {type(state).__name__}")
        if not isinstance(groups, (list, tuple)):
            raise TypeError(f"{who}: 'param_groups' must be a list, got {type(groups).__name__}")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{who}: the state dict has {len(groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        listed: set[Any] = set()
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), list):
                raise TypeError(
                    f"{who}: param group {gi} must be a dict with a 'params' list, got "
                    f"{type(saved).__name__}"
                )
            missing = [k for k in self.rules if k not in saved]
            if missing:
                raise ValueError(
                    f"{who}: param group {gi} has no {missing}: not a state dict of {name} (its "
                    f"keys: {sorted(map(str, saved))})"
                )
            self._check_hyper(saved, gi)
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"{who}: param group {gi} has {len(saved['params'])} parameters in the "
                    f"state dict, {len(mine['params'])} here"
                )
            expected = set(self._slot_fills(saved))
            for key, p in zip(saved["params"], mine["params"]):
                if key in listed or not isinstance(key, int) or isinstance(key, bool):
                    raise ValueError(
                        f"{who}: param group {gi} lists parameter id {key!r}, "
                        + ("listed before" if key in listed else "not an int")
                    )
                listed.add(key)
                entry = state.get(key)
                if entry is None:
                    continue
                if not isinstance(entry, Mapping) or set(entry) != expected:
                    found = sorted(map(str, entry)) if isinstance(entry, Mapping) else entry
                    raise ValueError(
                        f"{who}: the state of parameter {key} has {found!r}, expected the slots "
                        f"{sorted(expected)} (a state dict of another optimizer?)"
                    )
                for slot, t in entry.items():
                    if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                        raise ValueError(
                            f"{who}: slot {slot!r} of parameter {key} is "
                            f"{getattr(t, 'shape', type(t).__name__)}, expected a tensor of "
                            f"shape {tuple(p.shape)}"
                        )
                    if t.layout != torch.strided or t.is_complex() or not t.is_floating_point():
                        raise TypeError(
                            f"{who}: slot {slot!r} of parameter {key} is a {t.layout} {t.dtype} "
                            "tensor; slots are dense real floating-point tensors (cast to the "
                            "parameter's dtype when loaded)"
                        )
        unknown = [k for k in state if k not in listed]
        if unknown:
            raise ValueError(
                f"{who}: 'state' has entries for parameter ids {unknown[:10]} that no param group "
                f"lists ({sorted(listed)[:10]}...): a damaged state dict, or one whose keys "
                "were turned into strings (by JSON)?"
            )
