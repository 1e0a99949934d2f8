"""Bad input to the library: refused by name, with nothing changed (issue 11's examples).

Each test is one case of the audit: a silently wrong result, an error that left state
half-changed, or an error a user could not act on. The property suite
(test_validation_properties.py) throws generated bad values at every entry point.
"""

import copy

import pytest
import torch
from state_snapshots import assert_same as _assert_same
from state_snapshots import snapshot as _state
from torch import nn

import polyak
from polyak import transforms as T


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _loss(model):
    return model(torch.ones(5, 3)).square().mean()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_params(model, before):
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


# --------------------------------------------------------------------------- Optimizer


def test_load_state_dict_checks_transforms_before_loading_the_inner_optimizer():
    model = _model()
    opt = polyak.Optimizer(torch.optim.Adam(model.parameters()), [T.accumulate(2)], names=model)
    for _ in range(3):  # one optimizer step, one micro-step pending
        opt.minimize(_loss(model))
    saved = _state(opt)
    saved["inner"]["state"][0]["exp_avg"].fill_(7.0)
    saved["transforms"]["0"]["count"] = 5  # k is 2
    other = _model()
    fresh = polyak.Optimizer(torch.optim.Adam(other.parameters()), [T.accumulate(2)], names=other)
    before = _state(fresh)
    with pytest.raises(ValueError, match="'count' must be in \\[0, 2\\)"):
        fresh.load_state_dict(saved)
    _assert_same(_state(fresh), before)


def test_state_of_another_model_is_refused_at_load_naming_the_parameter():
    small = nn.Linear(4, 8)
    other = polyak.Optimizer(torch.optim.Adam(small.parameters()))
    other.minimize(small(torch.ones(2, 4)).sum())
    model = nn.Linear(8, 4)  # same parameter count per group, other shapes
    opt = polyak.Optimizer(torch.optim.Adam(model.parameters()), names=model)
    opt.minimize(model(torch.ones(2, 8)).sum())
    before = _state(opt)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter weight has shape \(8, 4\)"):
        opt.load_state_dict(other.state_dict())
    _assert_same(_state(opt), before)
    opt.minimize(model(torch.ones(2, 8)).sum())  # still usable


@pytest.mark.parametrize(("key", "value"), [("lr", float("nan")), ("betas", (0.9, float("inf")))])
def test_non_finite_hyper_parameters_in_a_loaded_state_are_refused(key, value):
    model = _model()
    opt = polyak.Optimizer(torch.optim.Adam(model.parameters()))
    opt.minimize(_loss(model))
    saved = _state(opt)
    saved["inner"]["param_groups"][0][key] = value
    before = _state(opt)
    with pytest.raises(ValueError, match=f"param group 0 has {key}="):
        opt.load_state_dict(saved)
    _assert_same(_state(opt), before)


