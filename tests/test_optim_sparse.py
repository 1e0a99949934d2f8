"""Sparse COO gradients in polyak.optim, as TF1's ``_apply_sparse``: duplicates summed, only the
touched rows change (Adam: moments decay and every row moves)."""

import numpy as np
import pytest
import torch
from torch import nn

import polyak
import polyak.optim as po

# Expected bits (run again with AVX-512 off); the CPU update goes through NumPy with one torch
# thread (and foreach with more): test that.
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_torch_thread")]

# Optimizers whose TF sparse kernel is the dense rule on the touched rows (for rows of more
# than one number): a sparse step equals dense steps of per-row variables, only the touched
# ones stepping.
AGREE = {
    "MomentumOptimizer": {"learning_rate": 0.1, "momentum": 0.9},
    "AdagradOptimizer": {"learning_rate": 0.1},
    "AdadeltaOptimizer": {"learning_rate": 1.0},
    "FtrlOptimizer": {
        "learning_rate": 0.1,
        "l1_regularization_strength": 0.01,
        "l2_regularization_strength": 0.01,
        "l2_shrinkage_regularization_strength": 0.1,
    },
}
# TF's sparse kernels group these differently from the dense ones: a few ulps apart.
DIFFER = {
    "MomentumOptimizer": {"learning_rate": 0.1, "momentum": 0.9, "use_nesterov": True},
    "RMSPropOptimizer": {"learning_rate": 0.01, "momentum": 0.5, "centered": True},
}

ROWS, COLS, STEPS = 8, 5, 6


def batches(seed=0, rows=ROWS, cols=COLS):
    """Per step: (indices with duplicates, values)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        idx = torch.randint(0, rows, (7,), generator=g)
        out.append((idx, torch.randn((7, cols) if cols else (7,), generator=g)))
    return out


def summed_rows(idx, values):
    """Distinct rows and their values summed in entry order (TF's unsorted_segment_sum)."""
    rows = sorted(set(idx.tolist()))
    total = {r: torch.zeros_like(values[0]) for r in rows}
    for i, v in zip(idx.tolist(), values):
        total[i] = total[i] + v
    return rows, total


def sparse_run(name, kwargs, init, steps):
    p = nn.Parameter(init.clone())
    opt = getattr(po, name)([p], **kwargs)
    for idx, values in steps:
        p.grad = torch.sparse_coo_tensor(idx[None], values, p.shape, check_invariants=True)
        opt.step()
    return p.detach(), opt.state[p]


def per_row_run(name, kwargs, init, steps):
    rows = [nn.Parameter(r.clone()) for r in init]
    opt = getattr(po, name)(rows, **kwargs)
    for idx, values in steps:
        touched, total = summed_rows(idx, values)
        for i, r in enumerate(rows):
            r.grad = total[i] if i in touched else None
        opt.step()
    return torch.stack([r.detach() for r in rows]), [opt.state[r] for r in rows]


@pytest.mark.parametrize("name", sorted(AGREE))
def test_sparse_equals_dense_steps_of_the_touched_rows(name):
    init = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(1))
    steps = batches()
    sparse, state = sparse_run(name, AGREE[name], init, steps)
    dense, row_states = per_row_run(name, AGREE[name], init, steps)
    assert torch.equal(sparse, dense)
    for slot, value in state.items():
        for i, row_state in enumerate(row_states):
            if row_state:  # rows never touched have no slots: TF creates them at their start
                assert torch.equal(value[i], row_state[slot]), (slot, i)


@pytest.mark.parametrize("name", sorted(DIFFER))
def test_sparse_near_lazy_row_updates_where_tf_groups_differently(name):
    init = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(1))
    steps = batches()
    sparse, _ = sparse_run(name, DIFFER[name], init, steps)
    dense, _ = per_row_run(name, DIFFER[name], init, steps)
    touched = sorted({i for idx, _ in steps for i in idx.tolist()})
    untouched = [i for i in range(ROWS) if i not in touched]
    assert torch.equal(sparse[untouched], init[untouched])
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    assert not torch.equal(sparse, dense)  # really TF's other grouping, not the dense kernel


def test_untouched_rows_and_their_slots_never_change():
    init = torch.randn(ROWS, COLS)
    p = nn.Parameter(init.clone())
    opt = po.RMSPropOptimizer([p], 0.01, momentum=0.9)
    p.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 3, 3]]), torch.ones(3, COLS), p.shape, check_invariants=True
    )
    opt.step()
    after_first = p.detach().clone()
    p.grad = torch.sparse_coo_tensor(torch.tensor([[3]]), torch.ones(1, COLS), p.shape)
    opt.step()
    others = [0, 2, 4, 5, 6, 7]
    assert torch.equal(p.detach()[others], init[others])
    assert torch.equal(opt.state[p]["rms"][others], torch.ones(len(others), COLS))
    assert torch.equal(opt.state[p]["momentum"][others], torch.zeros(len(others), COLS))
    # Row 1 has momentum but no gradient at step 2: TF's sparse kernel leaves it where it was.
    assert torch.equal(p.detach()[1], after_first[1])
    assert not torch.equal(p.detach()[3], after_first[3])


def test_gradient_descent_without_duplicates_equals_dense_rows():
    init = torch.randn(ROWS, COLS)
    steps = [(torch.randperm(ROWS)[:4], torch.randn(4, COLS)) for _ in range(STEPS)]
    kwargs = {"learning_rate": 0.1}
    sparse, _ = sparse_run("GradientDescentOptimizer", kwargs, init, steps)
    dense, _ = per_row_run("GradientDescentOptimizer", kwargs, init, steps)
    assert torch.equal(sparse, dense)


