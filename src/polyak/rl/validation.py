"""What a run configuration may hold, checked before a run starts.

Every field of every config class has one :class:`Rule` in :data:`RULES`: its type, its range
(inclusive or open ends), its allowed words, and what its special values mean. Every float must
be finite: a ``nan`` learning rate trains a NaN network to the end and reports a number, an
``inf`` gradient-norm cap makes every gradient NaN (write ``0`` for "off" instead). Every integer
fits in an int64 (NumPy's and torch's integers). On top of the per-field rules,
:func:`validate_config` checks what fields require of each other (DQN's hard target copies need
``tau=1``, the critic's ``action_layer`` must be a layer of ``net_arch``) and that ``device``
exists on this machine.

Errors are :class:`ConfigError` (a ``ValueError``), one line per bad key, each naming the key,
the value and what is allowed: ``gamma=2.0: must be a finite number in [0, 1]``. ``polyak train``
prints them without a traceback and exits with status 2.

What needs the environment (its id, its spaces: ``polyak.rl.spaces``) and the machine's memory
(:func:`check_memory`: the replay buffer, the networks and a training burst, estimated before
anything is allocated) is checked when the run builds its environment and agent, still before
anything is written to the run directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from polyak.rl.config import PRESETS, DQNConfig, RunConfig, config_class
from polyak.rl.replay import ReplayBuffer, available_memory

__all__ = ["RULES", "ConfigError", "Rule", "check_memory", "validate_config"]

INT64_MAX = 2**63 - 1


class ConfigError(ValueError):
    """One or more configuration values are not allowed.

    ``problems`` holds ``(key, message)`` pairs; the message names each key, value and rule.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = [message for _, message in problems]
        text = (
            lines[0]
            if len(lines) == 1
            else f"{len(lines)} invalid settings:\n  " + ("\n  ".join(lines))
        )
        super().__init__(text)

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.problems]


@dataclass(frozen=True)
class Rule:
    """What one config field may hold.

    ``kind`` is ``"int"``, ``"float"``, ``"bool"``, ``"str"`` or ``"int list"`` (each element
    checked against the range). ``low``/``high`` bound numbers (``None``: unbounded; ``*_open``:
    the bound itself is excluded). ``choices`` lists the allowed words of a string, ``extra``
    allowed integers outside the range (``-1`` for ``gradient_steps``). ``means`` explains the
    special values, appended to the error.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    extra: tuple[int, ...] = ()
    means: str = ""

    def describe(self) -> str:
        """The allowed values in words: ``a number in [0, 1]``, ``an integer >= 1``, ..."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            if self.choices:
                return "one of " + ", ".join(repr(c) for c in self.choices)
            return "a non-empty string"
        noun = {"int": "an integer", "float": "a finite number", "int list": "a list of integers"}
        text = noun[self.kind]
        if self.kind == "int list":
            text += ", each"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text += f" in {left}{_number(self.low)}, {_number(self.high)}{right}"
        elif self.low is not None:
            text += f" {'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text += f" {'<' if self.high_open else '<='} {_number(self.high)}"
        if self.extra:
            text += " or " + " or ".join(str(x) for x in self.extra)
        return text

    def check(self, value: Any) -> bool:
        """Whether ``value`` satisfies the rule (type first, then range or choices)."""
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            if not isinstance(value, str):
                return False
            return value in self.choices if self.choices else bool(value.strip())
        if self.kind == "int list":
            return isinstance(value, list) and all(self._number_ok(v, integer=True) for v in value)
        return self._number_ok(value, integer=self.kind == "int")

    def _number_ok(self, value: Any, integer: bool) -> bool:
        if isinstance(value, bool):  # a bool is an int to Python, never to a config
            return False
        if integer:
            if not isinstance(value, int) or not -INT64_MAX - 1 <= value <= INT64_MAX:
                return False
            if value in self.extra:
                return True
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _ints(low: int, *, extra: tuple[int, ...] = (), means: str = "") -> Rule:
    return Rule("int", low, extra=extra, means=means)


def _unit(*, high_open: bool = False, means: str = "") -> Rule:
    return Rule("float", 0.0, 1.0, high_open=high_open, means=means)


_POSITIVE = Rule("float", 0.0, low_open=True)
_NON_NEGATIVE = Rule("float", 0.0)

