"""Every use of a private torch name in polyak, each behind a fallback built on public API.

Any torch release may rename or change what an underscore name means, so nothing else in
polyak touches one: it calls the functions here. Each entry is decided once, at import, by a
probe that runs the internal on a small case and checks it does what polyak relies on; when
the internal is missing or the probe disagrees, the entry is bound to its fallback instead.
Fallbacks give the same results, bit for bit (tested by forcing each one); what they can
cost is speed (docs/performance.md, "torch internals"). Fast paths on other internals were
measured and removed: they bought under 5 %.

Entries, with what the fallback does:

- ``foreach_*``: torch's multi-tensor kernels (``torch._foreach_add_`` ...). They carry an
  underscore but are what ``torch.optim`` itself runs on, documented in torch's reference
  as beta. Fallback: the same op per tensor (same kernels on the CPU; on CUDA the norm of the
  per-tensor path may differ in the last bit, as it sums in another order).
- :func:`persistent_buffers`: a module's own buffers that go into its ``state_dict``
  (``Module._buffers``, ``_non_persistent_buffers_set``). Fallback: ``named_buffers`` and the
  keys of the module's ``state_dict``.

``POLYAK_TORCH_FALLBACKS`` (``all``, or entry names separated by commas) forces those
fallbacks, e.g. to run the test suite as on a torch that lacks the internals.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "FALLBACKS",
    "fast",
    "foreach_add",
    "foreach_add_",
    "foreach_addcdiv_",
    "foreach_addcmul_",
    "foreach_clamp_max_",
    "foreach_clamp_min_",
    "foreach_copy_",
    "foreach_div_",
    "foreach_lerp_",
    "foreach_lerp_scalars_",
    "foreach_mul",
    "foreach_mul_",
    "foreach_neg",
    "foreach_norm",
    "foreach_pow",
    "foreach_reciprocal_",
    "foreach_sqrt",
    "foreach_sqrt_",
    "foreach_sub",
    "foreach_sub_",
    "foreach_zero_",
    "persistent_buffers",
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
    "foreach_add": ("_foreach_add", _per_tensor("add", returns=True)),
    "foreach_add_": ("_foreach_add_", _per_tensor("add_", returns=False)),
    "foreach_addcdiv_": ("_foreach_addcdiv_", _per_tensor("addcdiv_", returns=False)),
    "foreach_addcmul_": ("_foreach_addcmul_", _per_tensor("addcmul_", returns=False)),
    "foreach_clamp_max_": ("_foreach_clamp_max_", _per_tensor("clamp_max_", returns=False)),
    "foreach_clamp_min_": ("_foreach_clamp_min_", _per_tensor("clamp_min_", returns=False)),
    "foreach_copy_": ("_foreach_copy_", _per_tensor("copy_", returns=False)),
    "foreach_div_": ("_foreach_div_", _per_tensor("div_", returns=False)),
    "foreach_lerp_": ("_foreach_lerp_", _per_tensor("lerp_", returns=False)),
    # A list of Python-number weights, one per tensor: an overload older torch may lack, so an
    # entry of its own (its absence leaves foreach_lerp_ fast for every other caller).
    "foreach_lerp_scalars_": ("_foreach_lerp_", _per_tensor("lerp_", returns=False)),
    "foreach_mul": ("_foreach_mul", _per_tensor("mul", returns=True)),
    "foreach_mul_": ("_foreach_mul_", _mul_in_place_per_tensor),
    "foreach_neg": ("_foreach_neg", _per_tensor("neg", returns=True)),
    "foreach_norm": ("_foreach_norm", _norm_per_tensor),
    "foreach_pow": ("_foreach_pow", _per_tensor("pow", returns=True)),
    "foreach_reciprocal_": ("_foreach_reciprocal_", _per_tensor("reciprocal_", returns=False)),
    "foreach_sqrt": ("_foreach_sqrt", _per_tensor("sqrt", returns=True)),
    "foreach_sqrt_": ("_foreach_sqrt_", _per_tensor("sqrt_", returns=False)),
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

    def others() -> list[torch.Tensor]:
        return [torch.linspace(0.5, 4.0, 5), torch.full((3,), 3.0)]

    weights = [torch.tensor(0.2), torch.tensor(0.9)]
    forms: dict[str, list[tuple[tuple, dict[str, Any]]]] = {
        "foreach_add": [((0.5,), {})],
        "foreach_add_": [((other(),), {}), ((other(),), {"alpha": 0.25}), ((0.5,), {})],
        "foreach_addcdiv_": [((other(), others()), {}), ((other(), others()), {"value": 0.3})],
        "foreach_addcmul_": [((other(), others()), {"value": 0.3})],
        "foreach_clamp_max_": [((0.5,), {}), ((other(),), {})],
        "foreach_clamp_min_": [((0.5,), {}), ((other(),), {})],
        "foreach_copy_": [((other(),), {})],
        "foreach_div_": [((3.0,), {}), ((other(),), {})],
        "foreach_lerp_": [((other(), 0.3), {}), ((other(), weights), {})],
        "foreach_lerp_scalars_": [((other(), [0.2, 0.9]), {})],
        "foreach_mul": [((0.7,), {}), ((torch.tensor(0.3),), {}), ((other(),), {})],
        "foreach_mul_": [
            ((0.7,), {}),
            ((torch.tensor(0.3),), {}),
            ((weights,), {}),
            ((other(),), {}),
        ],
        "foreach_neg": [((), {})],
        "foreach_norm": [((), {}), ((), {"ord": float("inf")})],
        "foreach_pow": [((-0.7,), {}), ((2.0,), {})],
        "foreach_reciprocal_": [((), {})],
        "foreach_sqrt": [((), {})],
        "foreach_sqrt_": [((), {})],
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
        if len(got) != len(want) or not all(map(_same_bits, got, want)):
            return False
    return True


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN (sqrt and pow of the probes' negatives)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


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


# ---------------------------------------------------------------- the choice

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
    """The internal-based implementation of entry ``name`` when this torch passes its probe,
    else ``None``."""
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
    """Whether entry ``name`` runs on torch's internals here."""
    return globals()[name] is not FALLBACKS[name]


foreach_add: Callable[..., list[torch.Tensor]]
foreach_add_: Callable[..., None]
foreach_addcdiv_: Callable[..., None]
foreach_addcmul_: Callable[..., None]
foreach_clamp_max_: Callable[..., None]
foreach_clamp_min_: Callable[..., None]
foreach_copy_: Callable[..., None]
foreach_div_: Callable[..., None]
foreach_lerp_: Callable[..., None]
foreach_lerp_scalars_: Callable[..., None]
foreach_mul: Callable[..., list[torch.Tensor]]
foreach_mul_: Callable[..., None]
foreach_neg: Callable[..., list[torch.Tensor]]
foreach_norm: Callable[..., list[torch.Tensor]]
foreach_pow: Callable[..., list[torch.Tensor]]
foreach_reciprocal_: Callable[..., None]
foreach_sqrt: Callable[..., list[torch.Tensor]]
foreach_sqrt_: Callable[..., None]
foreach_sub: Callable[..., list[torch.Tensor]]
foreach_sub_: Callable[..., None]
foreach_zero_: Callable[..., None]
persistent_buffers: Callable[[nn.Module], Iterator[tuple[str, torch.Tensor]]]
"""``(name, buffer)`` for the module's own (not its children's) buffers in its state_dict."""

for _name in _ENTRIES:  # the choice, once: a few small tensor ops at import
    _impl = None if _name in _FORCED else fast(_name)
    globals()[_name] = FALLBACKS[_name] if _impl is None else _impl
