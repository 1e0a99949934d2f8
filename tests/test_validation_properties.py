"""Property suite: generated bad values at every public entry point of the library.

For each constructor argument, each ``load_state_dict`` and each method that changes state,
hypothesis draws values of the wrong type, out of range or non-finite, and asserts what
docs/validation.md promises: a ``ValueError`` or ``TypeError`` whose message names the
argument (or the state-dict key), and, for objects that exist already, a state identical
before and after, bit for bit. ``HYPOTHESIS_PROFILE=ci`` runs the same examples every time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from state_snapshots import assert_same, snapshot
from torch import nn

import polyak
import polyak.averaging
from polyak import optim, schedules
from polyak import transforms as T
from polyak.averaging import EMAGroup
from polyak.averaging.multi import FanOutLerp
from polyak.cli import main as cli_main

EXAMPLES = settings(max_examples=25, deadline=None)

# ------------------------------------------------------------------ bad values

NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NOT_A_NUMBER = st.one_of(
    st.text(max_size=3),
    st.booleans(),
    st.lists(st.floats(0, 1), max_size=2),
    st.just(torch.tensor(0.5)),
    st.just(object()),
    st.just(1 + 2j),
)
NOT_AN_INT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.booleans(),
    st.just(torch.tensor(2)),
    st.just([1]),
)
NOT_A_BOOL = st.one_of(st.integers(), st.text(max_size=5), st.floats(), st.none())


def real_outside(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    finite_only: bool = False,
) -> st.SearchStrategy[Any]:
    """Numbers outside ``[low, high]`` (``(low, ...`` with ``low_open``, ``..., high)`` with
    ``high_open``), non-finite ones (except with ``finite_only``: for arguments where an
    infinite value is allowed), and values that are not numbers."""
    parts: list[st.SearchStrategy[Any]] = [NOT_A_NUMBER]
    if low is not None:
        below = st.floats(max_value=low, exclude_max=not low_open, allow_nan=False)
        parts.append(below.filter(math.isfinite) if finite_only else below)
    if high is not None:
        above = st.floats(min_value=high, exclude_min=not high_open, allow_nan=False)
        parts.append(above.filter(math.isfinite) if finite_only else above)
    parts.append(st.just(math.nan) if finite_only else NON_FINITE)
    return st.one_of(parts)


def int_below(low: int) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(max_value=low - 1), NOT_AN_INT)


def bad_device() -> st.SearchStrategy[Any]:
    unusable = f"cuda:{torch.cuda.device_count()}"  # past the last GPU, or no CUDA at all
    return st.sampled_from(["gpu", "cpu:x", "", "tpu", unusable, 5, 1.5, torch.float32])


# ------------------------------------------------------------------ constructors


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _tracking(model: nn.Module, *decays: float) -> list[polyak.ExponentialMovingAverage]:
    emas = [polyak.ExponentialMovingAverage(d) for d in decays]
    for ema in emas:
        ema.track(model)
    return emas


def _untracked_pair() -> tuple[Any, ...]:
    """Two averages of different variables (they cannot share a pass)."""
    net = _net()
    a, b = polyak.ExponentialMovingAverage(0.9), polyak.ExponentialMovingAverage(0.99)
    a.track(net)
    b.track(net[0])
    return a, b


SHADOW_DTYPES = st.one_of(
    st.sampled_from(["float33", "int32", "torch.long", torch.int64, torch.bool]),
    st.integers(),
    st.floats(),
)
A_FILE = Path(__file__)  # exists, and is not a directory

# TF1's documented ranges, per optimizer argument (tf.compat.v1.train; docs/optim.md).
LEARNING_RATE = real_outside(0.0)
UNIT = real_outside(0.0, 1.0)
UNIT_BELOW_ONE = real_outside(0.0, 1.0, high_open=True)
NONNEGATIVE = real_outside(0.0)
POSITIVE = real_outside(0.0, low_open=True)
BAD_PARAMS = st.one_of(
    st.just(torch.ones(2, requires_grad=True)),
    st.none(),
    st.integers(),
    st.text(max_size=3),
    st.just({"w": nn.Parameter(torch.ones(2))}),
    st.just([1.0]),
    st.just([{}]),
    st.just([{"params": 3}]),
    st.just([nn.Parameter(torch.ones(2, dtype=torch.complex64))]),
    st.just([nn.Parameter(torch.ones(2, dtype=torch.float64)), torch.ones(2, dtype=torch.int32)]),
    st.builds(lambda p: [p, p], st.just(nn.Parameter(torch.ones(3)))),
)
OPTIMIZERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (good arguments, {argument: bad values})
    "GradientDescentOptimizer": ({"learning_rate": 0.1}, {"learning_rate": LEARNING_RATE}),
    "MomentumOptimizer": (
        {"learning_rate": 0.1, "momentum": 0.9},
        {"learning_rate": LEARNING_RATE, "momentum": UNIT_BELOW_ONE, "use_nesterov": NOT_A_BOOL},
    ),
    "AdamOptimizer": (
        {},
        {
            "learning_rate": LEARNING_RATE,
            "beta1": UNIT_BELOW_ONE,
            "beta2": UNIT_BELOW_ONE,
            "epsilon": NONNEGATIVE,
        },
    ),
    "RMSPropOptimizer": (
        {"learning_rate": 0.1},
        {
            "learning_rate": LEARNING_RATE,
            "decay": UNIT,
            "momentum": UNIT_BELOW_ONE,
            "epsilon": NONNEGATIVE,
            "centered": NOT_A_BOOL,
        },
    ),
    "AdagradOptimizer": (
        {"learning_rate": 0.1},
        {"learning_rate": LEARNING_RATE, "initial_accumulator_value": POSITIVE},
    ),
    "AdadeltaOptimizer": (
        {},
        {"learning_rate": LEARNING_RATE, "rho": UNIT, "epsilon": NONNEGATIVE},
    ),
    "FtrlOptimizer": (
        {"learning_rate": 0.1},
        {
            "learning_rate": POSITIVE,
            "learning_rate_power": real_outside(high=0.0),
            "initial_accumulator_value": NONNEGATIVE,
            "l1_regularization_strength": NONNEGATIVE,
            "l2_regularization_strength": NONNEGATIVE,
            "l2_shrinkage_regularization_strength": NONNEGATIVE,
            "beta": NONNEGATIVE,
        },
    ),
}


def _tf_optimizer(name: str) -> Callable[..., Any]:
    cls = getattr(optim, name)
    return lambda **kw: cls(kw.pop("params", _net().parameters()), **kw)


def _optimizer(**kwargs: Any) -> polyak.Optimizer:
    if "inner" not in kwargs:
        kwargs["inner"] = torch.optim.SGD(_net().parameters(), lr=0.1)
    return polyak.Optimizer(**kwargs)


# (entry point, good keyword arguments, {argument: strategy of bad values})
CONSTRUCTORS: list[tuple[str, Callable[..., Any], dict[str, Any], dict[str, Any]]] = [
    (
        "ExponentialMovingAverage",
        polyak.ExponentialMovingAverage,
        {"decay": 0.9},
        {
            "decay": real_outside(0.0, 1.0).filter(lambda v: not callable(v)),
            "num_updates": st.one_of(
                st.integers(max_value=-1),
                st.floats(),
                st.text(max_size=2),
                st.booleans(),
                st.sampled_from([torch.zeros(2), torch.tensor(-3), torch.tensor(True)]),
            ),
            "zero_debias": NOT_A_BOOL,
            "name": st.one_of(st.just(""), st.integers(), st.none()),
            "update_every": int_below(1),
            "update_after": int_below(0),
            "compound_decay": NOT_A_BOOL,
            "shadow_dtype": st.one_of(
                st.sampled_from(["float33", "int32", "torch.long", torch.int64, torch.bool]),
                st.integers(),
                st.floats(),
            ),
            "device": bad_device(),
            "buffers": st.text(max_size=8).filter(lambda s: s not in ("average", "copy", "ignore")),
            "exact_tf": NOT_A_BOOL,
        },
    ),
    (
        "TargetNetwork",
        lambda **kw: polyak.TargetNetwork(kw.pop("online", _net()), **kw),
        {},
        {
            "online": st.one_of(st.none(), st.integers(), st.just([nn.Linear(2, 2)])),
            "tau": real_outside(0.0, 1.0).filter(lambda v: v is not None),
            "every": int_below(1),
        },
    ),
    ("GlobalStep", polyak.GlobalStep, {}, {"value": int_below(0)}),
    ("schedules.constant", schedules.constant, {"decay": 0.9}, {"decay": real_outside(0, 1)}),
    (
        "schedules.num_updates",
        schedules.num_updates,
        {"decay": 0.9},
        {"decay": real_outside(0, 1)},
    ),
    (
        "schedules.warmup",
        schedules.warmup,
        {"decay": 0.9},
        {
            "decay": real_outside(0, 1),
            "inv_gamma": real_outside(0.0, low_open=True),
            "power": real_outside(0.0, low_open=True),
            "min_decay": st.one_of(real_outside(0, 1), st.floats(0.91, 1.0)),
        },
    ),
    (
        "schedules.power_function",
        schedules.power_function,
        {"gamma": 7.0},
        {"gamma": real_outside(0.0, low_open=True)},
    ),
    (
        "schedules.karras",
        schedules.karras,
        {"sigma_rel": 0.1},
        {"sigma_rel": real_outside(0.0, 12**-0.5, low_open=True)},
    ),
    (
        "schedules.cosine",
        schedules.cosine,
        {"base": 0.9, "final": 1.0, "total_steps": 10},
        {
            "base": real_outside(0, 1),
            "final": real_outside(0, 1),
            "total_steps": int_below(1),
        },
    ),
    (
        "transforms.clip_by_value",
        T.clip_by_value,
        {"lo": -1.0, "hi": 1.0},
        {
            "lo": st.one_of(NOT_A_NUMBER, st.just(math.nan), st.floats(1.0, exclude_min=True)),
            "hi": st.one_of(NOT_A_NUMBER, st.just(math.nan), st.floats(max_value=-1.0,
                                                                       exclude_max=True)),
        },
    ),
    (
        "transforms.clip_by_norm",
        T.clip_by_norm,
        {"clip_norm": 1.0},
        {"clip_norm": real_outside(0.0, low_open=True)},
    ),
    (
        "transforms.clip_by_global_norm",
        T.clip_by_global_norm,
        {"clip_norm": 1.0},
        {"clip_norm": real_outside(0.0, low_open=True)},
    ),
    ("transforms.scale", T.scale, {"s": 2.0}, {"s": real_outside()}),
    (
        "transforms.adaptive_clip",
        T.adaptive_clip,
        {},
        {"clipping": real_outside(0.0, low_open=True), "eps": real_outside(0.0)},
    ),
    (
        "transforms.add_noise",
        T.add_noise,
        {"eta": 0.01},
        {
            "eta": real_outside(0.0),
            "gamma": real_outside(0.0),
            "seed": st.one_of(
                st.integers(min_value=2**64), st.integers(max_value=-(2**63) - 1), NOT_AN_INT
            ),
        },
    ),
    (
        "transforms.skip_nonfinite",
        T.skip_nonfinite,
        {},
        {"max_consecutive": int_below(1)},
    ),
    ("transforms.accumulate", T.accumulate, {"k": 2}, {"k": int_below(1)}),
    (
        "transforms.masked",
        T.masked,
        {"inner": T.scale(2.0), "select": ["0.weight"]},
        {
            "inner": st.one_of(st.none(), st.integers(), st.just(lambda step: None)),
            "select": st.one_of(
                st.text(max_size=4),
                st.just([]),
                st.lists(st.integers(), min_size=1, max_size=2),
                st.integers(),
                st.just([torch.zeros(1)]),
            ),
        },
    ),
    (
        "Optimizer",
        _optimizer,
        {},
        {
            "inner": st.one_of(st.just(nn.Linear(2, 2)), st.just([nn.Parameter(torch.ones(1))]),
                               st.integers()),
            "transforms": st.one_of(
                st.integers(),
                st.text(min_size=1, max_size=3),
                st.just([T.scale(1.0), "clip"]),
                st.just([lambda step: None]),
            ),
            "names": st.one_of(
                st.integers(),
                st.just([("w", torch.ones(1))]),
                st.just({"w": 1.0}),
                st.just({1: torch.ones(1)}),
            ),
        },
    ),
    (
        "clip_by_value",
        polyak.clip_by_value,
        {"t": torch.ones(3), "clip_value_min": -1.0, "clip_value_max": 1.0},
        {
            "t": st.one_of(st.floats(), st.lists(st.floats(), max_size=2)),
            "clip_value_min": st.one_of(st.just(math.nan), st.text(max_size=2), st.booleans()),
            "clip_value_max": st.one_of(st.just(math.nan), st.text(max_size=2), st.none()),
        },
    ),
    (
        "clip_by_norm",
        polyak.clip_by_norm,
        {"t": torch.ones(2, 3), "clip_norm": 1.0},
        {
            "t": st.one_of(st.floats(), st.none()),
            "clip_norm": real_outside(0.0, low_open=True).filter(
                lambda v: not isinstance(v, torch.Tensor)
            ),
            "axes": st.one_of(
                st.integers(min_value=2),
                st.integers(max_value=-3),
                st.just([0, 0]),
                st.just([0, -2]),
                st.just("0"),
                st.floats(),
            ),
        },
    ),
    (
        "global_norm",
        polyak.global_norm,
        {"t_list": [torch.ones(2)]},
        {
            "t_list": st.one_of(
                st.just(torch.ones(3)),
                st.integers(),
                st.just([None]),
                st.lists(st.floats(), min_size=1, max_size=2),
            )
        },
    ),
    (
        "clip_by_global_norm",
        polyak.clip_by_global_norm,
        {"t_list": [torch.ones(2)], "clip_norm": 1.0},
        {
            "t_list": st.one_of(st.just(torch.ones(3)), st.integers(), st.just([None]),
                                st.just(["a"])),
            "clip_norm": real_outside(0.0, low_open=True).filter(
                lambda v: not isinstance(v, torch.Tensor)
            ),
            "use_norm": st.one_of(
                st.floats(max_value=0.0, exclude_max=True), st.just(math.nan),
                st.text(max_size=2), st.booleans(),
            ),
        },
    ),
    (
        "gradients",
        lambda **kw: polyak.gradients(**kw),
        {"ys": None, "xs": None},
        {
            "ys": st.one_of(st.integers(), st.just([1.0]), st.text(min_size=1, max_size=2)),
            "xs": st.one_of(st.integers(), st.just([1.0]), st.text(min_size=1, max_size=2)),
            "grad_ys": st.one_of(
                st.integers(),
                st.just([torch.ones(3)]),
                st.just([torch.ones((), dtype=torch.float64)]),
                st.just([1.0]),
                st.just([None, None]),
            ),
            "stop_gradients": st.one_of(st.integers(), st.just([1.0])),
            "unconnected_gradients": st.text(max_size=5).filter(lambda s: s not in ("none",
                                                                                    "zero")),
            "retain_graph": NOT_A_BOOL,
            "create_graph": NOT_A_BOOL,
        },
    ),
    (
        "flatten_parameters_",
        lambda **kw: polyak.flatten_parameters_(kw.pop("module", _net()), **kw),
        {},
        {
            "module": st.one_of(st.just([nn.Parameter(torch.ones(2))]), st.none(), st.integers()),
            "grads": NOT_A_BOOL,
        },
    ),
    ("stop_gradient", polyak.stop_gradient, {"t": torch.ones(1)}, {"t": NOT_A_NUMBER.filter(
        lambda v: not isinstance(v, torch.Tensor))}),
    (
        "schedules.gamma_to_sigma_rel",
        schedules.gamma_to_sigma_rel,
        {"gamma": 7.0},
        {"gamma": real_outside(0.0, low_open=True)},
    ),
    (
        "schedules.sigma_rel_to_gamma",
        schedules.sigma_rel_to_gamma,
        {"sigma_rel": 0.1},
        {"sigma_rel": real_outside(0.0, 12**-0.5, low_open=True, high_open=True)},
    ),
    (
        "PostHocEMA",
        lambda **kw: polyak.PostHocEMA(
            kw.pop("model", _net()),
            **kw,
            # snapshot_dir alone would be refused for want of snapshot_every, whatever it is.
            **({"snapshot_every": 2} if "snapshot_dir" in kw else {}),
        ),
        {},
        {
            "model": st.one_of(st.none(), st.integers(), st.just([nn.Linear(2, 2)]),
                               st.just(nn.ReLU())),
            "sigma_rels": st.one_of(
                real_outside(0.0, 12**-0.5, low_open=True, high_open=True).map(lambda v: [v]),
                st.builds(lambda v: (0.05, v), real_outside(0.0, 12**-0.5, low_open=True,
                                                            high_open=True)),
                st.just([]),
                st.just(0.1),
                st.just("0.1"),
                st.just(torch.tensor([0.05, 0.1])),
                st.just((0.1, 0.10001)),  # the same snapshot file name
            ),
            "gammas": st.one_of(
                real_outside(0.0, low_open=True).map(lambda v: (v,)),
                st.just(()),
                st.just(7.0),
                st.just("7"),
                st.just([True]),
            ),
            "snapshot_every": int_below(1),
            "snapshot_dir": st.one_of(
                st.just(""), st.integers(), st.just(b"snaps"), st.just(A_FILE),
                st.just(A_FILE / "snaps"),
            ),
            "update_every": int_below(1),
            "shadow_dtype": SHADOW_DTYPES,
            "snapshot_dtype": SHADOW_DTYPES,
            "device": bad_device(),
            "chunk_bytes": int_below(1),
        },
    ),
    (
        "EMAGroup",
        lambda **kw: EMAGroup(*kw.pop("emas", _tracking(_net(), 0.9, 0.99)), **kw),
        {},
        {
            "emas": st.one_of(
                st.just(()),
                st.just((1,)),
                st.builds(lambda e: (e[0], "ema"), st.builds(_tracking, st.builds(_net),
                                                             st.just(0.9))),
                st.builds(lambda e: (e[0], e[0]), st.builds(_tracking, st.builds(_net),
                                                            st.just(0.9))),
                st.builds(_untracked_pair),
            ),
            "chunk_bytes": int_below(1),
        },
    ),
    (
        "FanOutLerp",
        FanOutLerp,
        {"sources": [torch.ones(3)], "shadows": [[torch.zeros(3)]]},
        {"chunk_bytes": int_below(1)},
    ),
] + [
    (f"optim.{name}", _tf_optimizer(name), good, {"params": BAD_PARAMS, **bad})
    for name, (good, bad) in OPTIMIZERS.items()
]

CASES = [(label, arg) for label, _, _, bad in CONSTRUCTORS for arg in bad]


def _gradients_good() -> dict[str, Any]:
    x = torch.ones((), requires_grad=True)
    return {"ys": x * 2, "xs": [x]}


@pytest.mark.parametrize(("label", "arg"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
@EXAMPLES
@given(data=st.data())
def test_a_bad_argument_is_refused_by_name(label, arg, data):
    _, make, good, bad = next(c for c in CONSTRUCTORS if c[0] == label)
    kwargs = _gradients_good() if label == "gradients" else dict(good)
    kwargs[arg] = data.draw(bad[arg], label=arg)
    with pytest.raises((ValueError, TypeError)) as info:
        make(**kwargs)
    # A parameter list is named by the parameter at fault ("parameter 1 of param group 0").
    culprit = r"params|parameter \d+ of param group" if arg == "params" else re.escape(arg)
    assert re.search(culprit, str(info.value)), f"{label}({arg}=...): {info.value}"


def test_every_public_constructor_is_covered():
    labels = {label for label, *_ in CONSTRUCTORS}
    for name in T.__all__:
        if name not in ("GradientStep", "Transform", "chain"):  # chain: checked below
            assert f"transforms.{name}" in labels, name
    for name in schedules.__all__:
        if name != "Schedule":
            assert f"schedules.{name}" in labels, name
    modules = ("IncompatibleKeys", "__version__", "optim", "schedules", "transforms")
    for name in [*polyak.__all__, *polyak.averaging.__all__]:
        if name not in modules:
            assert name in labels, name
    for name in optim.__all__:
        assert f"optim.{name}" in labels, name


@EXAMPLES
@given(entry=st.one_of(st.integers(), st.none(), st.just(lambda step: None), st.text(max_size=2)))
def test_chain_refuses_what_is_not_a_transform(entry):
    with pytest.raises(TypeError, match="entry 1"):
        T.chain(T.scale(1.0), entry)


# ------------------------------------------------------------------ methods that change state


def _trained_ema(**kwargs: Any) -> tuple[polyak.ExponentialMovingAverage, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = polyak.ExponentialMovingAverage(0.9, zero_debias=True, **kwargs)
    ema.apply(model)
    ema.apply({"loss": torch.tensor([1.0, 2.0])})
    return ema, model


def _ema_state(ema: polyak.ExponentialMovingAverage) -> Any:
    return (snapshot(ema), ema.device, ema.shadow_dtype)


BAD_ENTRIES = st.sampled_from(
    [
        ("counter", lambda: nn.Parameter(torch.tensor([1, 2]), requires_grad=False)),
        ("sparse", lambda: torch.eye(2).to_sparse().requires_grad_()),
        ("number", lambda: 1.5),
        ("loss", lambda: torch.ones(3)),  # tracked with shape (2,)
        ("0.weight", lambda: torch.ones(2)),  # a variable passed as a value, another shape
        ("text", lambda: "w"),
    ]
)


@EXAMPLES
@given(bad=BAD_ENTRIES, before=st.integers(0, 2))
def test_apply_with_a_bad_entry_changes_nothing(bad, before):
    ema, _ = _trained_ema()
    name, make = bad
    entries: dict[str, Any] = {f"new{i}": nn.Parameter(torch.ones(2) * i) for i in range(before)}
    entries[name] = make()
    state = _ema_state(ema)
    with pytest.raises((ValueError, TypeError)) as info:
        ema.apply(entries)
    assert f"'{name}'" in str(info.value)
    assert_same(_ema_state(ema), state)


@EXAMPLES
@given(device=bad_device(), dtype=st.one_of(st.none(), st.just("int8"), st.integers()))
def test_to_with_a_bad_device_or_dtype_changes_nothing(device, dtype):
    ema, _ = _trained_ema()
    state = _ema_state(ema)
    with pytest.raises((ValueError, TypeError), match=r"device|dtype"):
        ema.to(device=device, dtype=dtype)
    assert_same(_ema_state(ema), state)
    with pytest.raises((ValueError, TypeError), match="dtype"):
        ema.to(dtype=dtype if dtype is not None else torch.int32)
    assert_same(_ema_state(ema), state)


@EXAMPLES
@given(by=int_below(0))
def test_global_step_increment_by_a_bad_value_changes_nothing(by):
    step = polyak.GlobalStep(3)
    with pytest.raises((ValueError, TypeError), match="by"):
        step.increment(by)
    assert step.value == 3


def _model_and_optimizer(transforms=()) -> tuple[nn.Module, polyak.Optimizer]:
    torch.manual_seed(0)
    model = polyak.flatten_parameters_(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    opt = polyak.Optimizer(torch.optim.Adam(model.parameters()), list(transforms), names=model)
    opt.minimize(model(torch.ones(2, 3)).sum())
    return model, opt


def _optimizer_state(model: nn.Module, opt: polyak.Optimizer) -> Any:
    return (
        snapshot(opt),
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


@EXAMPLES
@given(
    which=st.sampled_from(["shape", "dtype", "twice", "foreign", "not a pair", "global_step",
                           "not a tensor"])
)
def test_apply_gradients_with_bad_pairs_changes_nothing(which):
    model, opt = _model_and_optimizer()
    w, b = model[0].weight, model[0].bias
    pairs, culprit = {
        "shape": ([(torch.ones(3), w)], "0.weight"),
        "dtype": ([(torch.ones_like(w, dtype=torch.float64), w)], "0.weight"),
        "twice": ([(torch.ones_like(w), w), (torch.ones_like(w), w)], "0.weight"),
        "foreign": ([(torch.ones(2), nn.Parameter(torch.ones(2)))], "not a parameter"),
        "not a pair": ([(torch.ones_like(w), w), torch.ones_like(b)], "entry 1"),
        "global_step": ([(torch.ones_like(w), w)], "global_step"),
        "not a tensor": ([(torch.ones_like(w), "w")], "variable 0"),
    }[which]
    state = _optimizer_state(model, opt)
    with pytest.raises((ValueError, TypeError)) as info:
        opt.apply_gradients(pairs, global_step=5 if which == "global_step" else None)
    assert culprit in str(info.value)
    assert_same(_optimizer_state(model, opt), state)


@EXAMPLES
@given(which=st.sampled_from(["grad_loss", "global_step", "loss", "var_list", "no grad"]))
def test_minimize_with_bad_arguments_changes_nothing(which):
    model, opt = _model_and_optimizer()
    out = model(torch.ones(2, 3))
    kwargs: dict[str, Any] = {
        "grad_loss": {"loss": out, "grad_loss": torch.ones(3)},
        "global_step": {"loss": out.sum(), "global_step": 1},
        "loss": {"loss": [out.sum()]},
        "var_list": {"loss": out.sum(), "var_list": [model[0].bias, model[0].bias]},
        "no grad": {"loss": out.detach().sum()},
    }[which]
    culprit = "No gradients" if which == "no grad" else which
    state = _optimizer_state(model, opt)
    with pytest.raises((ValueError, TypeError)) as info:
        opt.minimize(**kwargs)
    assert culprit in str(info.value)
    assert_same(_optimizer_state(model, opt), state)


# ------------------------------------------------------------------ load_state_dict

GARBAGE = st.one_of(
    st.none(),
    st.integers(min_value=-3, max_value=-1),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.just([1, 2]),
    st.just(torch.zeros(7)),
    st.just({"x": 1}),
)


@EXAMPLES
@given(data=st.data())
def test_ema_load_of_a_bad_state_dict_changes_nothing(data):
    ema, _ = _trained_ema()
    good = snapshot(ema)
    bad = copy.deepcopy(good)
    where = data.draw(
        st.sampled_from(
            ["step", "averages", "values", "an average", "a value's local_step",
             "a value's biased", "a value without average", "dtype"]
        )
    )
    junk = data.draw(GARBAGE)
    culprit = where
    if where in ("step", "averages", "values"):
        bad[where] = junk
        culprit = "state_dict" if where == "averages" else where
    elif where == "an average":
        bad["averages"]["0.weight"] = torch.zeros(5, 5) if isinstance(junk, torch.Tensor) else junk
        culprit = "0.weight"
    elif where == "a value's local_step":
        bad["values"]["loss"]["local_step"] = junk if junk is not None else -1
        culprit = "loss"
    elif where == "a value's biased":
        bad["values"]["loss"]["biased"] = junk if junk is not None else torch.zeros(2, dtype=int)
        culprit = "loss"
    elif where == "a value without average":
        bad["values"]["orphan"] = {"local_step": 0}
        culprit = "orphan"
    else:
        bad["averages"]["1.running_mean"] = torch.zeros(4, dtype=torch.int64)
        culprit = "1.running_mean"
    if where == "step" and junk is None:
        bad["step"] = -1
    if where == "values" and isinstance(junk, dict):
        bad["values"] = {**good["values"], "x": 1}
        culprit = "'x'"
    state = _ema_state(ema)
    with pytest.raises((ValueError, TypeError)) as info:
        ema.load_state_dict(bad)
    assert culprit in str(info.value), info.value
    assert_same(_ema_state(ema), state)
    target = polyak.TargetNetwork(nn.Linear(3, 4), tau=0.1)
    before = snapshot(target)
    with pytest.raises((ValueError, TypeError)):
        target.load_state_dict(bad)
    assert_same(snapshot(target), before)


@EXAMPLES
@given(sd=st.one_of(GARBAGE, st.fixed_dictionaries({"value": GARBAGE})))
def test_global_step_load_of_a_bad_state_dict_changes_nothing(sd):
    step = polyak.GlobalStep(4)
    with pytest.raises((ValueError, TypeError), match=r"state_dict|'value'"):
        step.load_state_dict(sd)
    assert step.value == 4


def _stateful_chain() -> T.chain:
    return T.chain(
        T.accumulate(2),
        T.skip_nonfinite(3),
        T.add_noise(0.01, seed=1),
        T.masked(T.clip_by_norm(1.0), ["0.weight"]),
        T.clip_by_global_norm(1.0),
    )


# (member index, key or None for the member's whole state, culprit named in the error)
TRANSFORM_KEYS = [
    (0, "count", "'count'"),
    (0, "sums", "'sums'"),
    (0, None, "state_dict"),
    (1, "skipped", "'skipped'"),
    (1, "consecutive", "'consecutive'"),
    (2, "count", "'count'"),
    (2, "generators", "'generators'"),
    (3, "x", "no state"),
    (4, "x", "no state"),
]


@EXAMPLES
@given(which=st.sampled_from(TRANSFORM_KEYS), junk=GARBAGE)
def test_optimizer_load_of_bad_transform_state_changes_nothing(which, junk):
    model, opt = _model_and_optimizer([_stateful_chain()])
    opt.minimize(model(torch.ones(2, 3)).sum())  # one micro-step pending: sums exist
    saved = snapshot(opt)
    index, key, culprit = which
    member = saved["transforms"]["0"][str(index)]
    if key is None:
        saved["transforms"]["0"][str(index)] = junk if not isinstance(junk, dict) else [junk]
    else:
        member[key] = junk
        if key == "sums" and junk is None:
            member[key] = [torch.zeros(1), "x"]
    fresh_model, fresh = _model_and_optimizer([_stateful_chain()])
    state = _optimizer_state(fresh_model, fresh)
    with pytest.raises((ValueError, TypeError)) as info:
        fresh.load_state_dict(saved)
    assert culprit in str(info.value) or "'generators'" in culprit, info.value
    assert_same(_optimizer_state(fresh_model, fresh), state)


@EXAMPLES
@given(
    which=st.sampled_from(["groups", "params", "shape", "unknown id", "inner", "keys"]),
    junk=GARBAGE,
)
def test_optimizer_load_of_another_models_state_changes_nothing(which, junk):
    model, opt = _model_and_optimizer()
    saved = snapshot(opt)
    inner = saved["inner"]
    culprit = {"groups": "param groups", "params": "param group 0", "shape": "0.weight",
               "unknown id": "parameter id", "inner": "'inner'", "keys": "keys"}[which]
    if which == "groups":
        inner["param_groups"].append(copy.deepcopy(inner["param_groups"][0]))
    elif which == "params":
        inner["param_groups"][0]["params"].pop()
    elif which == "shape":
        inner["state"][0]["exp_avg"] = torch.zeros(3, 4)
    elif which == "unknown id":
        inner["state"][99] = {}
    elif which == "inner":
        saved["inner"] = junk if not isinstance(junk, dict) else {"state": {}}
    else:
        saved["extra"] = junk
    state = _optimizer_state(model, opt)
    with pytest.raises((ValueError, TypeError)) as info:
        opt.load_state_dict(saved)
    assert culprit in str(info.value), info.value
    assert_same(_optimizer_state(model, opt), state)


class _OwnLoader(T.Transform):
    """A user transform that loads through its own ``load_state_dict``."""

    def __init__(self) -> None:
        self.value = 1

    def __call__(self, step: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: Any) -> None:
        self.value = state_dict["value"]
        if self.value < 0:
            raise ValueError("_OwnLoader: value must be >= 0")


@EXAMPLES
@given(value=st.integers(max_value=-1), later=st.booleans())
def test_a_user_transform_failing_its_own_load_is_put_back(value, later):
    members = [_OwnLoader(), _OwnLoader(), T.accumulate(2)]
    chain = T.chain(*members)
    saved = chain.state_dict()
    saved["0"] = {"value": 5}
    saved["1"] = {"value": value}
    if later:  # a checked member's bad state is found before any member loads
        saved["1"] = {"value": 7}
        saved["2"] = {"count": -1, "sums": None}
    with pytest.raises(ValueError):
        chain.load_state_dict(saved)
    assert [m.value for m in members[:2]] == [1, 1]
    assert members[2].count == 0


def test_optimizer_with_a_user_transform_loads_through_it_and_puts_it_back():
    model, opt = _model_and_optimizer([])
    own = _OwnLoader()
    opt = polyak.Optimizer(torch.optim.Adam(model.parameters()), own)
    saved = opt.state_dict()
    saved["transforms"] = {"value": 3}
    opt.load_state_dict(saved)
    assert own.value == 3
    saved["transforms"] = {"value": -2}
    state = _optimizer_state(model, opt)
    with pytest.raises(ValueError, match="value must be >= 0"):
        opt.load_state_dict(saved)
    assert own.value == 3
    assert_same(_optimizer_state(model, opt), state)


# ------------------------------------------------------------------ post-hoc EMA

@pytest.fixture(scope="module")
def trained_posthoc(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[polyak.PostHocEMA, nn.Module, Path]:
    """A PostHocEMA with snapshots at steps 2 and 4, shared by the tests below (each checks
    that it does not change)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    directory = tmp_path_factory.mktemp("posthoc")
    ph = polyak.PostHocEMA(model, snapshot_every=2, snapshot_dir=directory / "snaps")
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        ph.update()
    return ph, model, directory


