"""Snapshots of an object's state, compared bit for bit: "state identical before and after"."""

import copy
from typing import Any

import torch


def snapshot(obj: Any) -> Any:
    """A deep copy of ``obj.state_dict()`` (tensors cloned)."""
    return copy.deepcopy(obj.state_dict())


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """``a`` and ``b`` equal, recursively; tensors bit for bit (NaN included), with the same
    dtype, shape and device."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), path
        bits_a = a.detach().reshape(-1).view(torch.uint8)
        bits_b = b.detach().reshape(-1).view(torch.uint8)
        assert torch.equal(bits_a, bits_b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
