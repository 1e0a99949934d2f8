"""polyak.Optimizer: TF's compute/apply/minimize contract over torch optimizers."""

import copy

import pytest
import torch
from torch import nn

import polyak
from polyak import transforms as T


def _model(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)


def _loss(model, device="cpu"):
    torch.manual_seed(1)
    x = torch.randn(16, 4, device=device)
    return model(x).pow(2).mean()


def test_compute_gradients_matches_autograd_and_leaves_grad(device):
    model = _model(device)
    opt = polyak.Optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s
    gv = opt.compute_gradients(_loss(model, device))
    ref = torch.autograd.grad(_loss(model, device), list(model.parameters()))
    assert [v for _, v in gv] == list(model.parameters())
    for (g, _), r in zip(gv, ref):
        torch.testing.assert_close(g, r)
    assert all(p.grad is s for p, s in zip(model.parameters(), sentinel))


def test_grad_loss_seeds_loss_gradient():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = polyak.Optimizer(torch.optim.SGD([w], lr=1.0))
    ((g, _),) = opt.compute_gradients(w * 3, grad_loss=torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(g, torch.tensor([3.0, -6.0]))


@pytest.mark.parametrize("how", ["apply", "minimize"])
def test_sgd_step_by_hand_and_global_step(how):
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = polyak.Optimizer(torch.optim.SGD([w], lr=0.5))
    step = polyak.GlobalStep()
    loss = (w**2).sum()  # grad 2w
    if how == "apply":
        opt.apply_gradients(opt.compute_gradients(loss), global_step=step)
    else:
        opt.minimize(loss, global_step=step)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0 - 0.5 * 2, -2.0 + 0.5 * 4]))
    assert int(step) == 1 and step.value == 1


def test_gradient_dtype_or_device_mismatch_is_named():
    w = torch.nn.Parameter(torch.ones(3))
    opt = polyak.Optimizer(torch.optim.SGD([w], lr=0.1), names={"w": w})
    opt.apply_gradients([(torch.ones(3), w)])
    with pytest.raises(ValueError, match=r"w is torch.float64 on cpu.*g.to\(v\)"):
        opt.apply_gradients([(torch.ones(3, dtype=torch.float64), w)])
    assert torch.equal(w.detach(), torch.full((3,), 0.9))  # nothing moved


def test_unused_variables_skipped_and_all_none_raises():
    used, unused = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = polyak.Optimizer(torch.optim.SGD([used, unused], lr=1.0))
    unused.grad = torch.ones(3)  # stale .grad must not be applied
    gv = opt.compute_gradients(used.sum())
    assert gv[1][0] is None
    opt.apply_gradients(gv)
    torch.testing.assert_close(unused.detach(), torch.ones(3))
    torch.testing.assert_close(used.detach(), torch.zeros(2))
    with pytest.raises(ValueError, match=r"No gradients provided for any variable: .*group0\.1"):
        opt.apply_gradients([(None, unused)])
    with pytest.raises(ValueError, match="No gradients provided"):
        opt.minimize(torch.ones((), requires_grad=True) * 2, var_list=[unused])


def test_names_from_named_parameters_in_errors():
    model = _model()
    try:
        inner = torch.optim.SGD(model.named_parameters(), lr=0.1)
    except TypeError:
        pytest.skip("torch.optim takes named parameters from torch 2.6 on")
    opt = polyak.Optimizer(inner)
    with pytest.raises(ValueError, match=r"2\.bias"):
        opt.apply_gradients([(None, model[2].bias)])
    other = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="not a parameter of the inner optimizer"):
        opt.apply_gradients([(torch.ones(1), other)])
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        polyak.Optimizer(model)


def test_minimize_only_touches_var_list():
    actor, critic = nn.Linear(2, 1), nn.Linear(1, 1)
    opt = polyak.Optimizer(torch.optim.SGD(actor.parameters(), lr=0.1))
    before = copy.deepcopy(critic.state_dict())
    opt.minimize(-critic(actor(torch.ones(3, 2))).mean())
    assert all(p.grad is None for p in critic.parameters())
    assert all(torch.equal(before[k], v) for k, v in critic.state_dict().items())