def _posthoc_state(ph: polyak.PostHocEMA) -> Any:
    files = sorted((f.name, f.stat().st_mtime_ns) for f in ph.snapshot_dir.iterdir())
    return snapshot(ph), ph.run_id, files


SYNTHESIS_ARGS = {
    "sigma_rel": real_outside(0.0, 12**-0.5, low_open=True, high_open=True),
    "gamma": real_outside(0.0, low_open=True),
    "step": st.one_of(int_below(0), st.sampled_from([1, 3, 5, 10**6])),  # no snapshot there
    "max_error": real_outside(0.0, finite_only=True),
}


@EXAMPLES
@given(data=st.data(), how=st.sampled_from(["synthesize", "reconstruction", "swap"]))
def test_synthesis_with_a_bad_argument_is_refused_by_name_and_changes_nothing(
    trained_posthoc, data, how
):
    ph, model, _ = trained_posthoc
    arg = data.draw(st.sampled_from(sorted(SYNTHESIS_ARGS)), label="arg")
    kwargs: dict[str, Any] = {"sigma_rel": 0.07} if arg != "gamma" else {}
    kwargs[arg] = data.draw(SYNTHESIS_ARGS[arg], label=arg)
    state, weights = _posthoc_state(ph), snapshot(model)
    with pytest.raises((ValueError, TypeError)) as info:
        if how == "swap":
            with ph.synthesized_parameters(model, **kwargs):
                pass
        else:
            getattr(ph, how)(**kwargs)
    assert arg in str(info.value), info.value
    assert_same(_posthoc_state(ph), state)
    assert_same(snapshot(model), weights)