def test_minimize_checks_the_loss_before_clearing_grads():
    model = _model()
    opt = polyak.Optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    grads = [torch.full_like(p, 3.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    before = _params(model)
    out = model(torch.ones(5, 3))  # non-scalar
    with pytest.raises(ValueError, match="grad_loss is \\(2,\\)"):
        opt.minimize(out, grad_loss=torch.ones(2))
    with pytest.raises(ValueError, match="No gradients provided"):
        opt.minimize(out.detach())
    with pytest.raises(TypeError, match="global_step"):
        opt.minimize(out.sum(), global_step=3)
    with pytest.raises(TypeError, match=r"loss must be a torch\.Tensor"):
        opt.minimize(1.0)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    _assert_params(model, before)


def test_minimize_puts_dropped_grads_back_when_backward_fails():
    model = _model()
    opt = polyak.Optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = _loss(model)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        opt.minimize(loss)  # the graph is freed
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


def test_a_variable_listed_twice_is_refused_by_name():
    model = _model()
    opt = polyak.Optimizer(torch.optim.SGD(model.parameters(), lr=0.1), names=model)
    w = model[0].weight
    before = _params(model)
    with pytest.raises(ValueError, match=r"\['0.weight'\] listed more than once"):
        opt.apply_gradients([(torch.ones_like(w), w), (torch.ones_like(w), w)])
    with pytest.raises(ValueError, match=r"var_list lists \['0.weight'\]"):
        opt.minimize(_loss(model), var_list=[w, w])
    _assert_params(model, before)


@pytest.mark.parametrize("grads", [True, False])
def test_minimize_skips_flat_parameters_the_loss_does_not_reach(grads):
    """As plain torch (zero_grad sets None) and apply_gradients: unreached parameters keep
    their values, also when their gradient slot was zeroed in place."""
    ref, flat = _model(), polyak.flatten_parameters_(_model(), grads=grads)
    o_ref = torch.optim.Adam(ref.parameters(), lr=0.1)
    opt = polyak.Optimizer(torch.optim.Adam(flat.parameters(), lr=0.1))
    x = torch.ones(5, 3)
    for i in range(4):
        o_ref.zero_grad()
        loss_ref = ref(x).square().mean() if i < 2 else ref[2](ref[1](x @ torch.ones(3, 4)))
        loss_ref.sum().backward()
        o_ref.step()
        loss = flat(x).square().mean() if i < 2 else flat[2](flat[1](x @ torch.ones(3, 4)))
        opt.minimize(loss.sum())
        for a, b in zip(ref.parameters(), flat.parameters()):
            assert torch.equal(a, b)
    assert flat[0].weight.grad is None


# --------------------------------------------------------------------------- transforms


def test_accumulate_refuses_a_change_of_variables_mid_accumulation():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = polyak.Optimizer(
        torch.optim.SGD([a, b], lr=1.0), [T.accumulate(2)], names={"a": a, "b": b}
    )
    opt.apply_gradients([(torch.ones(2), a)])
    before = _state(opt)
    with pytest.raises(ValueError, match=r"micro-step 2 of 2 has 1: \['b'\].*first had 1: \['a'\]"):
        opt.apply_gradients([(torch.full((2,), 3.0), b)])
    _assert_same(_state(opt), before)
    assert torch.equal(b.detach(), torch.zeros(2))
    opt.apply_gradients([(torch.full((2,), 3.0), a)])  # the accumulation goes on
    assert torch.equal(a.detach(), torch.full((2,), -2.0))


def test_masked_with_an_unknown_name_lists_the_known_ones():
    model = _model()
    opt = polyak.Optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        [T.masked(T.scale(0.0), ["weigth"])],
        names=model,
    )
    before = _params(model)
    with pytest.raises(ValueError, match=r"\['weigth'\] name no parameter.*'0.weight'"):
        opt.minimize(_loss(model))
    _assert_params(model, before)
    with pytest.raises(ValueError, match="select is empty"):
        T.masked(T.scale(0.0), [])


def test_masked_names_of_parameters_outside_the_step_are_known():
    model = _model()
    opt = polyak.Optimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        [T.masked(T.scale(0.0), ["2.bias"])],
        names=model,
    )
    opt.minimize(_loss(model), var_list=[model[0].weight])  # 2.bias not in this step


@pytest.mark.parametrize(
    ("make", "hint"),
    [
        (lambda: T.clip_by_global_norm(float("inf")), "omit the transform for no clipping"),
        (lambda: T.clip_by_norm(float("inf")), "omit the transform for no clipping"),
        (lambda: T.adaptive_clip(float("inf")), "omit the transform for no clipping"),
        (lambda: T.scale(float("nan")), "s must be a number"),
        (lambda: T.scale(float("inf")), "s must be finite"),
        (lambda: T.add_noise(eta=float("inf")), "eta must be finite"),
        (lambda: T.add_noise(0.1, gamma=float("nan")), "gamma must be a number"),
        (lambda: T.clip_by_value(float("nan"), 1.0), "lo must be a number"),
        (lambda: T.clip_by_value(-float("inf"), float("inf")), "omit the transform"),
        (lambda: polyak.clip_by_global_norm([torch.ones(2)], float("inf")), "do not clip"),
        (lambda: polyak.clip_by_norm(torch.ones(2), float("inf")), "do not clip"),
        (lambda: polyak.clip_by_value(torch.ones(2), 0.0, float("nan")), "clip_value_max"),
    ],
)
def test_non_finite_hyper_parameters_are_refused_with_what_to_write(make, hint):
    with pytest.raises(ValueError, match=hint):
        make()