RULES: dict[str, Rule] = {
    # RunConfig
    "algo": Rule("str", choices=("ddpg", "td3", "dqn")),
    "env": Rule("str", means="a Gymnasium environment id"),
    "preset": Rule("str", choices=PRESETS),
    "total_steps": _ints(1),
    "seed": _ints(0),
    "device": Rule("str", means="a torch device of this machine"),
    "threads": _ints(1),
    "net_arch": Rule("int list", 1, means="hidden layer widths, e.g. 64,64"),
    "final_init": Rule("float", 0.0, means="0 = PyTorch's default initialization"),
    "gamma": _unit(),
    "buffer_size": _ints(1),
    "batch_size": _ints(1),
    "learning_starts": _ints(0),
    "train_freq": _ints(1),
    "gradient_steps": _ints(1, extra=(-1,), means="-1 = as many as train_freq"),
    "tau": _unit(means="target <- (1 - tau) target + tau online"),
    "eval_every": _ints(0, means="0 = the final evaluation only"),
    "eval_episodes": _ints(1),
    "keep_best": Rule("bool"),
    "checkpoint_every": _ints(1),
    "log_every": _ints(1),
    # DDPGConfig
    "actor_lr": _NON_NEGATIVE,
    "critic_lr": _NON_NEGATIVE,
    "critic_l2": _NON_NEGATIVE,
    "action_layer": _ints(0, means="the hidden layer the action joins, < len(net_arch)"),
    "noise_type": Rule("str", choices=("ou", "normal", "none")),
    "noise_std": _NON_NEGATIVE,
    "ou_theta": _NON_NEGATIVE,
    "ou_dt": _POSITIVE,
    # TD3Config
    "policy_delay": _ints(1),
    "target_policy_noise": _NON_NEGATIVE,
    "target_noise_clip": _NON_NEGATIVE,
    # DQNConfig
    "learning_rate": _NON_NEGATIVE,
    "target_update_interval": _ints(0, means="0 = soft updates with tau"),
    "double_dqn": Rule("bool"),
    "loss": Rule("str", choices=("huber", "mse")),
    "max_grad_norm": Rule("float", 0.0, means="0 = no clipping"),
    "eps_initial": _unit(),
    "eps_final": _unit(),
    "eps_fraction": _unit(),
    "eval_ema_decay": _unit(high_open=True, means="0 = off"),
    "eval_ema_num_updates": Rule("bool"),
}


def _problem(key: str, value: Any, rule: Rule) -> tuple[str, str]:
    message = f"{key}={value!r}: must be {rule.describe()}"
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, int) and abs(v) > INT64_MAX for v in items):
        message += " that fits in 64 bits"
    if rule.means:
        message += f" ({rule.means})"
    return key, message


def validate_config(config: RunConfig) -> None:
    """Check every field of ``config`` against :data:`RULES`, the rules between fields, and
    ``device`` against this machine; raise :class:`ConfigError` listing every problem.

    Changes nothing: the training loop, ``make_config`` and the agents call it before they
    build anything, so a bad value is refused before any file or tensor exists.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"expected a RunConfig (DDPGConfig, TD3Config, DQNConfig), got {config!r}")
    problems = []
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for key, value in values.items():
        rule = RULES[key]
        if not rule.check(value):
            problems.append(_problem(key, value, rule))
    bad = {key for key, _ in problems}
    if "algo" not in bad and config_class(config.algo) is not type(config):
        message = f"algo={config.algo!r}: a {type(config).__name__} is not {config.algo}'s config"
        problems.append(("algo", message))
    if "device" not in bad and (problem := _device_problem(config.device)):
        problems.append(("device", problem))
    if "action_layer" in values and not bad & {"action_layer", "net_arch"}:
        depth = max(len(config.net_arch), 1)
        if config.action_layer >= depth:
            problems.append(
                (
                    "action_layer",
                    f"action_layer={config.action_layer}: must be in [0, {depth - 1}] for "
                    f"net_arch={config.net_arch} (the hidden layer the action joins)",
                )
            )
    if (
        isinstance(config, DQNConfig)
        and not bad & {"target_update_interval", "tau"}
        and config.target_update_interval > 0
        and config.tau != 1.0
    ):
        problems.append(
            (
                "tau",
                f"tau={config.tau!r} with target_update_interval="
                f"{config.target_update_interval}: hard copies every target_update_interval "
                "steps need tau=1; for soft updates after every gradient step set "
                "target_update_interval=0 and tau < 1",
            )
        )
    if problems:
        raise ConfigError(problems)


def _device_problem(text: str) -> str | None:
    """Why ``text`` is not a usable torch device on this machine, or None."""
    try:
        device = torch.device(text)
    except RuntimeError:
        return f"device={text!r}: not a torch device; write 'cpu', 'cuda', 'cuda:N' or 'mps'"
    if device.type == "cpu":
        return None
    if device.type not in ("cuda", "mps", "xpu"):
        return f"device={text!r}: polyak.rl runs on 'cpu', 'cuda', 'mps' or 'xpu' devices"
    module = getattr(torch, device.type)  # torch.cuda, torch.mps, torch.xpu
    available = torch.backends.mps.is_available if device.type == "mps" else module.is_available
    if not available():
        return (
            f"device={text!r}: {device.type} is not available on this machine (torch "
            f"{torch.__version__}); use device=cpu"
        )
    count = getattr(module, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        return f"device={text!r}: this machine has {count} {device.type} device(s), 0-{count - 1}"
    return None


def _mlp_parameters(sizes: list[int]) -> int:
    return sum(i * o + o for i, o in itertools.pairwise(sizes))


def _network_parameters(config: RunConfig, obs_dim: int, action_dim: int) -> int:
    """Parameters of the agent's online networks (actor and critics, or the Q-network)."""
    arch = list(config.net_arch)
    if config.algo == "dqn":
        return _mlp_parameters([obs_dim, *arch, action_dim])
    critic_sizes = [obs_dim, *arch, 1]
    critic = _mlp_parameters(critic_sizes) + action_dim * critic_sizes[config.action_layer + 1]
    critics = 2 if config.algo == "td3" else 1
    return _mlp_parameters([obs_dim, *arch, action_dim]) + critics * critic