@EXAMPLES
@given(other=st.sampled_from([None, 3, "model", nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 5))]))
def test_synthesized_parameters_into_another_model_changes_nothing(trained_posthoc, other):
    ph, _, _ = trained_posthoc
    state = _posthoc_state(ph)
    before = snapshot(other) if isinstance(other, nn.Module) else None
    with (
        pytest.raises((ValueError, TypeError), match=r"model|shape"),
        ph.synthesized_parameters(other, sigma_rel=0.08, max_error=None),
    ):
        pass
    assert_same(_posthoc_state(ph), state)
    if before is not None:
        assert_same(snapshot(other), before)


POSTHOC_KEYS = ["format", "step", "last_update", "gammas", "update_every", "run_id",
                "fingerprint", "averages"]


@EXAMPLES
@given(
    where=st.sampled_from([*POSTHOC_KEYS, "missing key", "an average", "a tensor"]),
    key=st.sampled_from(POSTHOC_KEYS[1:]),
    junk=GARBAGE,
)
def test_posthoc_load_of_a_bad_state_dict_changes_nothing(trained_posthoc, where, key, junk):
    trained, _, _ = trained_posthoc
    bad = copy.deepcopy(trained.state_dict())
    culprit = where
    if where == "missing key":
        del bad[key]
        culprit = key
    elif where == "an average":
        bad["averages"][1] = junk
        culprit = "average"
    elif where == "a tensor":
        bad["averages"][0]["2.weight"] = junk if junk is not None else torch.zeros(2, 4).int()
        culprit = "2.weight"
    else:
        bad[where] = junk
        if where in ("run_id", "fingerprint") and isinstance(junk, str):
            bad[where] = ""  # any other non-empty run id is a run id
        if where == "format":
            culprit = "PostHocEMA.state_dict"
    torch.manual_seed(1)
    fresh = polyak.PostHocEMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4),
                                            nn.Linear(4, 2)))
    state = (snapshot(fresh), fresh.run_id)
    with pytest.raises((ValueError, TypeError)) as info:
        fresh.load_state_dict(bad)
    assert culprit in str(info.value), info.value
    assert_same((snapshot(fresh), fresh.run_id), state)