def test_one_sided_clip_by_value_keeps_working():
    step = T.clip_by_value(-float("inf"), 1.0)
    assert step.lo == -float("inf") and step.hi == 1.0


# --------------------------------------------------------------------------- GlobalStep


@pytest.mark.parametrize(("by", "error"), [(-3, ValueError), (1.5, TypeError), (True, TypeError)])
def test_global_step_only_moves_forward_by_whole_steps(by, error):
    step = polyak.GlobalStep(4)
    with pytest.raises(error, match="by"):
        step.increment(by)
    assert step.value == 4


# --------------------------------------------------------------------------- averaging


@pytest.mark.parametrize("n", [-5, -1])
def test_negative_num_updates_is_refused(n):
    with pytest.raises(ValueError, match="num_updates"):
        polyak.ExponentialMovingAverage(0.9, num_updates=n)
    with pytest.raises(ValueError, match="num_updates"):
        polyak.ExponentialMovingAverage(0.9, num_updates=torch.tensor(n))


def test_apply_with_one_bad_entry_tracks_none():
    ema = polyak.ExponentialMovingAverage(0.9)
    good = nn.Parameter(torch.ones(2))
    bad = torch.eye(2).to_sparse().requires_grad_()
    with pytest.raises(TypeError, match=r"'bad'.*dense"):
        ema.apply({"good": good, "bad": bad})
    assert ema.state_dict() == {"step": 0, "averages": {}, "values": {}}


def test_a_tensor_listed_under_two_names_is_refused():
    ema = polyak.ExponentialMovingAverage(0.9)
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="'b' is also listed as 'a'"):
        ema.apply({"a": w, "b": w})
    ema.apply({"a": w})
    with pytest.raises(ValueError, match="'b' is also tracked as 'a'"):
        ema.apply({"b": w})
    with pytest.raises(ValueError, match="listed as 'Variable'"):
        polyak.ExponentialMovingAverage(0.9).apply([w, w])


def test_to_an_unusable_device_changes_nothing():
    ema = polyak.ExponentialMovingAverage(0.9)
    ema.apply(_model())
    before = _state(ema)
    bad = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or CUDA absent
    with pytest.raises(ValueError, match="device"):
        ema.to(bad)
    assert ema.device is None
    _assert_same(_state(ema), before)
    with pytest.raises(ValueError, match="device"):
        polyak.ExponentialMovingAverage(0.9, device=bad)


@pytest.mark.parametrize("name", ["float32", "torch.float32", torch.float32])
def test_shadow_dtype_accepts_dtypes_and_their_names(name):
    ema = polyak.ExponentialMovingAverage(0.9, shadow_dtype=name)
    model = _model().double()
    ema.apply(model)
    assert ema.shadow_dtype is torch.float32
    assert ema.average("0.weight").dtype == torch.float32
    ema.to(dtype="float64")
    assert ema.average("0.weight").dtype == torch.float64


@pytest.mark.parametrize(("value", "error"), [("float33", TypeError), ("int32", TypeError),
                                              (32, TypeError)])
def test_bad_shadow_dtype_names_the_argument(value, error):
    with pytest.raises(error, match="shadow_dtype"):
        polyak.ExponentialMovingAverage(0.9, shadow_dtype=value)


