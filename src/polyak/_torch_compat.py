"""Every use of a private torch name in polyak, each behind a fallback built on public API.

Any torch release may rename or change what an underscore name means, so nothing else in
polyak touches one: it calls the functions here. Each entry is decided once, on its first use, by
a probe that runs the internal on a small case and checks it does what polyak relies on; when
the internal is missing or the probe disagrees, the entry is bound to its fallback instead.
Fallbacks give the same results, bit for bit (tested by forcing each one); what they can
cost is speed, or a fast path they turn off (docs/performance.md says what each one buys).

Entries, with what the fallback does:

- ``foreach_*``: torch's multi-tensor kernels (``torch._foreach_add_`` ...). They carry an
  underscore but are what ``torch.optim`` itself runs on, documented in torch's reference
  as beta. Fallback: the same op per tensor (same kernels on the CPU; on CUDA the norm of the
  per-tensor path may differ in the last bit, as it sums in another order).
- :func:`storage_use_count`: how many tensors share a storage
  (``torch._C._storage_Use_Count``), to reuse a gradient buffer nobody else holds.
  Fallback: unknown (``None``), never reuse.
- :func:`step_hooks_registered`, :func:`profiler_enabled`, :func:`graph_capture_check`,
  :func:`fused_check_pending`: what ``Optimizer.step`` would do besides the update
  (``_optimizer_step_pre_hooks``, ``_global_optimizer_pre_hooks``,
  ``torch.autograd._profiler_enabled``, ``_cuda_graph_capture_health_check``,
  ``_need_device_dtype_check_for_fused``). Fallback: assume it does more, so polyak calls
  ``step()`` (see :mod:`polyak.gradients._update`).
- :func:`adam_decouples_weight_decay`: whether ``torch.optim.adam.adam`` takes
  ``decoupled_weight_decay`` (torch >= 2.7), read from its signature. Fallback: from
  ``torch.optim.Adam``'s defaults.
- :func:`persistent_buffers`: a module's own buffers that go into its ``state_dict``
  (``Module._buffers``, ``_non_persistent_buffers_set``). Fallback: ``named_buffers`` and the
  keys of the module's ``state_dict``.

``POLYAK_TORCH_FALLBACKS`` (``all``, or entry names separated by commas) forces those
fallbacks, e.g. to run the test suite as on a torch that lacks the internals.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "FALLBACKS",
    "adam_decouples_weight_decay",
    "fast",
    "foreach_add_",
    "foreach_clamp_max_",
    "foreach_clamp_min_",
    "foreach_copy_",
    "foreach_div_",
    "foreach_lerp_",
    "foreach_mul",
    "foreach_mul_",
    "foreach_norm",
    "foreach_sub",
    "foreach_sub_",
    "foreach_zero_",
    "fused_check_pending",
    "graph_capture_check",
    "persistent_buffers",
    "profiler_enabled",
    "step_hooks_registered",
    "storage_use_count",
    "uses_fast",
]

# ---------------------------------------------------------------- multi-tensor kernels


def _per_tensor(method: str, returns: bool) -> Callable[..., Any]:
    """``torch._foreach_<method>`` as a loop of ``Tensor.<method>``: list arguments are taken
    element by element, scalars (and 0-dim tensors) passed to every call."""

    def run(tensors: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        out = []
        for i, t in enumerate(tensors):
            each = [a[i] if isinstance(a, (list, tuple)) else a for a in args]
            out.append(getattr(t, method)(*each, **kwargs))
        return out if returns else None

    run.__name__ = f"foreach_{method}"
    run.__doc__ = f"``Tensor.{method}`` on each tensor (fallback of ``torch._foreach_{method}``)."
    return run


_mul_each_ = _per_tensor("mul_", returns=False)


def _mul_in_place_per_tensor(tensors: Sequence[torch.Tensor], other: Any) -> None:
    """``Tensor.mul_`` on each tensor (fallback of ``torch._foreach_mul_``). On the CPU the
    in-place multi-tensor kernel rounds a Python-number factor to a float16/bfloat16 tensor's
    dtype first (the out-of-place one does not), so this rounds it too."""
    if isinstance(other, (int, float)) and tensors:
        t = tensors[0]
        if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
            other = float(torch.tensor(other, dtype=t.dtype))
    _mul_each_(tensors, other)


def _norm_per_tensor(tensors: Sequence[torch.Tensor], ord: float = 2) -> list[torch.Tensor]:
    """``torch.linalg.vector_norm`` of each tensor (the fallback of ``torch._foreach_norm``)."""
    return [torch.linalg.vector_norm(t, ord) for t in tensors]


_FOREACH = {
    # name: (torch's op, fallback)
    "foreach_add_": ("_foreach_add_", _per_tensor("add_", returns=False)),
    "foreach_clamp_max_": ("_foreach_clamp_max_", _per_tensor("clamp_max_", returns=False)),
    "foreach_clamp_min_": ("_foreach_clamp_min_", _per_tensor("clamp_min_", returns=False)),
    "foreach_copy_": ("_foreach_copy_", _per_tensor("copy_", returns=False)),
    "foreach_div_": ("_foreach_div_", _per_tensor("div_", returns=False)),
    "foreach_lerp_": ("_foreach_lerp_", _per_tensor("lerp_", returns=False)),
    "foreach_mul": ("_foreach_mul", _per_tensor("mul", returns=True)),
    "foreach_mul_": ("_foreach_mul_", _mul_in_place_per_tensor),
    "foreach_norm": ("_foreach_norm", _norm_per_tensor),
    "foreach_sub": ("_foreach_sub", _per_tensor("sub", returns=True)),
    "foreach_sub_": ("_foreach_sub_", _per_tensor("sub_", returns=False)),
    "foreach_zero_": ("_foreach_zero_", _per_tensor("zero_", returns=False)),
}


def _foreach_cases(name: str) -> list[tuple[list[torch.Tensor], tuple, dict[str, Any]]]:
    """Fresh ``(tensors, args, kwargs)`` for each form polyak calls ``name`` with."""

    def tensors() -> list[torch.Tensor]:
        return [torch.linspace(-2.0, 3.0, 5), torch.full((3,), 0.7)]

    def other() -> list[torch.Tensor]:
        return [torch.full((5,), 0.1), torch.full((3,), -2.0)]

    weights = [torch.tensor(0.2), torch.tensor(0.9)]
    forms: dict[str, list[tuple[tuple, dict[str, Any]]]] = {
        "foreach_add_": [((other(),), {}), ((other(),), {"alpha": 0.25})],
        "foreach_clamp_max_": [((0.5,), {}), ((other(),), {})],
        "foreach_clamp_min_": [((0.5,), {}), ((other(),), {})],
        "foreach_copy_": [((other(),), {})],
        "foreach_div_": [((3.0,), {}), ((other(),), {})],
        "foreach_lerp_": [((other(), 0.3), {}), ((other(), weights), {})],
        "foreach_mul": [((0.7,), {}), ((torch.tensor(0.3),), {})],
        "foreach_mul_": [((0.7,), {}), ((torch.tensor(0.3),), {}), ((weights,), {})],
        "foreach_norm": [((), {}), ((), {"ord": float("inf")})],
        "foreach_sub": [((other(),), {})],
        "foreach_sub_": [((other(),), {})],
        "foreach_zero_": [((), {})],
    }
    return [(tensors(), args, kwargs) for args, kwargs in forms[name]]


def _probe_foreach(name: str, op: Callable[..., Any]) -> bool:
    """``op`` gives the fallback's bits in every form polyak calls it with."""
    fallback = _FOREACH[name][1]
    for (mine, args, kwargs), (theirs, _, _) in zip(_foreach_cases(name), _foreach_cases(name)):
        got = op(mine, *args, **kwargs)
        want = fallback(theirs, *args, **kwargs)
        got, want = (mine, theirs) if want is None else (got, want)
        if len(got) != len(want) or not all(torch.equal(a, b) for a, b in zip(got, want)):
            return False
    return True


