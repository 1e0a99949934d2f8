"""Several averages of the same weights in one pass: FanOutLerp against one lerp_ per average,
and EMAGroup against the same ExponentialMovingAverages updated one by one (bit for bit, state
dicts included)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import polyak
from polyak import ExponentialMovingAverage, GlobalStep, schedules
from polyak import _torch_compat as torch_compat
from polyak.averaging import EMAGroup, multi
from polyak.averaging.multi import FanOutLerp

pytestmark = pytest.mark.numerics  # expected bits: run again with AVX-512 off


@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise comparisons: one thread, so that each lerp_ runs one SIMD loop whatever its
    length (chunking then provably keeps every element's arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensors(shapes, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


SHAPES = [(7, 300), (300,), (5000,), (3, 1), ()]


@pytest.fixture(params=["per chunk", "one call"])
def dispatch(request, monkeypatch):
    """Both ways FanOutLerp issues its chunks: K foreach calls per chunk (the CPU's way) and
    one foreach call for all chunks (accelerators'), whatever the device at hand."""
    monkeypatch.setattr(multi, "_PER_CHUNK", {"cpu"} if request.param == "per chunk" else set())
    return request.param


@pytest.mark.parametrize("chunk_bytes", [None, 4096, 1 << 16])
@pytest.mark.parametrize("flat", [False, True])
def test_fan_out_equals_one_lerp_per_average(chunk_bytes, flat, device, dispatch):
    sources = tensors(SHAPES, seed=1, device=device)
    if flat:  # back to back in one buffer: coalesced into one span, then chunked
        buf = torch.cat([s.reshape(-1) for s in sources])
        views, offset = [], 0
        for s in sources:
            views.append(buf[offset : offset + s.numel()].view(s.shape))
            offset += s.numel()
        sources = views
    shadows = [tensors(SHAPES, seed=10 + k, device=device) for k in range(3)]
    expected = [[s.clone() for s in row] for row in shadows]
    weights = [0.1, 0.001, 0.73]
    fan = FanOutLerp(sources, shadows, chunk_bytes=chunk_bytes)
    fan(weights)
    for row, w in zip(expected, weights):
        for s, v in zip(row, sources):
            s.lerp_(v, w)
    for got_row, want_row in zip(shadows, expected):
        for got, want in zip(got_row, want_row):
            assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=12),
    flat=st.lists(st.booleans(), min_size=12, max_size=12),
    weights=st.lists(
        st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.5, 1.0])), min_size=1, max_size=4
    ),
    chunk_bytes=st.sampled_from([None, 4096, 1 << 15, 1 << 16]),
    one_call=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fan_out_property(sizes, flat, weights, chunk_bytes, one_call, seed):
    """Any mix of tensors back to back in one buffer (``flat[i]``: tensor ``i`` follows
    tensor ``i - 1``) or apart, any chunk size, K = 1 to 4 weights in [0, 1], both dispatches:
    the bits of one ``lerp_`` (or, at weight 1, ``copy_``) per average and tensor."""
    values = tensors([(n,) for n in sizes], seed=seed)
    buffer = torch.cat([v for v in values])
    sources, offset = [], 0
    for v, joined in zip(values, flat):
        sources.append(buffer[offset : offset + v.numel()] if joined else v.clone())
        offset += v.numel()
    shadows = [tensors([(n,) for n in sizes], seed=seed + 1 + k) for k in range(len(weights))]
    expected = [
        [s.clone().copy_(v) if w == 1.0 else s.clone().lerp_(v, w) for s, v in zip(row, sources)]
        for row, w in zip(shadows, weights)
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multi, "_PER_CHUNK", set() if one_call else {"cpu"})
        FanOutLerp(sources, shadows, chunk_bytes=chunk_bytes)(weights)
    for got_row, want_row in zip(shadows, expected):
        for got, want in zip(got_row, want_row):
            assert torch.equal(got, want)


