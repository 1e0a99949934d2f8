"""Run configurations: one dataclass per algorithm, ``--set KEY=VALUE`` parsing, and diffs.

A run is fully described by its config (plus the code): ``config.json`` in the run directory is
``dataclasses.asdict(config)``, and re-running ``train`` on that directory resumes only if the new
config is identical; otherwise :func:`stored_config_diff` names the keys that differ. What values
each field may take is checked by ``polyak.rl.validation``.

The field defaults are the ``paper`` preset (the DDPG paper, TD3 paper, DQN Nature paper); see
``polyak.rl.presets`` for the ``zoo`` values and where each number comes from.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FLAG_KEYS",
    "PRESETS",
    "DDPGConfig",
    "DQNConfig",
    "RunConfig",
    "TD3Config",
    "config_class",
    "config_diff",
    "config_from_dict",
    "parse_int",
    "parse_overrides",
    "stored_config_diff",
]

PRESETS = ("paper", "zoo")  # polyak.rl.presets builds them

# Fields that a run takes from their own argument (command-line flag, make_config argument),
# never from ``--set`` / ``overrides``, which would otherwise be silently overwritten by it.
FLAG_KEYS = {"algo": "ALGO", "env": "--env", "preset": "--preset", "seed": "--seed"}


@dataclass
class RunConfig:
    """Settings shared by every agent: the run, the replay schedule, evaluation and checkpoints."""

    algo: str = ""
    env: str = ""
    preset: str = "paper"
    total_steps: int = 0  # environment steps
    seed: int = 0
    device: str = "cpu"  # any torch device string: "cpu", "cuda", "cuda:1", "mps"
    threads: int = 1  # torch.set_num_threads: results are bitwise-reproducible per thread count
    net_arch: list[int] = field(default_factory=lambda: [400, 300])
    final_init: float = 0.0  # U(-x, x) init of output layers (DDPG paper: 3e-3); 0 = default
    gamma: float = 0.99
    buffer_size: int = 1_000_000
    batch_size: int = 64
    learning_starts: int = 100  # uniform random actions and no training for the first steps
    train_freq: int = 1  # train every `train_freq` environment steps ...
    gradient_steps: int = 1  # ... for this many gradient steps (-1: as many as train_freq)
    tau: float = 0.001  # soft target rate: target <- (1 - tau) target + tau online
    eval_every: int = 5000  # environment steps between evaluations; 0 = final evaluation only
    eval_episodes: int = 10  # deterministic episodes per evaluation
    # Deliver the policy of the best evaluation (ties: the latest) instead of the last weights,
    # and report it on held-out episodes (polyak.rl.best). False: the last weights.
    keep_best: bool = False
    checkpoint_every: int = 5000  # environment steps between checkpoints (and at the end)
    log_every: int = 1000  # environment steps between loss rows in metrics.csv


@dataclass
class DDPGConfig(RunConfig):
    """DDPG (Lillicrap et al. 2016); defaults are the paper's low-dimensional settings."""

    algo: str = "ddpg"
    final_init: float = 3e-3
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    critic_l2: float = 1e-2  # L2 weight decay on the critic
    action_layer: int = 1  # hidden layer the action joins (1: the DDPG paper's; 0: at the input)
    noise_type: str = "ou"  # "ou" | "normal" | "none"
    noise_std: float = 0.2  # sigma, in the normalized [-1, 1] action space
    ou_theta: float = 0.15
    ou_dt: float = 1.0


@dataclass
class TD3Config(DDPGConfig):
    """TD3 (Fujimoto et al. 2018); defaults are the paper's."""

    algo: str = "td3"
    final_init: float = 0.0
    actor_lr: float = 1e-3
    critic_lr: float = 1e-3
    critic_l2: float = 0.0
    action_layer: int = 0
    noise_type: str = "normal"
    noise_std: float = 0.1
    batch_size: int = 100
    tau: float = 0.005
    learning_starts: int = 10_000
    policy_delay: int = 2  # actor and targets update every `policy_delay` critic updates
    target_policy_noise: float = 0.2  # smoothing noise std on the target action
    target_noise_clip: float = 0.5