# ---------------------------------------------------------------- storages


def _raw_use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _use_count_fast() -> Callable[[torch.Tensor], int | None]:
    # The raw count includes the storage object the call itself creates on some releases
    # (2.13) and not on others (2.4): measured on a lone tensor, and taken off.
    extra = _raw_use_count(torch.zeros(1)) - 1

    def use_count(t: torch.Tensor) -> int | None:
        return _raw_use_count(t) - extra

    return use_count


def _use_count_unknown(t: torch.Tensor) -> int | None:
    return None


def _probe_use_count(fast: Callable[..., Any]) -> bool:
    buf = torch.zeros(4)
    views = [buf[:2], buf[2:]]
    shared = fast(buf) == 3 and fast(views[0]) == 3
    del views
    return shared and fast(buf) == 1


# ---------------------------------------------------------------- what Optimizer.step does


def _hooks_fast(opt: torch.optim.Optimizer) -> bool:
    import torch.optim.optimizer as torch_optimizer

    return bool(
        opt._optimizer_step_pre_hooks
        or opt._optimizer_step_post_hooks
        or torch_optimizer._global_optimizer_pre_hooks
        or torch_optimizer._global_optimizer_post_hooks
    )


def _assume_true(*args: Any) -> bool:
    return True


def _probe_hooks(fast: Callable[..., Any]) -> bool:
    import torch.optim.optimizer as torch_optimizer

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    hooks = opt._optimizer_step_post_hooks
    handle = opt.register_step_post_hook(lambda *args: None)
    seen = len(hooks) == 1 and fast(opt)
    handle.remove()
    return (
        seen
        and not hooks
        and isinstance(torch_optimizer._global_optimizer_pre_hooks, dict)
        and isinstance(torch_optimizer._global_optimizer_post_hooks, dict)
    )