# Per online parameter: itself, its target copy, its gradient, Adam's two moments, and DQN's
# evaluation average or the checkpoint's copy: an upper estimate, not an accounting.
_COPIES_PER_PARAMETER = 6


def check_memory(config: RunConfig, obs_dim: int, action_dim: int) -> None:
    """Refuse a run whose replay buffer, networks and training burst cannot fit in memory.

    ``action_dim``: the action size, or the number of actions of a discrete space (``n``; the
    buffer then stores one value). Estimated from the sizes alone, before anything is
    allocated, against the memory available now (``MemAvailable``; for networks on a CUDA
    device, that device's free memory). Raises :class:`ConfigError` naming the key that sizes
    the largest part, with every part's size.
    """
    itemsize = torch.finfo(torch.get_default_dtype()).bits // 8
    width = ReplayBuffer.row_width(obs_dim, 0 if config.algo == "dqn" else action_dim)
    rows = min(config.buffer_size, config.total_steps)
    burst = config.batch_size * (
        config.gradient_steps if config.gradient_steps > 0 else config.train_freq
    )
    parameters = _network_parameters(config, obs_dim, action_dim)
    host = [
        _Part(
            f"buffer_size={config.buffer_size}",
            f"the replay buffer: {rows} transitions x {width} values x {itemsize} bytes",
            rows * width * itemsize,
        ),
        _Part(
            f"batch_size={config.batch_size}",
            f"a training burst: gradient_steps x batch_size = {burst} rows x {width} values x "
            f"{itemsize} bytes",
            burst * width * itemsize,
        ),
    ]
    networks = _Part(
        f"net_arch={config.net_arch}",
        f"the networks: {parameters} parameters x {_COPIES_PER_PARAMETER} copies (target, "
        f"gradient, optimizer state) x {itemsize} bytes",
        parameters * _COPIES_PER_PARAMETER * itemsize,
    )
    device = torch.device(config.device)
    if device.type == "cuda":
        _check_fits([networks], torch.cuda.mem_get_info(device)[0], f"is free on {device}")
    else:
        host.append(networks)
    _check_fits(host, available_memory(), "of memory is available")


@dataclass(frozen=True)
class _Part:
    setting: str  # "key=value" of the config key that sizes it
    what: str
    nbytes: int


def _check_fits(parts: list[_Part], available: int, where: str) -> None:
    """Raise naming the largest part if the parts together need more than ``available``."""
    need = sum(p.nbytes for p in parts)
    if need <= available:
        return
    largest = max(parts, key=lambda p: p.nbytes)
    key = largest.setting.partition("=")[0]
    raise ConfigError(
        [
            (
                key,
                f"{largest.setting}: the run needs {_size(need)}, {_size(largest.nbytes)} of it "
                f"for {largest.what}, but only {_size(available)} {where}; lower {key}",
            )
        ]
    )


def _size(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it >= 1 (up to TiB)."""
    units = ("KiB", "MiB", "GiB", "TiB")
    if nbytes < 1024:
        return f"{int(nbytes)} bytes"
    unit = 0
    nbytes /= 1024
    while nbytes >= 1024 and unit < len(units) - 1:
        nbytes /= 1024
        unit += 1
    return f"{nbytes:.1f} {units[unit]}"