CLI_BAD = {
    # flag: (bad values, what the message names)
    "--sigma-rel": (["nan", "inf", "0", "0.3", "-0.1", "x", "1e-400", "0.001"], "sigma.rel"),
    "--gamma": (["nan", "inf", "0", "-1", "x", "1e308"], "gamma"),
    "--step": (["-3", "1.5", "x", "3", "99"], "step"),
    "--max-error": (["nan", "x", ""], "max.error"),
    "--dtype": (["int8", "float8", ""], "dtype"),
    "-o": (["", "out.bin", "missing/out.pt", "{dir}", "{file}/out.pt"], "output"),
    "snapshot_dir": (["{dir}/none", "{file}", "{dir}"], "snapshot|director"),
}


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_posthoc_cli_refuses_bad_arguments_in_one_line(trained_posthoc, data):
    posthoc_dir = trained_posthoc[2]
    flag = data.draw(st.sampled_from(sorted(CLI_BAD)), label="flag")
    values, culprit = CLI_BAD[flag]
    value = data.draw(st.sampled_from(values), label="value")
    value = value.format(dir=posthoc_dir, file=A_FILE)
    out = posthoc_dir / "out.pt"
    args = {"snapshot_dir": str(posthoc_dir / "snaps"), "--sigma-rel": "0.08", "-o": str(out)}
    if flag == "--gamma":
        del args["--sigma-rel"]
    args[flag] = value
    argv = ["posthoc", args.pop("snapshot_dir")] + [x for kv in args.items() for x in kv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli_main(argv)
        except SystemExit as exit_:  # argparse's refusals
            code = exit_.code
    message = err.getvalue()
    assert code == 2, message
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1, message
    assert re.search(culprit, message), message
    assert not out.exists()


def _posthoc_run(directory: Path, steps: int) -> tuple[polyak.PostHocEMA, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ph = polyak.PostHocEMA(model, snapshot_every=2, snapshot_dir=directory)
    for _ in range(steps):
        _posthoc_step(model, ph)
    return ph, model


def _posthoc_step(model: nn.Module, ph: polyak.PostHocEMA) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01).add_(0.01)
    ph.update()


@pytest.mark.parametrize("failure", ["buffers", "directory", "disk full 1", "disk full 2"])
def test_a_refused_or_failed_snapshot_step_changes_nothing_and_can_be_redone(tmp_path, failure):
    """Buffers that changed shape and a removed snapshot_dir are refused before the update;
    a write that fails (a full disk, after 0 or 1 of the 2 files) puts the averages and
    counters back, so the next update() redoes the step: same snapshots and averages, bit for
    bit, as a run that never failed."""
    reference, _ = _posthoc_run(tmp_path / "reference", 4)
    ph, model = _posthoc_run(tmp_path / "run", 3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01).add_(0.01)
    state = snapshot(ph)
    if failure == "buffers":
        kept = model[1].running_mean
        model[1].running_mean = torch.zeros(5)
        with pytest.raises(ValueError, match="buffers changed"):
            ph.update()
        model[1].running_mean = kept
    elif failure == "directory":
        (tmp_path / "run").rename(tmp_path / "moved")
        with pytest.raises(ValueError, match=r"snapshot_dir .* is gone"):
            ph.update()
        (tmp_path / "moved").rename(tmp_path / "run")
    else:
        real_save = polyak.averaging.posthoc.save_atomic
        calls = []

        def full_disk(obj: Any, path: Any) -> None:
            calls.append(path)
            if len(calls) == int(failure[-1]):
                raise OSError(28, "No space left on device")
            real_save(obj, path)

        with (
            mock.patch("polyak.averaging.posthoc.save_atomic", full_disk),
            pytest.raises(OSError, match="No space"),
        ):
            ph.update()
    assert_same(snapshot(ph), state)
    ph.update()  # redone
    assert_same(snapshot(ph)["averages"], snapshot(reference)["averages"])
    for name in ("phema-0000000004-0.0500.pt", "phema-0000000004-0.1000.pt"):
        ours = torch.load(tmp_path / "run" / name, weights_only=True)
        theirs = torch.load(tmp_path / "reference" / name, weights_only=True)
        assert_same(ours["averages"], theirs["averages"])


# ------------------------------------------------------------------ several averages


@EXAMPLES
@given(
    # A schedule may return a 0-dim tensor (read with float()).
    bad=real_outside(0.0, 1.0).filter(lambda v: not isinstance(v, torch.Tensor)),
    member=st.integers(0, 2),
    when=st.integers(0, 2),
)
def test_a_group_update_that_one_member_refuses_changes_no_member(bad, member, when):
    def schedule(step: int) -> Any:
        return bad if step >= when else 0.5

    net = _net()
    emas = [polyak.ExponentialMovingAverage(schedule if k == member else 0.9 + 0.01 * k)
            for k in range(3)]
    for ema in emas:
        ema.track(net)
    group = EMAGroup(*emas)
    for _ in range(when):
        group.update()
    states = [snapshot(e) for e in emas]
    with pytest.raises((ValueError, TypeError), match="decay"):
        group.update()
    for ema, state in zip(emas, states):
        assert_same(snapshot(ema), state)


# ------------------------------------------------------------------ polyak.optim


def _stepped(name: str, net: nn.Module | None = None) -> tuple[Any, nn.Module]:
    """A polyak.optim optimizer (two param groups) after two steps."""
    good, _ = OPTIMIZERS[name]
    net = net or _net()
    opt = getattr(optim, name)(
        [{"params": net[0].parameters()}, {"params": net[1].parameters()}], **good
    )
    for i in range(2):
        opt.zero_grad()
        net(torch.ones(2, 3) * (i + 1)).square().sum().backward()
        opt.step()
    return opt, net


def _tf_state(opt: Any, net: nn.Module) -> Any:
    return snapshot(opt), [p.detach().clone() for p in net.parameters()]


@EXAMPLES
@given(data=st.data(), name=st.sampled_from(sorted(OPTIMIZERS)))
def test_add_param_group_with_a_bad_group_changes_nothing(data, name):
    opt, net = _stepped(name)
    _, bad = OPTIMIZERS[name]
    arg = data.draw(st.sampled_from(sorted(bad)), label="arg")
    value = data.draw(bad[arg], label=arg)
    key = {"learning_rate": "lr"}.get(arg, arg)
    group: dict[str, Any] = {"params": [nn.Parameter(torch.ones(2))]}
    group[key] = value
    if arg == "params":
        group = {"params": value} if not isinstance(value, list) or value else {}
        if isinstance(value, list) and value and isinstance(value[0], dict):
            group = value[0]
    state = _tf_state(opt, net)
    with pytest.raises((ValueError, TypeError)) as info:
        opt.add_param_group(group)
    culprit = r"params|parameter \d+ of param group" if arg == "params" else repr(key)
    assert re.search(culprit, str(info.value)), info.value
    assert len(opt.param_groups) == 2
    assert_same(_tf_state(opt, net), state)


@EXAMPLES
@given(data=st.data(), name=st.sampled_from(sorted(OPTIMIZERS)), group=st.integers(0, 1))
def test_a_step_with_a_bad_group_value_changes_nothing(data, name, group):
    """A scheduler (or the user) may set any group value; the step checks all groups first."""
    opt, net = _stepped(name)
    _, bad = OPTIMIZERS[name]
    arg = data.draw(st.sampled_from(sorted(set(bad) - {"params"})), label="arg")
    key = {"learning_rate": "lr"}.get(arg, arg)
    net(torch.ones(2, 3)).sum().backward()
    state = _tf_state(opt, net)
    opt.param_groups[group][key] = data.draw(bad[arg], label=arg)
    with pytest.raises((ValueError, TypeError), match=f"{key!r} of param group {group}"):
        opt.step()
    assert_same(_tf_state(opt, net)[1], state[1])
    assert_same(snapshot(opt)["state"], state[0]["state"])


@EXAMPLES
@given(
    name=st.sampled_from(sorted(OPTIMIZERS)),
    dtype=st.sampled_from([torch.complex64, torch.complex128]),
    sparse=st.booleans(),
)
def test_a_step_with_a_parameter_turned_complex_changes_nothing(name, dtype, sparse):
    opt, net = _stepped(name)
    net(torch.ones(2, 3)).sum().backward()
    w = net[1].weight
    w.data = torch.ones(2, 4, dtype=dtype)
    w.grad = torch.ones(2, 4, dtype=dtype)
    if sparse:
        w.grad = w.grad.to_sparse()
    state = _tf_state(opt, net)
    with pytest.raises(TypeError, match=f"param group 1 is {dtype}"):
        opt.step()
    assert_same(_tf_state(opt, net), state)


# (mutation, what the error names)
TF_STATE_MUTATIONS = {
    "state not a dict": r"'state'",
    "groups not a list": r"param_groups|param group 0",
    "one group more": r"param groups",
    "group not a dict": r"param group 0",
    "params not a list": r"param group 0",
    "hyper-parameter": r"of param group 1|param group 1 has no",
    "hyper-parameter missing": r"param group 1 has no",
    "one parameter less": r"param group 1",
    "a parameter id twice": r"parameter id",
    "an unknown id": r"parameter ids \[99\]",
    "keys as strings": r"parameter ids \['",
    "slot shape": r"slot .* of parameter",
    "slot kind": r"slot .* of parameter",
    "slot names": r"expected the slots",
}


@EXAMPLES
@given(
    name=st.sampled_from(sorted(set(OPTIMIZERS) - {"GradientDescentOptimizer"})),
    mutation=st.sampled_from(sorted(TF_STATE_MUTATIONS)),
    junk=GARBAGE,
    data=st.data(),
)
def test_tf_optimizer_load_of_a_corrupted_state_dict_changes_nothing(name, mutation, junk, data):
    source, _ = _stepped(name)
    sd = copy.deepcopy(source.state_dict())
    groups, state = sd["param_groups"], sd["state"]
    first = groups[1]["params"][0]
    if mutation == "state not a dict":
        sd["state"] = junk if not isinstance(junk, dict) else [junk]
    elif mutation == "groups not a list":
        sd["param_groups"] = junk if not isinstance(junk, list) else [1, 2]
    elif mutation == "one group more":
        groups.append(copy.deepcopy(groups[0]))
    elif mutation == "group not a dict":
        groups[0] = junk if not isinstance(junk, dict) else [junk]
    elif mutation == "params not a list":
        groups[0]["params"] = junk if not isinstance(junk, list) else tuple(junk)
    elif mutation in ("hyper-parameter", "hyper-parameter missing"):
        _, bad = OPTIMIZERS[name]
        arg = data.draw(st.sampled_from(sorted(set(bad) - {"params"})), label="arg")
        key = {"learning_rate": "lr"}.get(arg, arg)
        if mutation == "hyper-parameter":
            groups[1][key] = data.draw(bad[arg], label=arg)
        else:
            del groups[1][key]
    elif mutation == "one parameter less":
        groups[1]["params"].pop()
    elif mutation == "a parameter id twice":
        groups[1]["params"][1] = first
    elif mutation == "an unknown id":
        state[99] = copy.deepcopy(state[first])
    elif mutation == "keys as strings":
        sd["state"] = {str(k): v for k, v in state.items()}
    elif mutation == "slot names":
        state[first] = {"x" + k: v for k, v in state[first].items()}
    else:
        slot = sorted(state[first])[0]
        if mutation == "slot shape":
            state[first][slot] = torch.zeros(3, 5)
        else:
            value = state[first][slot]
            state[first][slot] = data.draw(st.sampled_from(
                [value.to(torch.int64), value.to(torch.complex64), value.to_sparse(), junk]
            ))
    opt, net = _stepped(name, _net())
    before = _tf_state(opt, net)
    with pytest.raises((ValueError, TypeError)) as info:
        opt.load_state_dict(sd)
    assert re.search(TF_STATE_MUTATIONS[mutation], str(info.value)), info.value
    assert_same(_tf_state(opt, net), before)


@EXAMPLES
@given(
    name=st.sampled_from(sorted(OPTIMIZERS)),
    other=st.sampled_from([*sorted(OPTIMIZERS), "torch.optim.Adam", "another model"]),
)
def test_tf_optimizer_load_of_another_optimizer_or_model_changes_nothing(name, other):
    if other == name:
        other = "another model"
    if other == "another model":
        # Other shapes, and one parameter less (GradientDescent's state has no shapes).
        bigger = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2, bias=False))
        sd = _stepped(name, bigger)[0].state_dict()
    elif other == "torch.optim.Adam":
        net = _net()
        adam = torch.optim.Adam([{"params": net[0].parameters()}, {"params": net[1].parameters()}])
        net(torch.ones(2, 3)).sum().backward()
        adam.step()
        sd = adam.state_dict()
    else:
        sd = _stepped(other)[0].state_dict()
    opt, net = _stepped(name)
    before = _tf_state(opt, net)
    with pytest.raises(ValueError, match=r"has no|expected the slots|shape|parameters in the"):
        opt.load_state_dict(sd)
    assert_same(_tf_state(opt, net), before)