def _profiler_fast() -> bool:
    return bool(torch.autograd._profiler_enabled())


def _probe_profiler(fast: Callable[..., Any]) -> bool:
    return fast() in (True, False)


def _graph_check_fast(opt: torch.optim.Optimizer) -> Callable[[], None] | None:
    return getattr(opt, "_accelerator_graph_capture_health_check", None) or getattr(
        opt, "_cuda_graph_capture_health_check", None
    )


def _no_graph_check(opt: torch.optim.Optimizer) -> Callable[[], None] | None:
    return None


def _probe_graph_check(fast: Callable[..., Any]) -> bool:
    check = fast(torch.optim.Adam([torch.zeros(1, requires_grad=True)]))
    if check is None:
        return False
    check()  # outside capture: passes
    return True


def _fused_check_fast(opt: torch.optim.Optimizer) -> bool:
    return bool(getattr(opt, "_need_device_dtype_check_for_fused", True))


def _probe_fused_check(fast: Callable[..., Any]) -> bool:
    # Set by torch on fused optimizers until their first step() has checked the devices.
    try:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return hasattr(opt, "_need_device_dtype_check_for_fused") and fast(opt)


def _adam_decouples_from_signature() -> bool:
    from torch.optim.adam import adam

    return "decoupled_weight_decay" in inspect.signature(adam).parameters


def _adam_decouples_from_defaults() -> bool:
    return "decoupled_weight_decay" in torch.optim.Adam([torch.zeros(1)]).defaults


# ---------------------------------------------------------------- module buffers