def test_small_tensors_share_chunks_and_calls(monkeypatch):
    """On the CPU a step is K foreach calls per chunk, however many tensors fill it, and the
    K averages take a chunk one after another: 600 separate tensors of 1000 floats fill three
    1 MiB chunks (262 144 floats at most each), so K = 3 takes 9 calls, not 1800."""
    calls = []
    lerp = torch_compat.foreach_lerp_

    def counting(shadows, sources, weight):
        calls.append((len(shadows), weight))
        return lerp(shadows, sources, weight)

    sources = tensors([(1000,)] * 600, seed=3)
    shadows = [tensors([(1000,)] * 600, seed=4 + k) for k in range(3)]
    fan = FanOutLerp(sources, shadows, chunk_bytes=1 << 20)
    monkeypatch.setattr(torch_compat, "foreach_lerp_", counting)
    fan([0.1, 0.2, 0.3])
    assert calls == [(n, w) for n in (262, 262, 76) for w in (0.1, 0.2, 0.3)]


def test_fan_out_casts_low_precision_weights_chunk_by_chunk():
    sources = tensors(SHAPES, dtype=torch.bfloat16, seed=1)
    shadows = [tensors(SHAPES, seed=10 + k) for k in range(2)]
    expected = [[s.clone() for s in row] for row in shadows]
    FanOutLerp(sources, shadows, chunk_bytes=4096)([0.25, 0.5])
    for row, w, got_row in zip(expected, [0.25, 0.5], shadows):
        for s, v, got in zip(row, sources, got_row):
            assert torch.equal(got, s.lerp_(v.float(), w))


def test_fan_out_weight_one_copies_and_zero_keeps():
    source = torch.tensor([1.0, float("inf"), -float("inf"), 3.0])
    a, b, c = torch.zeros(4), torch.ones(4), torch.full((4,), 5.0)
    FanOutLerp([source], [[a], [b], [c]])([1.0, 0.0, 0.5])
    assert torch.equal(a, source)  # a lerp by 1 would give NaN where the source is infinite
    assert torch.equal(b[[0, 3]], torch.ones(2))
    assert c[0] == 3.0 and c[3] == 4.0


def test_fan_out_rejects_mismatches():
    src = [torch.zeros(3)]
    with pytest.raises(ValueError, match="shape"):
        FanOutLerp(src, [[torch.zeros(4)]])
    with pytest.raises(ValueError, match="differ in dtype or device"):
        FanOutLerp(src, [[torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)]])
    with pytest.raises(ValueError, match="has 2 tensors for 1 sources"):
        FanOutLerp(src, [[torch.zeros(3), torch.zeros(3)]])
    with pytest.raises(ValueError, match="2 weights for 1 averages"):
        FanOutLerp(src, [[torch.zeros(3)]])([0.1, 0.2])


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 600), nn.BatchNorm1d(600), nn.Linear(600, 5))


def move(model, gen, step):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        model[1].running_mean.add_(0.5)
        model[1].num_batches_tracked.add_(1)


CONFIGS = {
    "constant": lambda s: {"decay": 0.9},
    "warmup schedule, update_every": lambda s: {
        "decay": schedules.warmup(0.999),
        "update_every": 3,
    },
    "karras, update_after": lambda s: {"decay": schedules.karras(0.1), "update_after": 4},
    "exact_tf": lambda s: {"decay": 0.95, "exact_tf": True},
    "num_updates GlobalStep": lambda s: {"decay": 0.99, "num_updates": s},
    "num_updates tensor": lambda s: {"decay": 0.99, "num_updates": torch.tensor(7)},
    "fp64 shadows": lambda s: {"decay": 0.8, "shadow_dtype": torch.float64},
    "decay 0 then 1": lambda s: {"decay": lambda t: 0.0 if t % 2 else 1.0},
}


