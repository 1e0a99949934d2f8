"""Hyperparameter presets: ``paper`` and ``zoo``, then ``--set`` overrides on top.

``paper``
    The config dataclass defaults (``polyak.rl.config``). DDPG: Lillicrap et al. 2016, Sec. 7 /
    Supplementary: 400/300 ReLU, Adam lr 1e-4 (actor) / 1e-3 (critic), L2 1e-2 on the critic,
    gamma 0.99, tau 0.001, batch 64, replay 1e6, OU noise theta 0.15 sigma 0.2, output layers
    U(-3e-3, 3e-3). TD3: Fujimoto et al. 2018, Table 3. DQN: Mnih et al. 2015 (Nature), Extended
    Data Table 1, where it applies to small MLP tasks: lr 2.5e-4, batch 32, replay 1e6, target
    copied every 10k steps, train every 4 steps, 50k warm-up steps, epsilon 1 -> 0.1, Huber loss.

``zoo``
    The tuned public hyperparameters of rl-baselines3-zoo (github.com/DLR-RM/rl-baselines3-zoo,
    ``hyperparams/ddpg.yml``, ``td3.yml``, ``dqn.yml``; DQN CartPole-v1/MountainCar-v0 also in
    ``hyperparams/python/dqn.py``) over Stable-Baselines3 2.x's constructor defaults (which the
    zoo files only override). The ``-v0`` Pendulum entries of older zoo files are the same
    settings as today's ``Pendulum-v1`` (gymnasium renamed the environment).

Deviations, on purpose: DDPG keeps the paper's critic (Lillicrap et al. 2016: the action joins at
the second layer, ``action_layer=1``) in both presets, where SB3 concatenates it at the input; the
parameter count differs by ``action_dim * 400`` weights. Zoo's Pendulum DDPG uses ``train_freq: [1,
"episode"]`` with ``gradient_steps: -1`` (one gradient step per collected step, run at each episode
end); Pendulum episodes are always 200 steps, and here that is ``train_freq=1, gradient_steps=1``:
the same number of gradient steps on the same data, interleaved per step. DQN on CartPole-v1 adds an
evaluation-only setting, ``eval_ema_decay=0.9999`` with ``eval_ema_num_updates``: every greedy
evaluation (the reported final policy included) acts with a Polyak average of the online Q-network's
weights over about the last ninth of the gradient steps, while training, its targets and exploration
are the zoo's, step for step. With the zoo's settings the online network's greedy policy swings
between 500 and about 100 from one training burst to the next, in SB3 as here; the average was
chosen on held-out seeds (docs/results.md). It also sets ``keep_best``, which rl-baselines3-zoo's
training script does with its evaluation callback: the run delivers the averaged network of its best
evaluation (ties: the latest) and reports it on held-out episodes (``polyak.rl.best``); without it,
a run whose training has collapsed in its last few thousand steps delivers a collapsed policy
(docs/results.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polyak.rl.config import FLAG_KEYS, PRESETS, RunConfig, config_class
from polyak.rl.validation import ConfigError, validate_config

__all__ = ["PRESETS", "SB3_DEFAULTS", "ZOO", "make_config"]

# Stable-Baselines3 2.x constructor defaults (DDPG/TD3/DQN.__init__, TD3Policy net_arch [400, 300],
# DQNPolicy net_arch [64, 64]); the zoo files override some of them per environment.
_SB3_ACTOR_CRITIC: dict[str, Any] = {
    "net_arch": [400, 300],
    "final_init": 0.0,
    "actor_lr": 1e-3,
    "critic_lr": 1e-3,
    "critic_l2": 0.0,
    "buffer_size": 1_000_000,
    "learning_starts": 100,
    "batch_size": 256,
    "tau": 0.005,
    "gamma": 0.99,
    "train_freq": 1,
    "gradient_steps": 1,
    "noise_type": "none",
    "ou_theta": 0.15,
    "ou_dt": 1e-2,
}
SB3_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpg": dict(_SB3_ACTOR_CRITIC),
    "td3": {
        **_SB3_ACTOR_CRITIC,
        "policy_delay": 2,
        "target_policy_noise": 0.2,
        "target_noise_clip": 0.5,
    },
    "dqn": {
        "net_arch": [64, 64],
        "final_init": 0.0,
        "learning_rate": 1e-4,
        "buffer_size": 1_000_000,
        "learning_starts": 100,
        "batch_size": 32,
        "tau": 1.0,
        "gamma": 0.99,
        "train_freq": 4,
        "gradient_steps": 1,
        "target_update_interval": 10_000,
        "eps_fraction": 0.1,
        "eps_initial": 1.0,
        "eps_final": 0.05,
        "max_grad_norm": 10.0,
        "loss": "huber",
    },
}

# Per-environment zoo entries, field names translated to ours (learning_rate -> actor_lr and
# critic_lr: SB3 uses one rate for both; exploration_* -> eps_*; policy_kwargs.net_arch ->
# net_arch; n_timesteps -> total_steps, used when --total-steps is not given).
_ZOO_PENDULUM = {
    "total_steps": 20_000,
    "gamma": 0.98,
    "buffer_size": 200_000,
    "learning_starts": 10_000,
    "noise_type": "normal",
    "noise_std": 0.1,
    "actor_lr": 1e-3,
    "critic_lr": 1e-3,
    "net_arch": [400, 300],
}
_ZOO_MOUNTAINCAR_CONT = {"total_steps": 300_000, "noise_type": "ou", "noise_std": 0.5}
ZOO: dict[str, dict[str, dict[str, Any]]] = {
    "ddpg": {
        "Pendulum-v1": _ZOO_PENDULUM,
        "MountainCarContinuous-v0": _ZOO_MOUNTAINCAR_CONT,
    },
    "td3": {
        "Pendulum-v1": {
            "total_steps": 100_000,
            "noise_type": "normal",
            "noise_std": 0.1,
            "learning_starts": 1000,
        },
        "MountainCarContinuous-v0": _ZOO_MOUNTAINCAR_CONT,
    },
    "dqn": {
        "CartPole-v1": {
            "total_steps": 50_000,
            "learning_rate": 2.3e-3,
            "batch_size": 64,
            "buffer_size": 100_000,
            "learning_starts": 1000,
            "gamma": 0.99,
            "target_update_interval": 10,
            "train_freq": 256,
            "gradient_steps": 128,
            "eps_fraction": 0.16,
            "eps_final": 0.04,
            "net_arch": [256, 256],
            # polyak's addition, evaluation only (training is the zoo's): greedy actions come
            # from the num_updates-averaged Q-network (docs/results.md: chosen on seeds 100-111).
            "eval_ema_decay": 0.9999,
            "eval_ema_num_updates": True,
            # ... and the run delivers its best-evaluated average (docs/results.md: seeds 200-223).
            "keep_best": True,
        },
        "MountainCar-v0": {
            "total_steps": 120_000,
            "learning_rate": 4e-3,
            "batch_size": 128,
            "buffer_size": 10_000,
            "learning_starts": 1000,
            "gamma": 0.98,
            "target_update_interval": 600,
            "train_freq": 16,
            "gradient_steps": 8,
            "eps_fraction": 0.2,
            "eps_final": 0.07,
            "net_arch": [256, 256],
        },
        "Acrobot-v1": {
            "total_steps": 100_000,
            "learning_rate": 6.3e-4,
            "batch_size": 128,
            "buffer_size": 50_000,
            "learning_starts": 0,
            "gamma": 0.99,
            "target_update_interval": 250,
            "train_freq": 4,
            "gradient_steps": -1,
            "eps_fraction": 0.12,
            "eps_final": 0.1,
            "net_arch": [256, 256],
        },
    },
}


def make_config(
    algo: str,
    env: str,
    preset: str = "paper",
    *,
    total_steps: int | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Build the config of a run: class defaults, then the preset, then ``overrides``, and
    check it (``polyak.rl.validation.validate_config``).

    ``total_steps=None`` takes ``overrides["total_steps"]``, else the zoo's ``n_timesteps`` for
    the environment when the preset has one, and is an error otherwise. ``algo``, ``env``,
    ``preset`` and ``seed`` come from their arguments only: in ``overrides`` they are refused.
    """
    cls = config_class(algo)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    overrides = overrides or {}
    flagged = [key for key in overrides if key in FLAG_KEYS]
    if flagged:
        raise ConfigError(
            [
                (
                    key,
                    f"{key}={overrides[key]!r} cannot be set with --set (overrides): it has its "
                    f"own argument, {FLAG_KEYS[key]}",
                )
                for key in flagged
            ]
        )
    if (
        total_steps is not None
        and "total_steps" in overrides
        and overrides["total_steps"] != total_steps
    ):
        raise ConfigError(
            [
                (
                    "total_steps",
                    f"total_steps given twice: --total-steps {total_steps} and --set "
                    f"total_steps={overrides['total_steps']!r}; give one",
                )
            ]
        )
    values: dict[str, Any] = {}
    if preset == "zoo":
        table = ZOO[algo]
        if env not in table:
            raise ValueError(
                f"the zoo preset has no {algo} hyperparameters for {env!r}; it has "
                f"{', '.join(sorted(table))}. Use --preset paper, or set fields with --set."
            )
        values.update(SB3_DEFAULTS[algo])
        values.update(table[env])
    default_steps = values.pop("total_steps", None)
    values.update(overrides)
    steps = total_steps if total_steps is not None else values.pop("total_steps", default_steps)
    if steps is None:
        raise ValueError(f"{algo} on {env}: give --total-steps N (N > 0)")
    values.update(algo=algo, env=env, preset=preset, total_steps=steps, seed=seed)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown keys for {cls.__name__}: {', '.join(unknown)}")
    config = cls(**values)
    validate_config(config)
    return config