def _persistent_fast(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    skip = module._non_persistent_buffers_set
    for name, buf in module._buffers.items():
        if buf is not None and name not in skip:
            yield name, buf


def _persistent_public(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    saved = module.state_dict(keep_vars=True)
    for name, buf in module.named_buffers(recurse=False):
        if name in saved:
            yield name, buf


def _probe_persistent(fast: Callable[..., Any]) -> bool:
    m = nn.Module()
    m.register_buffer("kept", torch.zeros(1))
    m.register_buffer("cache", torch.zeros(1), persistent=False)
    m.register_buffer("empty", None)
    return [n for n, _ in fast(m)] == ["kept"]


# ---------------------------------------------------------------- the choice, made once

# name: (builds the internal-based implementation, public fallback, probe of the former)
_ENTRIES: dict[str, tuple[Callable[[], Any], Any, Callable[[Any], bool]]] = {
    name: (
        lambda op=op: getattr(torch, op),
        fallback,
        lambda impl, name=name: _probe_foreach(name, impl),
    )
    for name, (op, fallback) in _FOREACH.items()
}
_ENTRIES.update(
    storage_use_count=(_use_count_fast, _use_count_unknown, _probe_use_count),
    step_hooks_registered=(lambda: _hooks_fast, _assume_true, _probe_hooks),
    profiler_enabled=(lambda: _profiler_fast, _assume_true, _probe_profiler),
    graph_capture_check=(lambda: _graph_check_fast, _no_graph_check, _probe_graph_check),
    fused_check_pending=(lambda: _fused_check_fast, _assume_true, _probe_fused_check),
    adam_decouples_weight_decay=(
        lambda: _adam_decouples_from_signature,
        _adam_decouples_from_defaults,
        lambda impl: isinstance(impl(), bool),
    ),
    persistent_buffers=(lambda: _persistent_fast, _persistent_public, _probe_persistent),
)

FALLBACKS: dict[str, Callable[..., Any]] = {name: e[1] for name, e in _ENTRIES.items()}
"""Per entry, the implementation built on public API."""


def _forced() -> set[str]:
    names = {n.strip() for n in os.environ.get("POLYAK_TORCH_FALLBACKS", "").split(",")} - {""}
    unknown = names - set(_ENTRIES) - {"all"}
    if unknown:
        raise ValueError(
            f"POLYAK_TORCH_FALLBACKS names no entry {sorted(unknown)}; use 'all' or some of "
            f"{sorted(_ENTRIES)}, separated by commas"
        )
    return set(_ENTRIES) if "all" in names else names


_FORCED = _forced()
_FAST: dict[str, Callable[..., Any] | None] = {}


def fast(name: str) -> Callable[..., Any] | None:
    """The internal-based implementation of entry ``name`` when this torch passes its probe
    (run on the first call), else ``None``."""
    if name not in _FAST:
        build, _, probe = _ENTRIES[name]
        try:
            impl = build()
            works = bool(probe(impl))
        except Exception:  # missing, renamed, or a changed signature: not usable
            impl, works = None, False
        _FAST[name] = impl if works else None
    return _FAST[name]


def uses_fast(name: str) -> bool:
    """Whether entry ``name`` runs on torch's internals here (choosing it now if not yet)."""
    chosen = globals()[name]
    if getattr(chosen, "__wrapped_entry__", None) == name:  # not chosen yet
        chosen = _choose(name)
    return chosen is not FALLBACKS[name]


def _choose(name: str) -> Callable[..., Any]:
    """Bind entry ``name`` for good: its fast implementation, unless the probe failed or
    ``POLYAK_TORCH_FALLBACKS`` forces the fallback."""
    impl = None if name in _FORCED else fast(name)
    chosen = FALLBACKS[name] if impl is None else impl
    globals()[name] = chosen
    return chosen


def _first_call(name: str) -> Callable[..., Any]:
    # Probes build optimizers, whose first construction imports torch._dynamo (about a
    # second): entries are chosen on first use, not when polyak is imported.
    def call(*args: Any, **kwargs: Any) -> Any:
        return _choose(name)(*args, **kwargs)

    call.__name__ = name
    call.__wrapped_entry__ = name  # type: ignore[attr-defined]
    return call


foreach_add_ = _first_call("foreach_add_")
foreach_clamp_max_ = _first_call("foreach_clamp_max_")
foreach_clamp_min_ = _first_call("foreach_clamp_min_")
foreach_copy_ = _first_call("foreach_copy_")
foreach_div_ = _first_call("foreach_div_")
foreach_lerp_ = _first_call("foreach_lerp_")
foreach_mul = _first_call("foreach_mul")
foreach_mul_ = _first_call("foreach_mul_")
foreach_norm = _first_call("foreach_norm")
foreach_sub = _first_call("foreach_sub")
foreach_sub_ = _first_call("foreach_sub_")
foreach_zero_ = _first_call("foreach_zero_")
storage_use_count = _first_call("storage_use_count")
"""How many tensors share ``t``'s storage (``t`` and its views included); ``None`` when this
torch cannot tell."""
step_hooks_registered = _first_call("step_hooks_registered")
"""Whether ``opt.step()`` would run step hooks (the optimizer's own or global ones)."""
profiler_enabled = _first_call("profiler_enabled")
"""Whether the autograd profiler is recording."""
graph_capture_check = _first_call("graph_capture_check")
"""The check Adam's and AdamW's ``step()`` runs first (it raises under CUDA graph capture
unless ``capturable``), or ``None`` when it cannot be called here."""
fused_check_pending = _first_call("fused_check_pending")
"""Whether a fused optimizer's ``step()`` still has to check devices and dtypes."""
adam_decouples_weight_decay = _first_call("adam_decouples_weight_decay")
"""Whether ``torch.optim.adam.adam`` takes ``decoupled_weight_decay`` (torch >= 2.7)."""
persistent_buffers = _first_call("persistent_buffers")
"""``(name, buffer)`` for the module's own (not its children's) buffers in its state_dict."""
