"""Unit tests of polyak.rl's pieces: spaces, replay, noise, networks, targets, updates, config."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gymnasium")
import gymnasium as gym

import polyak
from polyak.rl import dqn as dqn_mod
from polyak.rl import replay as replay_mod
from polyak.rl.agent import adam
from polyak.rl.config import DDPGConfig, DQNConfig, TD3Config, parse_overrides
from polyak.rl.ddpg import DDPG, deterministic_policy_gradient_step
from polyak.rl.dqn import DQN, linear_epsilon
from polyak.rl.loop import make_agent
from polyak.rl.networks import Critic, QNetwork
from polyak.rl.noise import GaussianNoise, OrnsteinUhlenbeckNoise
from polyak.rl.presets import make_config
from polyak.rl.replay import Batch, ReplayBuffer, minibatch
from polyak.rl.td3 import TD3

CPU = torch.device("cpu")


def _batch(obs_dim=3, action_dim=1, n=4, discrete_actions=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    actions = (
        torch.as_tensor(discrete_actions)
        if discrete_actions is not None
        else torch.rand(n, action_dim, generator=g) * 2 - 1
    )
    return Batch(
        obs=torch.randn(n, obs_dim, generator=g),
        actions=actions,
        rewards=torch.randn(n, generator=g),
        next_obs=torch.randn(n, obs_dim, generator=g),
        terminated=torch.tensor([1.0, 0.0, 0.0, 1.0][:n]),
        truncated=torch.tensor([0.0, 1.0, 0.0, 0.0][:n]),
    )


# --- spaces -------------------------------------------------------------------------------


def test_dqn_refuses_continuous_actions_and_ddpg_refuses_discrete():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"dqn.*needs a Discrete action space.*ddpg or td3"):
        make_agent(DQNConfig(env="Pendulum-v1"), gym.make("Pendulum-v1"), rng)
    with pytest.raises(ValueError, match=r"ddpg.*needs continuous \(Box\) actions.*dqn"):
        make_agent(DDPGConfig(env="CartPole-v1"), gym.make("CartPole-v1"), rng)


def test_unsupported_observation_space_is_named():
    from polyak.rl.spaces import check_observations

    with pytest.raises(ValueError, match="unsupported observation space Discrete"):
        check_observations(gym.spaces.Discrete(3), "dqn")


# --- replay -------------------------------------------------------------------------------


def test_replay_stores_terminated_and_truncated_separately_and_wraps():
    rb = ReplayBuffer(3, obs_dim=2, action_dim=0, rng=np.random.default_rng(0))
    for i in range(4):  # the 4th overwrites row 0
        rb.add(np.full(2, i), i % 2, float(i), np.full(2, i + 0.5), i == 1, i == 2)
    assert len(rb) == 3 and rb.pos == 1
    b = rb.sample(64)
    assert b.actions.dtype == torch.int64
    rewards = b.rewards.tolist()
    assert set(rewards) == {1.0, 2.0, 3.0}  # 0 was overwritten
    for r, term, trunc, a, o, no in zip(
        rewards, b.terminated, b.truncated, b.actions, b.obs, b.next_obs, strict=True
    ):
        assert term == (r == 1.0) and trunc == (r == 2.0)
        assert a == int(r) % 2 and torch.all(o == r) and torch.all(no == r + 0.5)


def test_replay_state_dict_roundtrip():
    rng = np.random.default_rng(0)
    rb = ReplayBuffer(10, obs_dim=3, action_dim=2, rng=rng)
    for i in range(7):
        rb.add(np.ones(3) * i, np.array([0.5, -0.5]), 1.0, np.zeros(3), False, True)
    other = ReplayBuffer(10, obs_dim=3, action_dim=2, rng=np.random.default_rng(0))
    other.load_state_dict(rb.state_dict())
    assert (other.pos, other.size) == (7, 7)
    assert np.array_equal(other._data, rb._data)


def _filled_replay(seed=0, n=50, action_dim=0):
    rb = ReplayBuffer(64, obs_dim=3, action_dim=action_dim, rng=np.random.default_rng(seed))
    for i in range(n):
        action = i % 3 if action_dim == 0 else np.full(action_dim, i / n)
        rb.add(np.full(3, i), action, float(i), np.full(3, i + 0.5), i % 7 == 0, i % 11 == 0)
    return rb


def test_sample_burst_draws_all_indices_at_once_and_n1_is_sample():
    a, b = _filled_replay(), _filled_replay()
    for x, y in zip(a.sample(8), b.sample_burst(1, 8), strict=True):
        assert torch.equal(x, y)
    # One draw of shape (n, batch): minibatch k is row k of the index matrix.
    idx = np.random.default_rng(0).integers(0, 50, size=(5, 8))
    burst = _filled_replay().sample_burst(5, 8)
    assert burst.obs.shape == (40, 3) and burst.actions.shape == (40,)
    for k in range(5):
        mb = minibatch(burst, k, 8)
        assert mb.rewards.tolist() == [float(i) for i in idx[k]]
        assert mb.actions.tolist() == [int(i) % 3 for i in idx[k]]
        assert torch.equal(mb.next_obs[:, 0], mb.rewards + 0.5)
        assert mb.terminated.tolist() == [float(i % 7 == 0) for i in idx[k]]


def test_dqn_burst_with_frozen_target_equals_step_by_step():
    """The batched targets of a burst are the per-step targets: same losses, same weights."""
    burst = _filled_replay().sample_burst(6, 8)
    fast = _dqn(target_update_interval=4, learning_rate=0.01, max_grad_norm=10.0)
    slow = _dqn(target_update_interval=4, learning_rate=0.01, max_grad_norm=10.0)
    with torch.no_grad():  # a target that differs from the online network
        for p in fast.q_target.module.parameters():
            p.add_(0.5)
        for p in slow.q_target.module.parameters():
            p.add_(0.5)
    frozen = [p.clone() for p in fast.q_target.module.parameters()]
    losses = fast.train_burst(burst, 6)
    for k in range(6):
        expected = slow.train_step(minibatch(burst, k, 8))
    torch.testing.assert_close(losses["loss"], expected["loss"])
    for x, y in zip(fast.q.parameters(), slow.q.parameters(), strict=True):
        torch.testing.assert_close(x, y)
    # The online net moved, the hard target did not (copies happen only in on_env_step).
    assert all(torch.equal(a, p) for a, p in zip(frozen, fast.q_target.module.parameters()))
    assert not torch.equal(next(fast.q.parameters()), next(_dqn().q.parameters()))


def test_dqn_steps_equal_the_textbook_loop_bit_for_bit():
    """A DQN burst is exactly the plain torch loop that Stable-Baselines3 writes (frozen
    target, Huber loss on ``Q(s, a)``, clipping by global norm, Adam), with TF's clip factor
    ``c * min(1 / norm, 1 / c)``: the same bits, on the same minibatches."""
    n, b, clip = 12, 16, 0.5
    agent = _dqn(target_update_interval=4, learning_rate=0.01, max_grad_norm=clip, gamma=0.9)
    plain = QNetwork(3, 3, [16])
    plain.load_state_dict(agent.q.state_dict())
    target = QNetwork(3, 3, [16])
    target.load_state_dict(agent.q_target.module.state_dict())
    opt = adam(plain.parameters(), 0.01)
    burst = _filled_replay().sample_burst(n, b)
    agent.train_burst(burst, n)
    clipped = 0
    for k in range(n):
        mb = minibatch(burst, k, b)
        with torch.no_grad():
            y = mb.rewards + 0.9 * (1.0 - mb.terminated) * target(mb.next_obs).max(1).values
        q_sa = plain(mb.obs).gather(1, mb.actions.unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q_sa, y)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in plain.parameters()]
        norm = torch.stack(torch._foreach_norm(grads)).square().sum().sqrt()
        clipped += int(norm > clip)
        torch._foreach_mul_(grads, clip * torch.clamp_max(norm.reciprocal(), 1.0 / clip))
        opt.step()
    assert clipped > 0  # the clip was active
    for x, y in zip(agent.q.parameters(), plain.parameters(), strict=True):
        assert torch.equal(x, y)


def test_dqn_burst_targets_in_row_pieces_equal_step_by_step():
    """A burst larger than one target piece (CPU: 512 rows; here 3 pieces, the last one
    partial) gives the per-step targets, hence the same losses and weights."""
    n, b = 20, 64
    assert n * b > dqn_mod._CPU_TARGET_ROWS * 2
    burst = _filled_replay().sample_burst(n, b)
    fast = _dqn(target_update_interval=4, learning_rate=0.01)
    slow = _dqn(target_update_interval=4, learning_rate=0.01)
    losses = fast.train_burst(burst, n)
    for k in range(n):
        expected = slow.train_step(minibatch(burst, k, b))
    torch.testing.assert_close(losses["loss"], expected["loss"])
    for x, y in zip(fast.q.parameters(), slow.q.parameters(), strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("kw", [{"double_dqn": True}, {"target_update_interval": 0, "tau": 0.5}])
def test_dqn_burst_falls_back_to_step_by_step(kw):
    """Double DQN's and soft targets change during a burst: the per-step path, bit for bit."""
    burst = _filled_replay().sample_burst(4, 8)
    fast, slow = _dqn(learning_rate=0.01, **kw), _dqn(learning_rate=0.01, **kw)
    fast.train_burst(burst, 4)
    for k in range(4):
        slow.train_step(minibatch(burst, k, 8))
    for x, y in zip(fast.q.parameters(), slow.q.parameters(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(fast.q_target.module.parameters(), slow.q_target.module.parameters()):
        assert torch.equal(x, y)


def test_replay_memory_is_checked_up_front(monkeypatch):
    monkeypatch.setattr(replay_mod, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"MiB of memory is available.*buffer_size"):
        ReplayBuffer(1000, obs_dim=3, action_dim=1, rng=np.random.default_rng(0))
    ReplayBuffer(10, obs_dim=3, action_dim=1, rng=np.random.default_rng(0))  # 10*10*4 fits


# --- noise ------------------------------------------------------------------------------


def test_ou_noise_follows_euler_maruyama_and_resets():
    noise = OrnsteinUhlenbeckNoise(2, np.random.default_rng(1), std=0.3, theta=0.15, dt=0.01)
    ref = np.random.default_rng(1)
    x = np.zeros(2)
    for _ in range(5):
        x = x + 0.15 * (0 - x) * 0.01 + 0.3 * np.sqrt(0.01) * ref.normal(size=2)
        np.testing.assert_allclose(noise(), x)
    noise.reset()
    assert np.all(noise.x == 0)


def test_gaussian_noise_std():
    g = GaussianNoise(3, np.random.default_rng(0), 0.1)
    samples = np.stack([g() for _ in range(4000)])
    assert samples.shape == (4000, 3)
    assert abs(samples.std() - 0.1) < 0.005


# --- networks -----------------------------------------------------------------------------


@pytest.mark.parametrize("action_layer", [0, 1])
def test_critic_equals_concatenation_form(action_layer):
    torch.manual_seed(0)
    critic = Critic(3, 2, [8, 6], action_layer=action_layer)
    s, a = torch.randn(5, 3), torch.randn(5, 2)
    x = s
    for i, layer in enumerate(critic.layers):
        if i == action_layer:  # one Linear over [x, a] with W = [W_x, W_a]
            w = torch.cat([layer.weight, critic.action_in.weight], dim=1)
            x = torch.cat([x, a], dim=1) @ w.T + layer.bias
        else:
            x = layer(x)
        if i < len(critic.layers) - 1:
            x = torch.relu(x)
    torch.testing.assert_close(critic(s, a), x.squeeze(-1))


# --- DDPG ---------------------------------------------------------------------------------


def _ddpg(**kw) -> DDPG:
    torch.manual_seed(0)
    cfg = DDPGConfig(env="x", net_arch=[16, 12], total_steps=10, **kw)
    return DDPG(cfg, 3, 2, np.random.default_rng(0), CPU)


def test_ddpg_actor_gradient_is_autograd_gradient_of_minus_mean_q():
    agent = _ddpg()
    obs = torch.randn(7, 3)
    actor_ref, critic_ref = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic)
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    before = [p.detach().clone() for p in agent.actor.parameters()]
    opt = polyak.Optimizer(torch.optim.SGD(agent.actor.parameters(), lr=1.0))
    step = polyak.GlobalStep()
    loss = deterministic_policy_gradient_step(agent.actor, agent.critic, opt, obs, step)

    ref_loss = -critic_ref(obs, actor_ref(obs)).mean()
    ref_grads = torch.autograd.grad(ref_loss, list(actor_ref.parameters()))
    for b, p, g in zip(before, agent.actor.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(b - p.detach(), g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, ref_loss.detach())
    assert int(step) == 1
    # Nothing flowed into the critic: same weights, no .grad.
    for b, p in zip(critic_before, agent.critic.parameters(), strict=True):
        assert torch.equal(b, p) and p.grad is None


def test_ddpg_critic_target_bootstraps_on_truncation_only():
    agent = _ddpg(gamma=0.9, critic_lr=0.0, actor_lr=0.0, tau=0.0)
    b = _batch(action_dim=2)
    q_next = agent.critic_target(b.next_obs, agent.actor_target(b.next_obs)).detach()
    y = b.rewards + 0.9 * torch.tensor([0.0, 1.0, 1.0, 0.0]) * q_next  # rows 0, 3 terminated
    expected = torch.mean((agent.critic(b.obs, b.actions).detach() - y) ** 2)
    losses = agent.train_step(b)
    torch.testing.assert_close(losses["critic_loss"], expected)


def test_ddpg_targets_move_by_tau():
    agent = _ddpg(tau=0.25)
    old_target = [p.detach().clone() for p in agent.critic_target.module.parameters()]
    agent.train_step(_batch(action_dim=2))
    for old, t, p in zip(
        old_target,
        agent.critic_target.module.parameters(),
        agent.critic.parameters(),
        strict=True,
    ):
        torch.testing.assert_close(t, 0.75 * old + 0.25 * p.detach())


# --- TD3 ----------------------------------------------------------------------------------


def test_td3_delays_actor_and_target_updates_and_uses_twin_minimum():
    torch.manual_seed(0)
    cfg = TD3Config(env="x", net_arch=[16, 12], total_steps=10, policy_delay=2, gamma=0.5)
    agent = TD3(cfg, 3, 2, np.random.default_rng(0), CPU)
    actor0 = [p.detach().clone() for p in agent.actor.parameters()]
    target0 = [p.detach().clone() for p in agent.critic_target.module.parameters()]
    b = _batch(action_dim=2)

    # The critic target with the smoothing noise TD3 will draw (same generator state).
    gen_state = agent.generator.get_state()
    eps = torch.randn(b.actions.shape, generator=agent.generator).mul(0.2).clamp(-0.5, 0.5)
    agent.generator.set_state(gen_state)
    a_next = (agent.actor_target(b.next_obs) + eps).clamp(-1, 1)
    q1n, q2n = agent.critic_target(b.next_obs, a_next)
    y = b.rewards + 0.5 * (1 - b.terminated) * torch.minimum(q1n, q2n)
    q1, q2 = agent.critic(b.obs, b.actions)
    expected = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()

    losses = agent.train_step(b)  # critic step 1: no actor step, no target move
    torch.testing.assert_close(losses["critic_loss"], expected.detach())
    assert "actor_loss" not in losses
    assert all(torch.equal(a, p) for a, p in zip(actor0, agent.actor.parameters(), strict=True))
    assert all(
        torch.equal(a, p)
        for a, p in zip(target0, agent.critic_target.module.parameters(), strict=True)
    )
    losses = agent.train_step(b)  # critic step 2: actor and targets move
    assert "actor_loss" in losses
    assert not all(torch.equal(a, p) for a, p in zip(actor0, agent.actor.parameters(), strict=True))


# --- DQN ----------------------------------------------------------------------------------


def _dqn(**kw) -> DQN:
    torch.manual_seed(0)
    cfg = DQNConfig(env="x", net_arch=[16], total_steps=1000, **kw)
    return DQN(cfg, 3, 3, np.random.default_rng(0), CPU)


@pytest.mark.parametrize("double", [False, True])
def test_dqn_target_by_hand(double):
    agent = _dqn(gamma=0.9, double_dqn=double)
    # Make the target differ from the online network so Double DQN matters.
    with torch.no_grad():
        for p in agent.q.parameters():
            p.add_(torch.randn_like(p))
    b = _batch(discrete_actions=[0, 2, 1, 1])
    qt = agent.q_target(b.next_obs)
    best = agent.q(b.next_obs).argmax(1) if double else qt.argmax(1)
    q_next = qt[torch.arange(4), best]
    y = b.rewards + 0.9 * torch.tensor([0.0, 1.0, 1.0, 0.0]) * q_next  # truncated row 1 bootstraps
    torch.testing.assert_close(agent.td_target(b), y.detach())
    assert not agent.td_target(b).requires_grad


def test_dqn_huber_loss_and_hard_target_every_n_env_steps():
    agent = _dqn(target_update_interval=3, learning_rate=0.1)
    b = _batch(discrete_actions=[0, 2, 1, 1])
    q_sa = agent.q(b.obs)[torch.arange(4), b.actions]
    expected = torch.nn.functional.smooth_l1_loss(q_sa, agent.td_target(b))
    torch.testing.assert_close(agent.train_step(b)["loss"], expected.detach())
    online = [p.detach().clone() for p in agent.q.parameters()]
    stale = [p.detach().clone() for p in agent.q_target.module.parameters()]
    assert not all(torch.equal(a, c) for a, c in zip(online, stale, strict=True))
    agent.on_env_step(1)
    agent.on_env_step(2)
    assert all(
        torch.equal(a, p) for a, p in zip(stale, agent.q_target.module.parameters(), strict=True)
    )
    agent.on_env_step(3)
    assert all(
        torch.equal(a, p) for a, p in zip(online, agent.q_target.module.parameters(), strict=True)
    )


def test_epsilon_schedule():
    cfg = DQNConfig(total_steps=1000, eps_initial=1.0, eps_final=0.1, eps_fraction=0.5)
    assert linear_epsilon(0, cfg) == 1.0
    assert linear_epsilon(250, cfg) == pytest.approx(0.55)
    assert linear_epsilon(500, cfg) == pytest.approx(0.1)
    assert linear_epsilon(900, cfg) == pytest.approx(0.1)


def test_dqn_refuses_hard_interval_with_soft_tau():
    with pytest.raises(ValueError, match="target_update_interval=0"):
        _dqn(target_update_interval=10, tau=0.5)


# --- config and presets -----------------------------------------------------------------


def test_parse_overrides_types_and_unknown_keys():
    got = parse_overrides(
        DQNConfig, ["eval_every=0", "net_arch=64,64", "double_dqn=true", "learning_rate=3e-4"]
    )
    assert got == {"eval_every": 0, "net_arch": [64, 64], "double_dqn": True, "learning_rate": 3e-4}
    assert parse_overrides(DQNConfig, ["total_steps=2e4"]) == {"total_steps": 20000}
    with pytest.raises(ValueError, match=r"unknown key.*valid keys: .*learning_rate"):
        parse_overrides(DQNConfig, ["lr=1"])
    with pytest.raises(ValueError, match="expected a value of type"):
        parse_overrides(DQNConfig, ["batch_size=1.5"])


def test_presets():
    paper = make_config("ddpg", "Pendulum-v1", "paper", total_steps=100)
    assert (paper.actor_lr, paper.critic_lr, paper.critic_l2, paper.tau, paper.batch_size) == (
        1e-4,
        1e-3,
        1e-2,
        1e-3,
        64,
    )
    assert paper.net_arch == [400, 300] and paper.noise_type == "ou"
    zoo = make_config("ddpg", "Pendulum-v1", "zoo")
    assert zoo.total_steps == 20_000 and zoo.gamma == 0.98 and zoo.learning_starts == 10_000
    assert zoo.noise_type == "normal" and zoo.noise_std == 0.1 and zoo.batch_size == 256
    dqn = make_config("dqn", "CartPole-v1", "zoo", overrides={"double_dqn": True})
    assert dqn.total_steps == 50_000 and dqn.train_freq == 256 and dqn.gradient_steps == 128
    assert dqn.double_dqn and dqn.net_arch == [256, 256]
    for env in ("Acrobot-v1", "MountainCar-v0"):
        make_config("dqn", env, "zoo")
    make_config("td3", "MountainCarContinuous-v0", "zoo")
    with pytest.raises(ValueError, match="no dqn hyperparameters for 'LunarLander-v3'"):
        make_config("dqn", "LunarLander-v3", "zoo")
    with pytest.raises(ValueError, match="--total-steps"):
        make_config("dqn", "CartPole-v1", "paper")


def test_dqn_greedy_action_follows_the_live_network():
    """The NumPy acting path reads the current weights: after training and after loading."""
    agent = _dqn(learning_rate=0.05)
    obs = np.random.default_rng(1).normal(size=(200, 3)).astype(np.float32)

    def check():
        q = agent.q(torch.from_numpy(obs)).detach()
        top2 = q.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # skip near-ties (float rounding may differ)
        acts = torch.tensor([agent.act(o, explore=False) for o in obs])
        assert clear.sum() > 150
        assert torch.equal(acts[clear], q.argmax(1)[clear])

    check()
    burst = _filled_replay().sample_burst(3, 8)
    agent.train_burst(burst, 3)
    check()
    other = _dqn(learning_rate=0.05)
    other.q.load_state_dict({k: v + 0.3 for k, v in agent.q.state_dict().items()})
    agent.q.load_state_dict(other.q.state_dict())
    check()
    with torch.no_grad():  # a parameter whose storage is replaced: the views are rebuilt
        agent.q.layers[0].weight.data = agent.q.layers[0].weight.data.clone() * -1.0
    check()


def test_dqn_eval_ema_is_the_average_of_the_online_weights():
    """``eval_ema_decay``: after every gradient step, q_eval <- d * q_eval + (1 - d) * q."""
    agent = _dqn(learning_rate=0.05, eval_ema_decay=0.75)
    assert agent.q_eval is not agent.q
    assert set(agent.networks()) == {"q", "q_target", "q_eval"}
    assert "eval_ema" in agent.stateful()
    start = [p.detach().clone() for p in agent.q.parameters()]
    assert all(torch.equal(a, e) for a, e in zip(start, agent.q_eval.parameters(), strict=True))
    agent.train_step(_batch(discrete_actions=[0, 2, 1, 1]))
    after = [p.detach().clone() for p in agent.q.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(start, after, strict=True))
    for s, a, e in zip(start, after, agent.q_eval.parameters(), strict=True):
        torch.testing.assert_close(e, 0.75 * s + 0.25 * a)
    # Off by default: evaluation acts with the online network, and nothing else is stored.
    plain = _dqn()
    assert plain.q_eval is plain.q and set(plain.stateful()) == {
        "q_target",
        "opt",
        "step",
        "env_step",
    }
    with pytest.raises(ValueError, match="eval_ema_decay"):
        _dqn(eval_ema_decay=1.0)


def test_dqn_eval_ema_num_updates_follows_tf_rule_on_gradient_steps():
    """``eval_ema_num_updates``: the n-th gradient step averages with decay
    ``min(d, (1 + n) / (10 + n))`` (TF's ``num_updates`` rule, n counted after the step)."""
    agent = _dqn(learning_rate=0.05, eval_ema_decay=0.9999, eval_ema_num_updates=True)
    expected = [p.detach().clone().double() for p in agent.q.parameters()]
    batch = _batch(discrete_actions=[0, 2, 1, 1])
    for n in range(1, 6):
        agent.train_step(batch)
        assert int(agent.step) == n
        d = min(0.9999, (1 + n) / (10 + n))  # 0.18, 0.25, ...: far from the cap
        for e, p in zip(expected, agent.q.parameters(), strict=True):
            e.mul_(d).add_(p.detach().double(), alpha=1 - d)
    for e, avg in zip(expected, agent.q_eval.parameters(), strict=True):
        torch.testing.assert_close(avg, e.float(), rtol=1e-5, atol=1e-6)


def test_zoo_cartpole_evaluates_the_averaged_network_and_trains_as_the_zoo():
    """The zoo CartPole-v1 DQN adds only evaluation settings; the other zoo DQN entries and
    every training field are rl-baselines3-zoo's."""
    zoo = make_config("dqn", "CartPole-v1", "zoo")
    assert (zoo.eval_ema_decay, zoo.eval_ema_num_updates, zoo.keep_best) == (0.9999, True, True)
    assert (zoo.learning_rate, zoo.target_update_interval, zoo.eps_final) == (2.3e-3, 10, 0.04)
    for env in ("Acrobot-v1", "MountainCar-v0"):
        other = make_config("dqn", env, "zoo")
        assert (other.eval_ema_decay, other.eval_ema_num_updates, other.keep_best) == (
            0.0,
            False,
            False,
        )
    # One override turns it off: the online network is evaluated, nothing extra is stored.
    online = make_config("dqn", "CartPole-v1", "zoo", overrides={"eval_ema_decay": 0.0})
    agent = DQN(online, 4, 2, np.random.default_rng(0), torch.device("cpu"))
    assert agent.q_eval is agent.q and agent.eval_ema is None


@pytest.mark.parametrize("numpy_path", [True, False])
def test_dqn_greedy_evaluation_acts_with_the_averaged_weights(monkeypatch, numpy_path):
    """With ``eval_ema_decay``, ``act(explore=False)`` is argmax of the EMA network (both the
    NumPy fast path and the torch path), and exploration still acts with the online one."""
    agent = _dqn(learning_rate=0.05, eval_ema_decay=0.9, eps_initial=0.0, eps_final=0.0)
    if not numpy_path:
        monkeypatch.setattr(agent, "_host_layers", lambda net: None)
    agent.train_burst(_filled_replay().sample_burst(3, 8), 3)
    # Flip the online network's output layer (no gradient step, so the average does not move):
    # the online and the averaged greedy actions now disagree wherever there is a clear best.
    with torch.no_grad():
        agent.q.layers[-1].weight.mul_(-1.0)
        agent.q.layers[-1].bias.mul_(-1.0)
    obs = np.random.default_rng(2).normal(size=(200, 3)).astype(np.float32)
    x = torch.from_numpy(obs)

    def clear_argmax(q):
        top2 = q.topk(2, dim=1).values
        return q.argmax(1), (top2[:, 0] - top2[:, 1]) > 1e-4

    q_avg, clear_avg = clear_argmax(agent.q_eval(x).detach())
    q_online, clear_online = clear_argmax(agent.q(x).detach())
    clear = clear_avg & clear_online
    assert clear.sum() > 100
    assert (q_avg[clear] != q_online[clear]).float().mean() > 0.5
    greedy = torch.tensor([agent.act(o, explore=False) for o in obs])
    assert torch.equal(greedy[clear], q_avg[clear])
    explore = torch.tensor([agent.act(o, explore=True) for o in obs])  # epsilon is 0
    assert torch.equal(explore[clear], q_online[clear])
