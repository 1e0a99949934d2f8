"""Assignments of a parameter, buffer or submodule to any module, counted.

``m.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)`` and ``m.fc = nn.Linear(...)``
replace tensors that an average may be following. torch's global registration hooks count
them once an average asks (:func:`watch`), so a step compares one int (:func:`count`) to know
that nothing changed, and looks at its modules only when the count moved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["count", "watch"]

_count = [0]
_watching: list[bool] = []


def _counted(module: nn.Module, name: str, value: Any) -> None:
    _count[0] += 1


def watch() -> None:
    """Start counting (once per process; later calls do nothing)."""
    if not _watching:
        hooks = torch.nn.modules.module
        hooks.register_module_parameter_registration_hook(_counted)
        hooks.register_module_buffer_registration_hook(_counted)
        hooks.register_module_module_registration_hook(_counted)
        _watching.append(True)


def count() -> int:
    """Assignments seen so far (only those after the first :func:`watch` are counted)."""
    return _count[0]