@dataclass
class DQNConfig(RunConfig):
    """DQN (Mnih et al. 2015, "Nature"); defaults are the paper's where they apply to MLPs."""

    algo: str = "dqn"
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    learning_rate: float = 2.5e-4
    batch_size: int = 32
    learning_starts: int = 50_000
    train_freq: int = 4
    target_update_interval: int = 10_000  # env steps between hard copies; 0 = soft with `tau`
    tau: float = 1.0
    double_dqn: bool = False  # a* = argmax Q_online(s'), valued by Q_target (van Hasselt 2016)
    loss: str = "huber"  # "huber" (the paper's error clipping) | "mse"
    max_grad_norm: float = 0.0  # clip by global norm; 0 = off
    eps_initial: float = 1.0
    eps_final: float = 0.1
    eps_fraction: float = 0.1  # fraction of total_steps over which epsilon anneals linearly
    # Greedy evaluation (act(explore=False), periodic and final evaluations) uses an EMA of the
    # online network's weights with this decay, updated after every gradient step; 0 = off
    # (evaluate the online network). Training and exploration always use the online network.
    eval_ema_decay: float = 0.0
    # TF's num_updates rule for that average, on the gradient-step count n: the decay is
    # min(eval_ema_decay, (1 + n) / (10 + n)), an average over about the last n / 9 steps until
    # the cap binds (n = 90k for 0.9999): the window grows with the run. No effect when
    # eval_ema_decay is 0 (so `--set eval_ema_decay=0` alone turns the zoo CartPole average off).
    eval_ema_num_updates: bool = False


_CLASSES: dict[str, type[RunConfig]] = {"ddpg": DDPGConfig, "td3": TD3Config, "dqn": DQNConfig}


def config_class(algo: str) -> type[RunConfig]:
    """The config dataclass of ``algo`` ("ddpg", "td3" or "dqn")."""
    try:
        return _CLASSES[algo]
    except KeyError:
        raise ValueError(f"unknown algorithm {algo!r}; choose from {sorted(_CLASSES)}") from None


def parse_int(text: str) -> int:
    """A whole number written as an integer (``"20000"``, ``"20_000"``) or a float that is one
    (``"2e4"``); ``ValueError`` for anything else (``"1.5"``, ``"inf"``, ``"nan"``, ``"x"``)."""
    text = text.strip()
    try:
        return int(text)  # exact, however large
    except ValueError:
        value = float(text)
        if not value.is_integer():  # also False for inf and nan
            raise ValueError(f"{text!r} is not a whole number") from None
        return int(value)


def _parse_value(cls: type[RunConfig], key: str, text: str) -> Any:
    hints = typing.get_type_hints(cls)
    kind = hints[key]
    try:
        if kind is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        if kind is int:
            return parse_int(text)
        if kind is float:
            return float(text)
        if kind == list[int]:
            if text.strip().startswith("["):
                items = json.loads(text)
                if not isinstance(items, list):
                    raise ValueError(text)
            else:
                items = text.split(",") if text.strip() else []
            return [parse_int(str(x)) for x in items]
        return text
    except ValueError:
        example = " (64,64 or [64, 64])" if kind == list[int] else ""
        raise ValueError(f"--set {key}={text}: expected a value of type {kind}{example}") from None


def parse_overrides(cls: type[RunConfig], pairs: list[str]) -> dict[str, Any]:
    """Parse ``["key=value", ...]`` into typed values for the fields of ``cls``."""
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        if key not in names:
            raise ValueError(
                f"--set {key}: unknown key for {cls.__name__}; valid keys: {', '.join(names)}"
            )
        out[key] = _parse_value(cls, key, text)
    return out


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a config from ``config.json`` (its ``algo`` picks the class). The values are not
    checked here: ``polyak.rl.validation.validate_config`` does that."""
    if not isinstance(data, dict) or "algo" not in data:
        raise ValueError(f"a config is a JSON object with an 'algo' key, got {str(data)[:80]}")
    cls = config_class(data["algo"])
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config has unknown keys for {cls.__name__}: {', '.join(unknown)}")
    return cls(**data)


def stored_config_diff(stored: dict[str, Any], config: RunConfig) -> list[str]:
    """:func:`config_diff` of a config saved by an earlier run (``config.json``, a checkpoint's
    ``"config"``) against ``config``.

    A field added to the config after the run was made (absent from what it saved) is taken at
    its default: new fields default to the behavior the code had before them.
    """
    old = dict(stored)
    for f in dataclasses.fields(config):
        if f.name not in old:
            if f.default is not dataclasses.MISSING:
                old[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                old[f.name] = f.default_factory()
    return config_diff(old, dataclasses.asdict(config))


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Sorted ``"key: old -> new"`` lines for every key whose value differs (or is missing)."""
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            fa = "(absent)" if a is missing else json.dumps(a)
            fb = "(absent)" if b is missing else json.dumps(b)
            lines.append(f"{key}: {fa} -> {fb}")
    return lines