def test_forward_in_train_mode_cannot_write_batch_statistics_into_shadows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    ema = polyak.ExponentialMovingAverage(0.9)
    ema.apply(model)
    averaged = ema.average_module(model)
    assert not averaged.training
    before = _state(ema)
    x = torch.randn(8, 3)
    averaged(x)  # eval: reads the shadows
    averaged.train()
    with pytest.raises(RuntimeError, match="'1' of the averaged module is in training mode"):
        averaged(x)
    _assert_same(_state(ema), before)
    averaged[2].train()  # dropout alone may train: it holds no shadow
    averaged[1].eval()
    averaged(x)
    copy.deepcopy(averaged).train()(x)  # a copy holds copies: free to train
    _assert_same(_state(ema), before)


def test_target_network_module_is_in_eval_mode():
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = polyak.TargetNetwork(online, tau=0.1)
    assert not target.module.training
    target(torch.randn(8, 3))


@pytest.mark.parametrize("how", ["attribute", "load_state_dict(assign=True)", "buffer"])
def test_a_replaced_module_tensor_is_not_averaged_from_the_dead_one(how):
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = polyak.ExponentialMovingAverage(0.5)
    ema.apply(model)
    if how == "attribute":
        model[0].weight = nn.Parameter(torch.full((2, 2), 4.0))
        name = "0.weight"
    elif how == "buffer":
        model[1].running_mean = torch.full((2,), 4.0)
        name = "1.running_mean"
    else:
        new = copy.deepcopy(model.state_dict())
        new["0.weight"] = torch.full((2, 2), 4.0)
        model.load_state_dict(new, assign=True)
        name = "0.weight"
    before = _state(ema)
    with pytest.raises(ValueError, match=f"'{name}' is no longer the module's tensor.*track"):
        ema.update()
    _assert_same(_state(ema), before)
    ema.track(model)  # follow the new tensor: its shadow is kept
    ema.update()
    expected = torch.lerp(before["averages"][name], torch.full_like(ema.average(name), 4.0), 0.5)
    assert torch.equal(ema.average(name), expected)


def test_a_replaced_submodule_is_noticed_too():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    ema = polyak.ExponentialMovingAverage(0.5)
    ema.track(model)
    model[2] = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"'2.weight' is no longer.*\(2.weight now holds"):
        ema.update()
    ema.apply(model)  # follows the new submodule's tensors


def test_two_modules_with_the_same_names_cannot_share_one_average():
    """TD3's twin critics have the same parameter names: one average would follow both."""
    critic1, critic2 = _model(), _model()
    ema = polyak.ExponentialMovingAverage(0.5)
    ema.apply(critic1)
    before = _state(ema)
    with pytest.raises(ValueError, match=r"'0.weight' is tracked from another module.*critic2"):
        ema.apply(critic2)
    _assert_same(_state(ema), before)
    with pytest.raises(ValueError, match="tracked from another module"):
        ema.apply(dict(critic2.named_parameters()))
    ema.apply({f"critic2.{n}": p for n, p in critic2.named_parameters()})


def test_replacement_check_costs_nothing_while_no_module_changes():
    model = _model()
    ema = polyak.ExponentialMovingAverage(0.5)
    ema.apply(model)
    calls = []
    real = polyak.averaging.entries.Entry.replaced_in
    polyak.averaging.entries.Entry.replaced_in = lambda self: calls.append(1) or real(self)
    try:
        for _ in range(3):
            ema.update()
        assert not calls
        nn.Linear(2, 2)  # any module assignment anywhere: one look at the owners
        ema.update()
        ema.update()
        assert len(calls) == len(list(model.parameters()))
    finally:
        polyak.averaging.entries.Entry.replaced_in = real


def test_target_network_refuses_decay_and_update_every():
    with pytest.raises(TypeError, match="tau"):
        polyak.TargetNetwork(_model(), tau=0.1, decay=0.5)
    with pytest.raises(TypeError, match="online"):
        polyak.TargetNetwork([nn.Linear(2, 2)])


# --------------------------------------------------------------------------- flat


def test_flatten_parameters_of_a_list_names_the_expected_module():
    with pytest.raises(TypeError, match=r"nn\.Module.*nn\.ParameterList"):
        polyak.flatten_parameters_(list(_model().parameters()))
