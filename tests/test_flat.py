"""flatten_parameters_, pack and coalesce: contiguous buffers that keep PyTorch working."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from polyak import ExponentialMovingAverage, flatten_parameters_
from polyak.flat import coalesce, pack


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 2))


def same_grads(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))


def spans(tensors: list[torch.Tensor]) -> int:
    return len(coalesce(tensors)[0])


def assert_one_buffer(tensors: list[torch.Tensor]) -> None:
    """The tensors sit back to back, in order, in one storage."""
    storage = tensors[0].untyped_storage().data_ptr()
    offset = tensors[0].data_ptr()
    for t in tensors:
        assert t.untyped_storage().data_ptr() == storage
        assert t.data_ptr() == offset
        assert t.is_contiguous()
        offset += t.numel() * t.element_size()


# --------------------------------------------------------------------------- flatten_parameters_


class TestFlatten:
    def test_keeps_identity_values_and_is_contiguous(self, device):
        model = mlp().to(device)
        before = list(model.parameters())
        values = [p.detach().clone() for p in before]
        assert spans(before) == len(before)
        assert flatten_parameters_(model) is model
        after = list(model.parameters())
        assert all(a is b for a, b in zip(before, after))
        assert all(torch.equal(p, v) for p, v in zip(after, values))
        assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in after)
        assert_one_buffer(after)
        assert spans(after) == 1

    def test_one_buffer_per_dtype(self):
        model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3).double(), nn.Linear(3, 1))
        flatten_parameters_(model)
        floats = [p for p in model.parameters() if p.dtype == torch.float32]
        doubles = [p for p in model.parameters() if p.dtype == torch.float64]
        assert_one_buffer(floats)
        assert_one_buffer(doubles)
        x = torch.randn(4, 2)
        model[0].float()
        out = model[2](model[1](model[0](x).double()).float())
        assert out.shape == (4, 1)

    def test_state_dict_and_load(self):
        model = flatten_parameters_(mlp())
        ptrs = [p.data_ptr() for p in model.parameters()]
        reference = mlp()
        assert list(model.state_dict()) == list(reference.state_dict())
        for (n, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(a, b), n
        other = mlp(seed=5)
        model.load_state_dict(other.state_dict())
        for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), n
        assert [p.data_ptr() for p in model.parameters()] == ptrs

    def test_deepcopy(self):
        model = flatten_parameters_(mlp())
        clone = copy.deepcopy(model)
        for p, q in zip(model.parameters(), clone.parameters()):
            assert torch.equal(p, q)
            assert p.data_ptr() != q.data_ptr()
        with torch.no_grad():
            next(clone.parameters()).add_(1.0)
        assert not torch.equal(next(clone.parameters()), next(model.parameters()))
        x = torch.randn(3, 5)
        clone(x).sum().backward()
        assert all(p.grad is not None for p in clone.parameters())
        assert all(p.grad is None for p in model.parameters())
        flatten_parameters_(clone)
        assert_one_buffer(list(clone.parameters()))

    @pytest.mark.parametrize(
        "make_opt",
        [
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
            lambda ps: torch.optim.Adam(ps, lr=1e-2),
            lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
        ],
    )
    @pytest.mark.parametrize("set_to_none", [True, False])
    def test_optimizer_built_before_flattening_trains_identically(self, make_opt, set_to_none):
        flat, plain = mlp(), mlp()
        opt_flat, opt_plain = make_opt(flat.parameters()), make_opt(plain.parameters())
        flatten_parameters_(flat)
        torch.manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(8, 5), torch.randn(8, 2)
            for model, opt in ((flat, opt_flat), (plain, opt_plain)):
                opt.zero_grad(set_to_none=set_to_none)
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            grads = [p.grad for p in flat.parameters()]
            assert_one_buffer(grads)
        for p, q in zip(flat.parameters(), plain.parameters()):
            assert torch.equal(p, q)
            assert torch.equal(p.grad, q.grad)
        assert_one_buffer(list(flat.parameters()))

    def test_weights_only_leaves_gradients_to_autograd(self):
        model = flatten_parameters_(mlp())  # slots first: grads=False must remove them
        model[0].bias.requires_grad_(False)  # frozen ones' slots too
        flatten_parameters_(model, grads=False)
        model[0].bias.requires_grad_(True)
        twin = mlp()
        assert_one_buffer(list(model.parameters()))
        x = torch.randn(4, 5)
        for _ in range(2):  # set_to_none zero_grad, then accumulation, as plain torch
            model(x).sum().backward()
            twin(x).sum().backward()
            grads = [p.grad for p in model.parameters()]
            assert len({g.untyped_storage().data_ptr() for g in grads}) == len(grads)
            assert all(g.untyped_storage().nbytes() == g.nbytes for g in grads)  # own storage
            assert same_grads(model, twin)
        flatten_parameters_(model)  # and back: the slots return
        model.zero_grad()
        model(x).sum().backward()
        assert_one_buffer([p.grad for p in model.parameters()])

    def test_gradients_land_in_flat_buffer(self):
        model = flatten_parameters_(mlp())
        twin = mlp()
        x = torch.randn(4, 5)
        model(x).sum().backward()
        twin(x).sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert_one_buffer(grads)
        home = grads[0].data_ptr()
        assert same_grads(model, twin)
        # accumulation in place
        model(x).sum().backward()
        twin(x).sum().backward()
        assert same_grads(model, twin)
        assert next(model.parameters()).grad.data_ptr() == home
        # zero_grad() sets to None; the next gradient lands in the buffer again
        for m in (model, twin):
            m.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        model(2 * x).sum().backward()
        twin(2 * x).sum().backward()
        assert_one_buffer([p.grad for p in model.parameters()])
        assert next(model.parameters()).grad.data_ptr() == home
        assert same_grads(model, twin)
        # zero_grad(set_to_none=False) zeroes in place
        for m in (model, twin):
            m.zero_grad(set_to_none=False)
        assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
        model(x).sum().backward()
        twin(x).sum().backward()
        assert next(model.parameters()).grad.data_ptr() == home
        assert same_grads(model, twin)

    def test_existing_gradients_move_in(self):
        model, twin = mlp(), mlp()
        x = torch.randn(4, 5)
        model(x).sum().backward()
        twin(x).sum().backward()
        flatten_parameters_(model)
        assert_one_buffer([p.grad for p in model.parameters()])
        assert same_grads(model, twin)

    def test_frozen_parameters_get_no_gradient(self):
        model = mlp()
        model[0].weight.requires_grad_(False)
        flatten_parameters_(model)
        model(torch.randn(2, 5)).sum().backward()
        assert model[0].weight.grad is None
        assert_one_buffer([p.grad for p in model.parameters() if p.requires_grad])
        assert_one_buffer(list(model.parameters()))

    @pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
    def test_create_graph_keeps_double_backward(self):
        model, twin = flatten_parameters_(mlp()), mlp()
        x = torch.randn(4, 5)
        for m in (model, twin):
            m(x).pow(2).sum().backward(create_graph=True)
        assert all(q.grad.requires_grad for q in twin.parameters())
        assert all(p.grad.requires_grad for p in model.parameters())
        penalties = []
        for m in (model, twin):
            penalty = sum(p.grad.pow(2).sum() for p in m.parameters())
            grads = torch.autograd.grad(penalty, list(m.parameters()))
            penalties.append(grads)
        for a, b in zip(*penalties):
            torch.testing.assert_close(a, b)

    def test_to_and_data_assignment_leave_buffer_then_reflatten(self):
        model = flatten_parameters_(mlp())
        model[0].weight.data = model[0].weight.data.clone()
        assert spans(list(model.parameters())) > 1
        model.to(torch.float64)
        assert spans(list(model.parameters())) == len(list(model.parameters()))
        values = [p.detach().clone() for p in model.parameters()]
        flatten_parameters_(model)
        assert_one_buffer(list(model.parameters()))
        assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))
        model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
        assert_one_buffer([p.grad for p in model.parameters()])


# --------------------------------------------------------------------------- EMA on flat models


def perturb_twins(a: nn.Module, b: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            r = torch.randn_like(p)
            p.add_(r)
            q.add_(r)


class TestEmaOnFlat:
    @pytest.mark.parametrize("decay", [0.9, 0.3, 0.999])
    def test_bitwise_equal_to_unflattened(self, decay):
        def big(seed: int = 0) -> nn.Module:
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(37, 53), nn.Linear(53, 129), nn.Linear(129, 3))

        flat, plain = flatten_parameters_(big()), big()
        ea, eb = ExponentialMovingAverage(decay), ExponentialMovingAverage(decay)
        ea.apply(flat)
        eb.apply(plain)
        for i in range(4):
            perturb_twins(flat, plain, i)
            ea.update()
            eb.update()
        assert spans([ea.average(n) for n, _ in flat.named_parameters()]) == 1
        for n, _ in plain.named_parameters():
            assert torch.equal(ea.average(n), eb.average(n)), n

    def test_tracked_before_flattening(self):
        flat, plain = mlp(), mlp()
        ea, eb = ExponentialMovingAverage(0.75), ExponentialMovingAverage(0.75)
        ea.apply(flat)
        eb.apply(plain)
        perturb_twins(flat, plain, 0)
        ea.update()
        eb.update()
        flatten_parameters_(flat)  # every pointer changes under the EMA
        for i in range(1, 3):
            perturb_twins(flat, plain, i)
            ea.update()
            eb.update()
        for n, _ in plain.named_parameters():
            assert torch.equal(ea.average(n), eb.average(n)), n

    def test_data_assignment_falls_back(self):
        flat, plain = flatten_parameters_(mlp()), mlp()
        ea, eb = ExponentialMovingAverage(0.75), ExponentialMovingAverage(0.75)
        ea.apply(flat)
        eb.apply(plain)
        perturb_twins(flat, plain, 0)
        ea.update()
        eb.update()
        flat[2].weight.data = flat[2].weight.data.clone()  # out of the buffer
        perturb_twins(flat, plain, 1)
        ea.update()
        eb.update()
        prev = ea.average("2.weight").double().clone()
        flat[2].weight.data = torch.full_like(flat[2].weight, 3.0)
        plain[2].weight.data = torch.full_like(plain[2].weight, 3.0)
        ea.update()
        eb.update()
        for n, _ in plain.named_parameters():
            assert torch.equal(ea.average(n), eb.average(n)), n
        torch.testing.assert_close(ea.average("2.weight").double(), 0.75 * prev + 0.25 * 3.0)

    def test_model_to_float64_after_flattening(self):
        flat = flatten_parameters_(mlp())
        tracked = ExponentialMovingAverage(0.5)
        tracked.apply(flat)
        flat.to(torch.float64)
        with pytest.raises(ValueError, match="float64"):
            tracked.update()
        plain = mlp().to(torch.float64)
        ea, eb = ExponentialMovingAverage(0.5), ExponentialMovingAverage(0.5)
        ea.apply(flat)
        eb.apply(plain)
        start = {n: p.detach().clone() for n, p in plain.named_parameters()}
        perturb_twins(flat, plain, 3)
        ea.update()
        eb.update()
        for n, p in plain.named_parameters():
            assert torch.equal(ea.average(n), eb.average(n))
            torch.testing.assert_close(ea.average(n), 0.5 * start[n] + 0.5 * p.detach())


# --------------------------------------------------------------------------- pack


def test_pack_views_one_buffer_per_device_dtype():
    specs = [
        (torch.Size([2, 3]), torch.float32, torch.device("cpu")),
        (torch.Size([4]), torch.float64, torch.device("cpu")),
        (torch.Size([]), torch.float32, torch.device("cpu")),
        (torch.Size([0]), torch.float32, torch.device("cpu")),
        (torch.Size([5]), torch.float64, torch.device("cpu")),
    ]
    views = pack(specs, zeros=True)
    assert [v.shape for v in views] == [s[0] for s in specs]
    assert [v.dtype for v in views] == [s[1] for s in specs]
    assert all(torch.count_nonzero(v) == 0 for v in views)
    # (an empty view reports data_ptr() == 0, so it is left out of the adjacency check)
    assert_one_buffer([v for v in views if v.dtype == torch.float32 and v.numel()])
    assert_one_buffer([v for v in views if v.dtype == torch.float64])
    assert views[0].untyped_storage().nbytes() == 7 * 4
    assert views[1].untyped_storage().nbytes() == 9 * 8


# --------------------------------------------------------------------------- coalesce


class TestCoalesce:
    def test_merges_adjacent_and_aliases(self):
        buf = torch.arange(10.0)
        parts = [buf[0:3], buf[3:4].view(()), buf[4:8].view(2, 2), buf[8:10]]
        (merged,) = coalesce(parts)
        assert len(merged) == 1
        assert merged[0].shape == (10,)
        assert merged[0].data_ptr() == buf.data_ptr()
        merged[0].add_(1.0)
        assert torch.equal(parts[2], torch.tensor([[5.0, 6.0], [7.0, 8.0]]))

    def test_never_merges_non_adjacent(self):
        buf = torch.arange(10.0)
        parts = [buf[0:2], buf[3:5], buf[5:7], buf[9:10]]
        (merged,) = coalesce(parts)
        assert [m.tolist() for m in merged] == [[0.0, 1.0], [3.0, 4.0, 5.0, 6.0], [9.0]]

    def test_out_of_order_not_merged(self):
        buf = torch.arange(6.0)
        (merged,) = coalesce([buf[2:4], buf[0:2], buf[4:6]])
        assert len(merged) == 3

    def test_never_merges_different_storages(self):
        array = np.arange(8, dtype=np.float32)
        a = torch.from_numpy(array[:4])
        b = torch.from_numpy(array[4:])  # adjacent address, separate storage object
        assert a.data_ptr() + 16 == b.data_ptr()
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        (merged,) = coalesce([a, b])
        assert len(merged) == 2
        assert merged[0] is a and merged[1] is b

    def test_never_merges_different_dtypes(self):
        raw = torch.zeros(16, dtype=torch.uint8)
        a = raw[:8].view(torch.float32)
        b = raw[8:].view(torch.int32)
        assert a.data_ptr() + 8 == b.data_ptr()
        (merged,) = coalesce([a, b])
        assert len(merged) == 2

    def test_non_contiguous_not_merged(self):
        buf = torch.arange(12.0)
        a = buf[0:4]
        b = buf[4:12].view(2, 4).t()  # starts right after a, but transposed
        (merged,) = coalesce([a, b])
        assert len(merged) == 2
        assert merged[1] is b

    def test_parallel_lists_merge_only_where_all_adjacent(self):
        x = torch.arange(6.0)
        y = torch.arange(6.0) * 10
        xs = [x[0:2], x[2:4], x[4:6]]
        ys = [y[0:2], torch.tensor([20.0, 30.0]), y[4:6]]
        mx, my = coalesce(xs, ys)
        assert len(mx) == len(my) == 3
        xs2 = [x[0:2], x[2:4], x[4:6]]
        ys2 = [y[0:2], y[2:4], torch.tensor([40.0, 50.0])]
        mx, my = coalesce(xs2, ys2)
        assert [t.numel() for t in mx] == [4, 2] and [t.numel() for t in my] == [4, 2]

    def test_empty_tensors_pass_through(self):
        buf = torch.arange(4.0)
        parts = [buf[0:2], buf[2:2], buf[2:4], torch.empty(0)]
        merged = coalesce(parts)[0]
        assert torch.equal(torch.cat([m.reshape(-1) for m in merged]), buf)

    def test_lengths_must_match(self):
        with pytest.raises(ValueError, match="parallel"):
            coalesce([torch.zeros(1)], [])

    @settings(max_examples=40, deadline=None)
    @given(
        sizes=st.lists(st.integers(1, 5), min_size=1, max_size=8),
        keep=st.lists(st.booleans(), min_size=8, max_size=8),
    )
    def test_property_covers_same_memory(self, sizes, keep):
        total = sum(sizes)
        buf = torch.arange(float(total))
        parts, offset = [], 0
        for size, k in zip(sizes, keep):
            if k:
                parts.append(buf[offset : offset + size])
            offset += size
        if not parts:
            return
        (merged,) = coalesce(parts)
        # same elements, same order
        flat = torch.cat([t.reshape(-1) for t in parts])
        assert torch.equal(torch.cat([m.reshape(-1) for m in merged]), flat)
        # number of spans: the maximal runs of adjacent parts
        expected_runs, prev_end = 0, None
        for t in parts:
            start = t.storage_offset()
            if prev_end is None or start != prev_end:
                expected_runs += 1
            prev_end = start + t.numel()
        assert len(merged) == expected_runs
        # aliasing: writing through the spans writes the parts
        for m in merged:
            m.mul_(-1)
        assert torch.equal(torch.cat([t.reshape(-1) for t in parts]), -flat)
