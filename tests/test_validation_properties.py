"""Property suite: generated bad values at every public entry point of the library.

For each constructor argument, each ``load_state_dict`` and each method that changes state,
hypothesis draws values of the wrong type, out of range or non-finite, and asserts what
docs/validation.md promises: a ``ValueError`` or ``TypeError`` whose message names the
argument (or the state-dict key), and, for objects that exist already, a state identical
before and after, bit for bit. ``HYPOTHESIS_PROFILE=ci`` runs the same examples every time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from state_snapshots import assert_same, snapshot
from torch import nn

import polyak
from polyak import schedules
from polyak import transforms as T

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
    finite_only: bool = False,
) -> st.SearchStrategy[Any]:
    """Numbers outside ``[low, high]`` (``(low, high]`` with ``low_open``), non-finite ones
    (except with ``finite_only``: for arguments where an infinite value is allowed), and
    values that are not numbers."""
    parts: list[st.SearchStrategy[Any]] = [NOT_A_NUMBER]
    if low is not None:
        below = st.floats(max_value=low, exclude_max=not low_open, allow_nan=False)
        parts.append(below.filter(math.isfinite) if finite_only else below)
    if high is not None:
        above = st.floats(min_value=high, exclude_min=True, allow_nan=False)
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
    assert arg in str(info.value), f"{label}({arg}=...): {info.value}"


def test_every_public_constructor_is_covered():
    labels = {label for label, *_ in CONSTRUCTORS}
    for name in T.__all__:
        if name not in ("GradientStep", "Transform", "chain"):  # chain: checked below
            assert f"transforms.{name}" in labels, name
    for name in schedules.__all__:
        if name != "Schedule":
            assert f"schedules.{name}" in labels, name
    for name in polyak.__all__:
        if name not in ("IncompatibleKeys", "__version__", "schedules", "transforms"):
            assert name in labels, name


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
    opt = polyak.Optimizer(torch.optim.Adam(model.named_parameters()), list(transforms))
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
