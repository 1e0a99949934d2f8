"""Clipping functions against TensorFlow's formulas, worked with numpy/by hand."""

import math

import numpy as np
import pytest
import torch

import polyak

pytestmark = pytest.mark.numerics  # expected bits: run again with AVX-512 off


def test_clip_by_value_tf_order():
    t = torch.tensor([-3.0, 0.5, 3.0, float("nan")])
    out = polyak.clip_by_value(t, -1.0, 1.0)
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.5, 1.0, float("nan")]), equal_nan=True)
    # lo > hi: TF's maximum(minimum(t, hi), lo) gives lo everywhere
    torch.testing.assert_close(
        polyak.clip_by_value(torch.tensor([0.0, 5.0]), 2.0, 1.0), torch.tensor([2.0, 2.0])
    )


def test_clip_by_norm_formula_and_zero_norm():
    t = torch.tensor([3.0, 4.0])  # norm 5
    torch.testing.assert_close(polyak.clip_by_norm(t, 2.0), t * 2.0 / 5.0)
    torch.testing.assert_close(polyak.clip_by_norm(t, 10.0), t)
    z = torch.zeros(3)
    assert torch.equal(polyak.clip_by_norm(z, 1.0), z)


def test_clip_by_norm_axes():
    t = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = polyak.clip_by_norm(t, 1.0, axes=1)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_global_norm_ignores_none_and_matches_numpy():
    a, b = np.array([1.0, 2.0], np.float32), np.array([[3.0], [4.0]], np.float32)
    n = polyak.global_norm([torch.from_numpy(a), None, torch.from_numpy(b)])
    assert n.item() == pytest.approx(math.sqrt((a**2).sum() + (b**2).sum()))
    with pytest.raises(ValueError):
        polyak.global_norm([None])


def test_clip_by_global_norm_formula():
    ts = [torch.tensor([3.0]), None, torch.tensor([4.0])]  # norm 5
    out, norm = polyak.clip_by_global_norm(ts, 1.0)
    assert out[1] is None and norm.item() == 5.0
    c = np.float32(1.0)
    scale = c * min(np.float32(1) / np.float32(5), np.float32(1) / c)
    torch.testing.assert_close(out[0], torch.tensor([3.0 * scale]))
    torch.testing.assert_close(out[2], torch.tensor([4.0 * scale]))
    # under the threshold: scale = c * (1/c), exactly as TF rounds it in float32
    c = np.float32(0.3)
    out, _ = polyak.clip_by_global_norm([torch.tensor([0.1])], 0.3)
    assert out[0].item() == np.float32(0.1) * (c * (np.float32(1) / c))


def test_clip_by_global_norm_zero_and_nonfinite_norm():
    out, norm = polyak.clip_by_global_norm([torch.zeros(2)], 1.0)
    assert norm.item() == 0.0 and torch.equal(out[0], torch.zeros(2))
    for bad in (float("inf"), float("nan")):
        out, norm = polyak.clip_by_global_norm([torch.tensor([1.0, bad]), torch.ones(2)], 1.0)
        assert torch.isnan(out[0]).all() and torch.isnan(out[1]).all()
        assert not math.isfinite(norm.item())


def test_clip_by_global_norm_use_norm_and_errors():
    out, norm = polyak.clip_by_global_norm([torch.tensor([1.0])], 1.0, use_norm=torch.tensor(4.0))
    torch.testing.assert_close(out[0], torch.tensor([0.25]))
    assert norm.item() == 4.0
    with pytest.raises(TypeError, match="sequence"):
        polyak.clip_by_global_norm(torch.ones(2), 1.0)
    with pytest.raises(ValueError, match=r"clip_norm must be in \(0, inf\)"):
        polyak.clip_by_global_norm([torch.ones(2)], -1.0)


def _sparse():
    # index 0 twice: the dense gradient is [3, 0, 4] (1 + 2 at index 0)
    return torch.sparse_coo_tensor([[0, 0, 2]], [1.0, 2.0, 4.0], (3,), check_invariants=True)


def test_sparse_is_coalesced_never_wrong():
    s = _sparse()
    dense = s.to_dense()
    n = polyak.global_norm([s])
    assert n.item() == pytest.approx(5.0)
    out, _ = polyak.clip_by_global_norm([s], 1.0)
    assert out[0].is_sparse
    torch.testing.assert_close(out[0].to_dense(), dense / 5.0)
    v = polyak.clip_by_value(s, 0.0, 3.5)
    assert v.is_sparse
    torch.testing.assert_close(v.to_dense(), torch.tensor([3.0, 0.0, 3.5]))
    torch.testing.assert_close(polyak.clip_by_norm(s, 1.0).to_dense(), dense / 5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_global_scale_is_tf_formula_bit_for_bit(dtype):
    """The fused ``add(N - N, min(1/N, 1/c), alpha=c)`` gives the bits of TF's separate ops."""
    from polyak.grad.clipping import global_scale

    norms = [0.0, 1e-30, 1e-7, 0.3, 1.0, 2.5, 7.0, 1e4, 3e38, math.inf, math.nan]
    for c in (0.3, 1, 2.5, 10.0):
        for n in norms:
            norm = torch.tensor(n, dtype=dtype)
            c_t = torch.tensor(c, dtype=dtype)
            ref = torch.clamp_max(norm.reciprocal(), c_t.reciprocal()) * c_t + (norm - norm)
            got = global_scale(norm, c)
            assert got.dtype == dtype
            assert torch.equal(got, ref) or (ref.isnan() and got.isnan()), (c, n)