def test_group_equals_separate_emas_bitwise_with_state_dicts():
    results = {}
    for grouped in (False, True):
        model = net()
        step = GlobalStep()
        emas = [ExponentialMovingAverage(**make(step)) for make in CONFIGS.values()]
        for ema in emas:
            ema.track(model)
        group = EMAGroup(*emas, chunk_bytes=4096)
        gen = torch.Generator().manual_seed(1)
        for i in range(25):
            move(model, gen, i)
            if i == 12:
                polyak.flatten_parameters_(model)  # storage moves: plans are rebuilt
            if grouped:
                group.update()
            else:
                for ema in emas:
                    ema.update()
            step.increment()
        results[grouped] = [ema.state_dict() for ema in emas]
        if grouped:  # the float32 plain-lerp averages did share passes
            assert any(len(plans) >= 3 for plans, _ in group._fans.values())
    for name, alone, together in zip(CONFIGS, results[False], results[True]):
        assert alone["step"] == together["step"] == 25
        assert alone["averages"].keys() == together["averages"].keys()
        for key, shadow in alone["averages"].items():
            assert torch.equal(together["averages"][key], shadow), (name, key)


@settings(max_examples=25, deadline=None)
@given(
    decays=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=4),
    every=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    after=st.lists(st.integers(0, 3), min_size=4, max_size=4),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_group_property(decays, every, after, steps, seed):
    params = [nn.Parameter(t) for t in tensors([(40, 30), (30,), (1,)], seed=seed)]
    alone = [
        ExponentialMovingAverage(d, update_every=e, update_after=a)
        for d, e, a in zip(decays, every, after)
    ]
    together = [
        ExponentialMovingAverage(d, update_every=e, update_after=a)
        for d, e, a in zip(decays, every, after)
    ]
    for ema in alone + together:
        ema.track(params)
    group = EMAGroup(*together, chunk_bytes=4096)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen))
        for ema in alone:
            ema.update()
        group.update()
    for a, b in zip(alone, together):
        assert a.step == b.step
        for p in params:
            assert torch.equal(a.average(p), b.average(p))


def test_members_stay_usable_alone_and_load_each_others_state():
    model = net()
    fast, slow = ExponentialMovingAverage(0.9), ExponentialMovingAverage(0.999)
    fast.track(model)
    slow.track(model)
    group = EMAGroup(fast, slow)
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        move(model, gen, i)
        group.update()
    fast.update()  # alone, between group updates
    group.update()
    assert (fast.step, slow.step) == (5, 4)
    copy = ExponentialMovingAverage(0.9)
    copy.track(model)
    copy.load_state_dict(fast.state_dict())
    for name in fast.state_dict()["averages"]:
        assert torch.equal(copy.average(name), fast.average(name))


def test_group_refuses_averages_of_different_variables_before_changing():
    model = net()
    a, b = ExponentialMovingAverage(0.9), ExponentialMovingAverage(0.99)
    a.track(model)
    b.track(model[0])
    with pytest.raises(ValueError, match="must track the same variables"):
        EMAGroup(a, b)
    c = ExponentialMovingAverage(0.99)
    c.track(model)
    group = EMAGroup(a, c)
    c.apply({"extra": nn.Parameter(torch.zeros(2))})  # c alone gets a new entry
    before = a.state_dict()["averages"]["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises(ValueError, match="must track the same variables"):
        group.update()
    assert a.step == 0 and c.step == 1
    assert torch.equal(a.average("0.weight"), before)


def test_group_arguments():
    with pytest.raises(ValueError, match="at least one"):
        EMAGroup()
    with pytest.raises(TypeError, match="not an ExponentialMovingAverage"):
        EMAGroup(object())
    e = ExponentialMovingAverage(0.9)
    with pytest.raises(ValueError, match="listed twice"):
        EMAGroup(e, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_weights_are_read_in_place_every_step(dtype):
    """A channels_last conv weight is not contiguous: it must be lerped in its own layout (a
    flattened copy taken once would freeze the average at the first step's weights)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3).to(dtype=dtype, memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    shadows = [[torch.zeros(conv.weight.shape)] for _ in range(2)]
    fan = FanOutLerp([conv.weight], shadows, chunk_bytes=4096)
    expected = [torch.zeros(conv.weight.shape) for _ in range(2)]
    for _ in range(3):
        with torch.no_grad():
            conv.weight.add_(1)
        fan([0.5, 0.25])
        for e, w in zip(expected, [0.5, 0.25]):
            e.lerp_(conv.weight.detach().float(), w)
    for row, e in zip(shadows, expected):
        assert torch.equal(row[0], e)