def test_adam_sparse_decays_the_moments_and_moves_every_row():
    f32 = np.float32
    init = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(2))
    steps = batches(3)
    ours, state = sparse_run("AdamOptimizer", {"learning_rate": 0.01}, init, steps)
    # TF1's AdamOptimizer._apply_sparse_shared, op by op in NumPy.
    var, m, v = init.numpy().copy(), np.zeros((ROWS, COLS), f32), np.zeros((ROWS, COLS), f32)
    b1, b2, eps, lr = f32(0.9), f32(0.999), f32(1e-8), f32(0.01)
    b1p, b2p = b1, b2
    for idx, values in steps:
        touched, total = summed_rows(idx, values)
        g = np.stack([total[r].numpy() for r in touched])
        alpha = lr * np.sqrt(f32(1) - b2p) / (f32(1) - b1p)
        m = m * b1
        m[touched] += g * (f32(1) - b1)
        v = v * b2
        v[touched] += g * (f32(1) - b2) * g  # grappler's order, as TF1 graph mode runs it
        var = var - alpha * m / (np.sqrt(v) + eps)
        b1p, b2p = f32(b1p * b1), f32(b2p * b2)
    assert np.array_equal(ours.numpy(), var)
    assert np.array_equal(state["m"].numpy(), m) and np.array_equal(state["v"].numpy(), v)
    last = set(steps[-1][0].tolist())
    untouched = [i for i in range(ROWS) if i not in last]
    assert not np.array_equal(ours.numpy()[untouched], init.numpy()[untouched])


def test_duplicates_are_summed_in_entry_order():
    """Three entries for one row: ((0 + a) + b) + c, as TF's unsorted_segment_sum; another
    grouping, a + (b + c), would give 0 here."""
    f32 = np.float32
    p = nn.Parameter(torch.zeros(2, 1))
    opt = po.AdagradOptimizer([p], 1.0)
    values = torch.tensor([[1.0], [-1.0], [1e-8]])
    p.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 1, 1]]), values, p.shape, check_invariants=True
    )
    opt.step()
    g = f32(f32(f32(0) + f32(1)) + f32(-1)) + f32(1e-8)
    assert g != 0
    expected = f32(0) - f32(1) * g / np.sqrt(f32(0.1) + g * g)  # TF's kernel for 1-number rows
    assert p[1, 0].item() == expected and p[0, 0].item() == 0.0


def test_gradient_descent_subtracts_each_entry_in_turn():
    """TF's GradientDescentOptimizer scatter_subs duplicates one by one, without summing."""
    f32 = np.float32
    p = nn.Parameter(torch.tensor([[1.0], [0.0]]))
    opt = po.GradientDescentOptimizer([p], 0.1)
    values = torch.tensor([[0.3], [0.7], [1e-9]])
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 0, 0]]), values, p.shape)
    opt.step()
    lr = f32(0.1)
    expected = f32(1.0)
    for v in (f32(0.3), f32(0.7), f32(1e-9)):
        expected = expected - v * lr
    assert p[0, 0].item() == expected and p[1, 0].item() == 0.0


@pytest.mark.parametrize("name", ["AdagradOptimizer", "FtrlOptimizer"])
def test_rows_of_one_number_take_tfs_scalar_branch(name):
    """TF's sparse Adagrad and Ftrl compute a vector of scalars with other groupings
    (``lr * g / sqrt(a)``; pow and ``(linear + g) - sigma * var``): close to, not always
    equal to, the dense kernel."""
    init = torch.randn(ROWS, generator=torch.Generator().manual_seed(4)) * 3
    steps = batches(5, cols=0)
    sparse, _ = sparse_run(name, {"learning_rate": 0.3}, init, steps)
    dense, _ = per_row_run(
        name,
        {"learning_rate": 0.3},
        init[:, None],
        [(idx, values[:, None]) for idx, values in steps],
    )
    torch.testing.assert_close(sparse, dense[:, 0], rtol=1e-5, atol=1e-6)


def test_two_sparse_dims_name_elements():
    init = torch.randn(3, 4)
    p = nn.Parameter(init.clone())
    opt = po.MomentumOptimizer([p], 0.1, 0.9)
    idx = torch.tensor([[0, 2, 2], [1, 3, 3]])
    p.grad = torch.sparse_coo_tensor(idx, torch.tensor([1.0, 2.0, 3.0]), (3, 4))
    opt.step()
    expected = init.clone()
    expected[0, 1] -= torch.tensor(1.0) * np.float32(0.1)
    expected[2, 3] -= torch.tensor(5.0) * np.float32(0.1)
    assert torch.equal(p.detach(), expected)


def test_embedding_and_linear_in_one_optimizer_through_minimize():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, sparse=True), nn.Flatten(), nn.Linear(18, 1))
    weights = model[0].weight.detach().clone()
    opt = polyak.Optimizer(po.AdamOptimizer(model.parameters(), 0.01))
    step = polyak.GlobalStep()
    ids = torch.tensor([[1, 2, 2], [5, 1, 7]])
    for _ in range(3):
        opt.minimize(model(ids).square().mean(), global_step=step)
    assert step.value == 3
    assert model[0].weight.grad is None or model[0].weight.grad.is_sparse
    assert not torch.equal(model[0].weight.detach(), weights)
    assert torch.isfinite(model[0].weight).all()


def test_sparse_gradient_on_a_non_contiguous_parameter_is_refused():
    base = torch.zeros(4, 6)
    p = nn.Parameter(base.t())  # (6, 4), not contiguous
    opt = po.AdagradOptimizer([p], 0.1)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, 4), p.shape)
    with pytest.raises(ValueError, match="not contiguous"):
        opt.step()
    assert not opt.state[p]
