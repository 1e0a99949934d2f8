"""ExponentialMovingAverage with PyTorch modules: buffers, wrappers, swapping, dtypes, devices."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from polyak import ExponentialMovingAverage

EMA = ExponentialMovingAverage


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def perturb(model: nn.Module, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


class DDPLike(nn.Module):
    """What DistributedDataParallel looks like to named_parameters(): a `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


# --------------------------------------------------------------------------- buffers


class TestBuffers:
    def test_batchnorm_average(self):
        model = bn_model()
        ema = EMA(0.5)
        ema.track(model)
        mean0 = model[1].running_mean.clone()
        var0 = model[1].running_var.clone()
        model.train()
        model(torch.randn(8, 4))
        model(torch.randn(8, 4))
        assert int(model[1].num_batches_tracked) == 2
        ema.update()
        torch.testing.assert_close(
            ema.average("1.running_mean"), 0.5 * mean0 + 0.5 * model[1].running_mean
        )
        torch.testing.assert_close(
            ema.average("1.running_var"), 0.5 * var0 + 0.5 * model[1].running_var
        )
        nbt = ema.average("1.num_batches_tracked")
        assert nbt.dtype == torch.int64
        assert torch.equal(nbt, torch.tensor(2))

    def test_batchnorm_copy(self):
        model = bn_model()
        ema = EMA(0.5, buffers="copy")
        ema.track(model)
        w0 = model[0].weight.detach().clone()
        model.train()
        model(torch.randn(8, 4))
        perturb(model)
        ema.update()
        assert torch.equal(ema.average("1.running_mean"), model[1].running_mean)
        assert torch.equal(ema.average("1.running_var"), model[1].running_var)
        assert torch.equal(ema.average("1.num_batches_tracked"), torch.tensor(1))
        torch.testing.assert_close(ema.average("0.weight"), 0.5 * w0 + 0.5 * model[0].weight)

    def test_batchnorm_ignore(self):
        model = bn_model()
        ema = EMA(0.5, buffers="ignore")
        ema.apply(model)
        assert ema.average("1.running_mean") is None
        assert ema.average("1.num_batches_tracked") is None
        assert set(ema.state_dict()["averages"]) == {n for n, _ in model.named_parameters()}

    def test_non_persistent_buffers_skipped(self):
        model = nn.Linear(2, 2)
        model.register_buffer("cache", torch.zeros(2), persistent=False)
        model.register_buffer("state", torch.ones(2))
        ema = EMA(0.5)
        ema.apply(model)
        assert ema.average("cache") is None
        assert torch.equal(ema.average("state"), torch.ones(2))

    def test_tied_parameters_tracked_once(self):
        a = nn.Linear(3, 3, bias=False)
        model = nn.Sequential(a, a)
        ema = EMA(0.5)
        ema.apply(model)
        assert list(ema.state_dict()["averages"]) == ["0.weight"]


# --------------------------------------------------------------------------- wrappers


class TestWrapperPrefixes:
    @pytest.mark.filterwarnings("ignore::DeprecationWarning")
    @pytest.mark.parametrize("wrap", ["ddp", "compile", "ddp+compile"])
    def test_names_and_round_trip(self, wrap):
        bare = bn_model()
        inner = copy.deepcopy(bare)
        wrapped = {
            "ddp": lambda m: DDPLike(m),
            "compile": lambda m: torch.compile(m),
            "ddp+compile": lambda m: DDPLike(torch.compile(m)),
        }[wrap](inner)
        names = list(wrapped.state_dict())
        assert all(n.startswith(("module.", "_orig_mod.")) for n in names)

        ema_w = EMA(0.5)
        ema_w.apply(wrapped)
        perturb(inner, 1.0)
        ema_w.update()
        assert set(ema_w.state_dict()["averages"]) == set(bare.state_dict())
        assert ema_w.average_name(inner[0].weight) == "0.weight/ExponentialMovingAverage"

        ema_b = EMA(0.5)
        ema_b.track(bare)
        ema_b.load_state_dict(copy.deepcopy(ema_w.state_dict()))
        for name, shadow in ema_w.state_dict()["averages"].items():
            assert torch.equal(ema_b.average(name), shadow)
        assert ema_b.step == ema_w.step

        # and back: bare -> wrapped
        perturb(bare, 2.0)
        ema_b.update()
        ema_w2 = EMA(0.5)
        ema_w2.track(wrapped)
        ema_w2.load_state_dict(ema_b.state_dict())
        for name, shadow in ema_b.state_dict()["averages"].items():
            assert torch.equal(ema_w2.average(name), shadow)

    def test_copy_to_wrapped_model(self):
        bare = bn_model()
        ema = EMA(0.0)
        ema.apply(bare)
        target = DDPLike(bn_model(seed=1))
        ema.copy_to(target)
        for (n, a), (_, b) in zip(bare.state_dict().items(), target.module.state_dict().items()):
            assert torch.equal(a, b), n


# --------------------------------------------------------------------------- swapping


class TestSwapping:
    def setup_ema(self, device):
        model = bn_model().to(device)
        ema = EMA(0.5)
        ema.apply(model)
        perturb(model)
        model.train()
        model(torch.randn(5, 4, device=device))
        ema.update()
        return model, ema

    def test_copy_to_module(self, device):
        model, ema = self.setup_ema(device)
        shadows = {n: ema.average(n).clone() for n in model.state_dict()}
        assert any(not torch.equal(shadows[n], t) for n, t in model.state_dict().items())
        ema.copy_to(model)
        for n, t in model.state_dict().items():
            assert torch.equal(t, shadows[n]), n

    def test_copy_to_tensors_and_mapping(self):
        a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.ones(3))
        ema = EMA(0.5)
        ema.apply([a, b])
        with torch.no_grad():
            a.fill_(4.0)
            b.fill_(3.0)
        ema.update()  # a: 2, b: 2
        ema.copy_to([a])
        assert torch.equal(a, torch.full((2,), 2.0))
        assert torch.equal(b, torch.full((3,), 3.0))
        out = {"Variable": torch.zeros(2), "Variable_1": torch.zeros(3)}
        ema.copy_to(out)
        assert torch.equal(out["Variable_1"], torch.full((3,), 2.0))

    def test_average_parameters_swaps_and_restores(self, device):
        model, ema = self.setup_ema(device)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        ptrs = {n: t.data_ptr() for n, t in model.state_dict().items()}
        with ema.average_parameters(model) as m:
            assert m is model
            for n, t in model.state_dict().items():
                assert torch.equal(t, ema.average(n)), n
        for n, t in model.state_dict().items():
            assert torch.equal(t, before[n]), n
            assert t.data_ptr() == ptrs[n]

    def test_average_parameters_restores_on_exception(self, device):
        model, ema = self.setup_ema(device)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        with pytest.raises(RuntimeError, match="boom"), ema.average_parameters(model):
            raise RuntimeError("boom")
        for n, t in model.state_dict().items():
            assert torch.equal(t, before[n]), n

    def test_average_module_shares_shadows(self, device):
        model, ema = self.setup_ema(device)
        avg = ema.average_module(model)
        assert avg is not model
        for n, p in avg.named_parameters():
            assert p.data_ptr() == ema.average(n).data_ptr(), n
            assert not p.requires_grad
            assert p is not dict(model.named_parameters())[n]
        for n, b in avg.named_buffers():
            assert b.data_ptr() == ema.average(n).data_ptr(), n
        # no extra parameter memory: every parameter lives inside a shadow storage
        shadow_storages = {ema.average(n).untyped_storage().data_ptr() for n in model.state_dict()}
        for p in avg.parameters():
            assert p.untyped_storage().data_ptr() in shadow_storages
        avg.eval()
        x = torch.randn(3, 4, device=device)
        out0 = avg(x).clone()
        perturb(model, 5.0)
        ema.update()
        out1 = avg(x)
        assert not torch.allclose(out0, out1)
        reference = copy.deepcopy(model).eval()
        with torch.no_grad():
            for n, t in reference.state_dict().items():
                t.copy_(ema.average(n))
        torch.testing.assert_close(out1, reference(x))
        # the online model is unchanged by the average module
        assert not any(
            p.data_ptr() == q.data_ptr() for p, q in zip(avg.parameters(), model.parameters())
        )


# --------------------------------------------------------------------------- dtypes, devices


class TestDtypeDevice:
    def test_to_float64_keeps_values_and_keeps_working(self):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(6))
        ema = EMA(0.75, zero_debias=True)
        ema.apply({"w": w, "stat": torch.ones(2)})
        ref = w.detach().double().clone()
        before = ema.average("w").clone()
        ema.to(dtype=torch.float64)
        assert ema.average("w").dtype == torch.float64
        assert torch.equal(ema.average("w"), before.double())
        assert ema.state_dict()["values"]["stat"]["biased"].dtype == torch.float64
        for _ in range(3):
            with torch.no_grad():
                w.add_(torch.randn_like(w))
            ema.update()
            ref = 0.75 * ref + 0.25 * w.detach().double()
        torch.testing.assert_close(ema.average("w"), ref, rtol=1e-12, atol=1e-12)
        # biased 0.25 -> 0.25 - (0.25 - 3) * 0.25 = 0.9375; factor 1 - 0.75**2 = 0.4375
        ema.apply({"stat": torch.full((2,), 3.0)})
        assert ema.average("stat").dtype == torch.float64
        torch.testing.assert_close(
            ema.average("stat"), torch.full((2,), 15 / 7, dtype=torch.float64), rtol=1e-15, atol=0
        )

    def test_to_device(self, device):
        model = nn.Linear(3, 2)
        ema = EMA(0.5)
        ema.apply(model)
        ema.to(device=device)
        for n, _ in model.named_parameters():
            assert ema.average(n).device.type == device.type
        model.to(device)
        perturb(model)
        ema.update()
        for n, p in model.named_parameters():
            assert ema.average(n).device.type == device.type
            assert not torch.equal(ema.average(n), p.detach())

    def test_shadows_on_cpu(self, device):
        model = nn.Linear(3, 2).to(device)
        ema = EMA(0.5, device="cpu")
        ema.apply(model)
        start = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        perturb(model)
        ema.update()
        for n, p in model.named_parameters():
            assert ema.average(n).device.type == "cpu"
            torch.testing.assert_close(ema.average(n), 0.5 * start[n] + 0.5 * p.detach().cpu())

    def test_bf16_model_float32_shadows(self, device):
        decay, steps = 0.9999, 1000
        bf = nn.Parameter(torch.ones(4, dtype=torch.bfloat16, device=device))
        stalled = EMA(decay)
        tracking = EMA(decay, shadow_dtype=torch.float32)
        stalled.apply([bf])
        tracking.apply([bf])
        assert stalled.average(bf).dtype == torch.bfloat16
        assert tracking.average(bf).dtype == torch.float32
        with torch.no_grad():
            bf.fill_(1.5)  # representable in bf16
        ref = torch.ones(4, dtype=torch.float64)
        for _ in range(steps):
            stalled.update()
            tracking.update()
            ref = decay * ref + (1 - decay) * 1.5
        # 1e-4 * 0.5 per step is far below bf16's spacing at 1.0 (2**-7): bf16 never moves
        assert torch.equal(stalled.average(bf).cpu(), torch.ones(4, dtype=torch.bfloat16))
        assert float(ref[0]) > 1.04
        torch.testing.assert_close(
            tracking.average(bf).double().cpu(), ref, rtol=0, atol=2e-5
        )

    def test_shadow_dtype_copy_steps_and_swaps(self):
        bf = nn.Parameter(torch.full((3,), 2.0, dtype=torch.bfloat16))
        ema = EMA(0.5, shadow_dtype=torch.float32, update_after=1)
        ema.apply([bf])  # copy step, across dtypes
        assert torch.equal(ema.average(bf), torch.full((3,), 2.0))
        with torch.no_grad():
            bf.fill_(4.0)
        ema.update()
        assert torch.equal(ema.average(bf), torch.full((3,), 3.0))
        with ema.average_parameters([bf]):
            assert torch.equal(bf, torch.full((3,), 3.0, dtype=torch.bfloat16))
        assert torch.equal(bf, torch.full((3,), 4.0, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- host sync


class TestNoHostSync:
    def test_update_with_tensor_num_updates_never_reads_a_tensor_on_host(self, monkeypatch):
        model = nn.Linear(4, 4)
        n = torch.tensor(3)
        ema = EMA(0.999, num_updates=n, zero_debias=True)
        ema.apply(model)
        ema.apply({"loss": torch.tensor(1.0)})

        def forbidden(*args, **kwargs):
            raise AssertionError("host read of a tensor during update()")

        for attr in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
            monkeypatch.setattr(torch.Tensor, attr, forbidden)
        perturb(model)
        ema.update()
        ema.apply({"loss": torch.tensor(2.0)})
        n.add_(1)
        ema.update()
        monkeypatch.undo()
        assert ema.step == 5

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs cuda")
    def test_cuda_sync_debug_mode(self):
        model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).cuda()
        n = torch.tensor(0, device="cuda")
        ema = EMA(0.999, num_updates=n, zero_debias=True, shadow_dtype=torch.float32)
        ema.apply(model)
        ema.apply({"loss": torch.tensor(1.0, device="cuda")})
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                ema.update()
                ema.apply({"loss": torch.tensor(1.0, device="cuda")})
                n.add_(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