def test_apply_does_not_modify_callers_gradients():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = polyak.Optimizer(torch.optim.SGD([w], lr=1.0), [T.clip_by_global_norm(1.0)])
    g = torch.tensor([3.0, 4.0])
    opt.apply_gradients([(g, w)])
    torch.testing.assert_close(g, torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 0.6, 4.0 - 0.8]))


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    ],
)
def test_same_as_plain_torch_with_scheduler(make):
    m1, m2 = _model(), _model()
    o1 = make(m1.parameters())
    opt = polyak.Optimizer(make(m2.parameters()))
    s1 = torch.optim.lr_scheduler.StepLR(o1, 2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(opt.inner, 2, gamma=0.5)
    for i in range(5):
        o1.zero_grad()
        _loss(m1).backward()
        o1.step()
        s1.step()
        if i % 2:
            opt.minimize(_loss(m2))
        else:
            opt.apply_gradients(opt.compute_gradients(_loss(m2)))
        s2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == o1.param_groups[0]["lr"]


def test_state_dict_round_trip_and_plain_loadable():
    m = _model()
    opt = polyak.Optimizer(torch.optim.Adam(m.parameters(), lr=1e-2), [T.accumulate(2)])
    opt.minimize(_loss(m))
    opt.minimize(_loss(m))
    opt.minimize(_loss(m))  # accumulator holds one micro-step
    sd = copy.deepcopy(opt.state_dict())  # as torch.save would: no tensor shared with opt
    m2 = copy.deepcopy(m)
    opt2 = polyak.Optimizer(torch.optim.Adam(m2.parameters(), lr=1e-2), [T.accumulate(2)])
    opt2.load_state_dict(sd)
    opt.minimize(_loss(m))
    opt2.minimize(_loss(m2))
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    plain = torch.optim.Adam(_model().parameters(), lr=1e-2)
    plain.load_state_dict(sd["inner"])
    with pytest.raises(ValueError, match="missing keys"):
        opt2.load_state_dict({"inner": sd["inner"]})


def test_global_step_feeds_ema_style_reader():
    step = polyak.GlobalStep()
    w = nn.Parameter(torch.ones(1))
    opt = polyak.Optimizer(torch.optim.SGD([w], lr=0.1))
    for _ in range(3):
        opt.minimize((w * 2).sum(), global_step=step)
    assert int(step) == 3 and step.state_dict() == {"value": 3}
    other = polyak.GlobalStep()
    other.load_state_dict(step.state_dict())
    assert other.value == 3
    with pytest.raises(TypeError, match="GlobalStep"):
        opt.minimize((w * 2).sum(), global_step=3)


def test_sparse_embedding_gradients_pass_through():
    emb = nn.Embedding(5, 2, sparse=True)
    ref = copy.deepcopy(emb)
    idx = torch.tensor([1, 1, 3])
    opt = polyak.Optimizer(torch.optim.SGD(emb.parameters(), lr=1.0), [T.clip_by_global_norm(1e3)])
    opt.minimize(emb(idx).sum())
    with torch.no_grad():
        ref.weight[1] -= 2.0
        ref.weight[3] -= 1.0
    torch.testing.assert_close(emb.weight, ref.weight)
    opt_bad = polyak.Optimizer(torch.optim.SGD(emb.parameters(), lr=1.0), [T.adaptive_clip()])
    with pytest.raises(TypeError, match="sparse"):
        opt_bad.minimize(emb(idx).sum())


def test_apply_never_modifies_callers_gradients_many_tensors():
    """The transforms' copy of the gradients is one fresh buffer (mixed dtypes: one each)."""
    m = _model()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    params = [*m.parameters(), extra]
    opt = polyak.Optimizer(torch.optim.SGD(params, lr=0.1), [T.clip_by_global_norm(1e-3)])
    for _ in range(3):  # repeated steps reuse the cached layouts
        gv = opt.compute_gradients(_loss(m) + extra.square().sum())
        before = [g.clone() for g, _ in gv]
        opt.apply_gradients(gv)
        assert all(torch.equal(g, b) for (g, _), b in zip(gv, before))
        assert all(p.grad is None for p in params)


def test_minimize_reuses_flat_layout_and_follows_relayout():
    """Cached layouts (keyed on pointers) follow a re-flatten and a .grad set by hand."""
    ref, flat = _model(), polyak.flatten_parameters_(_model())
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = polyak.Optimizer(
        torch.optim.SGD(flat.parameters(), lr=0.1), [T.clip_by_value(-0.05, 0.05)]
    )
    for i in range(6):
        o_ref.zero_grad()
        _loss(ref).backward()
        for p in ref.parameters():
            p.grad.clamp_(-0.05, 0.05)
        o_ref.step()
        if i == 2:
            polyak.flatten_parameters_(flat)  # new buffers
        if i == 4:
            for p in flat.parameters():  # stale, non-flat .grad: discarded, not zeroed in place
                p.grad = torch.full_like(p, 7.0)
        opt.minimize(_loss(flat))
        for a, b in zip(ref.parameters(), flat.parameters()):
            assert torch.equal(a, b)


def test_apply_never_overwrites_gradients_a_transform_kept():
    """apply_gradients hands the transforms a copy of the caller's gradients, a fresh one every
    step: a transform that keeps last step's gradients finds them unchanged."""

    class Keep(T.Transform):
        def __init__(self):
            self.kept = []

        def __call__(self, step):
            self.kept.append((step.grads[0].view(-1), step.grads[0].clone()))

    m = _model()
    keep = Keep()
    opt = polyak.Optimizer(
        torch.optim.SGD(m.parameters(), lr=0.1), [T.clip_by_global_norm(1e-3), keep]
    )
    for _ in range(4):
        opt.apply_gradients(opt.compute_gradients(_loss(m)))
    for view, value in keep.kept:
        assert torch.equal(view, value.view(-1))
