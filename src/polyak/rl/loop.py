"""The training loop: interact, store, train, evaluate, log, checkpoint, resume.

A run is set up and checked (:func:`train`), then goes through phases, as Stable-Baselines3's
``learn -> collect_rollouts -> train``: start or resume (the loop's own state is a
:class:`LoopState`, which the checkpoint stores), the step loop, and the final evaluation and
summary. One environment step ``t = 1 .. total_steps``::

    a ~ uniform                         if t <= learning_starts   (warm-up, as Stable-Baselines3)
    a = agent.act(s, explore=True)      otherwise
    s', r, terminated, truncated = env.step(a)
    replay.add(s, a, r, s', terminated, truncated)
    agent.on_env_step(t)                # epsilon schedule, hard target copies
    if t > learning_starts and t % train_freq == 0:
        burst = replay.sample_burst(gradient_steps, batch_size)   # all indices in one draw
        agent.train_burst(burst, gradient_steps)   # = gradient_steps x agent.train_step(...)

Every ``eval_every`` steps, and once more at the end, the greedy policy is evaluated on
episodes seeded ``seed + 1000000 + k``; the last of these is the final evaluation. With
``keep_best`` they are validations instead, and the run delivers the best of them, evaluated on
held-out episodes (``polyak.rl.best``).

A burst's minibatch indices are drawn up front, in one call ``rng.integers(0, len(replay),
size=(gradient_steps, batch_size))``; nothing enters the buffer during a burst, so each minibatch
is still uniform over the same transitions as when drawn one at a time.

Reproducibility: the only randomness is the NumPy generator seeded with ``seed`` (``agent.rng``:
warm-up actions, exploration noise, epsilon, replay sampling), torch's generators (network init;
TD3's smoothing noise has its own), and the environment's generator. A checkpoint stores all of
them, plus the replay buffer, the agent, its optimizers and targets, the counters, and the episode
in progress. The episode in progress is stored as the environment generator's state at its reset
plus the actions taken since: on resume the environment is reset from that state and the actions
replayed, which rebuilds its exact internal state without pickling the environment (gymnasium
environments are deterministic given their generator). So a run killed at any moment and resumed
from its last checkpoint takes exactly the steps the uninterrupted run takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from polyak.rl.agent import Agent
from polyak.rl.best import BestPolicy
from polyak.rl.checkpoint import (
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    remove_stale_temps,
    restoring,
    save_atomic,
    set_rng_state,
)
from polyak.rl.config import RunConfig
from polyak.rl.logging import MetricsLogger, Progress, eval_columns
from polyak.rl.replay import ReplayBuffer
from polyak.rl.rundir import (
    ConfigMismatchError,
    RunDirLock,
    check_run_dir,
    check_same_run,
    finite_or_null,
    write_config,
    write_json,
)
from polyak.rl.spaces import (
    check_box_actions,
    check_discrete_actions,
    check_observations,
    make_env,
)
from polyak.rl.validation import check_memory, validate_config

__all__ = [
    "ActionCodec",
    "ConfigMismatchError",
    "LoopState",
    "build_agent",
    "evaluate",
    "make_agent",
    "read_checkpoint",
    "train",
]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = {"version", "config", "agent", "training", "replay", "rng", "loop"}


class ActionCodec:
    """Maps the agent's actions to the environment's: [-1, 1] boxes are rescaled to [low, high]."""

    def __init__(self, env: gym.Env, algo: str) -> None:
        self.discrete = algo == "dqn"
        if self.discrete:
            self.n = check_discrete_actions(env.action_space, algo)
            self.dim = 0
        else:
            self.low, self.high = check_box_actions(env.action_space, algo)
            self.dim = len(self.low)
            self.dtype = env.action_space.dtype

    def random(self, rng: np.random.Generator) -> np.ndarray | int:
        if self.discrete:
            return int(rng.integers(self.n))
        return rng.uniform(-1.0, 1.0, size=self.dim)

    def to_env(self, action: np.ndarray | int) -> np.ndarray | int:
        if self.discrete:
            return action
        return (self.low + (np.asarray(action) + 1.0) * 0.5 * (self.high - self.low)).astype(
            self.dtype
        )


def make_agent(
    config: RunConfig,
    env: gym.Env,
    rng: np.random.Generator,
    *,
    cls: type[Agent] | None = None,
) -> tuple[Agent, ActionCodec, int]:
    """Build the agent of ``config.algo`` (or ``cls``, a subclass of it taking the same
    arguments) for ``env``'s spaces (checked, with clear errors), once the memory it and its
    replay buffer need is known to be there."""
    expected = _agent_class(config.algo)
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, expected)):
        raise TypeError(
            f"make_agent: cls must be {expected.__name__} or a subclass of it for "
            f"algo={config.algo!r}, got {cls!r}"
        )
    obs_dim, codec = _checked_spaces(config, env)
    device = torch.device(config.device)
    agent = (cls or expected)(config, obs_dim, _action_size(codec), rng, device)
    return agent, codec, obs_dim


def _action_size(codec: ActionCodec) -> int:
    """What an agent is built with: the number of discrete actions, or the action dimension."""
    return codec.n if codec.discrete else codec.dim


def _checked_spaces(config: RunConfig, env: Any) -> tuple[int, ActionCodec]:
    """``(obs_dim, codec)`` of ``env`` for ``config.algo`` (checked, with clear errors), once the
    memory a run needs is known to be there."""
    obs_dim = check_observations(env.observation_space, config.algo)
    codec = ActionCodec(env, config.algo)
    check_memory(config, obs_dim, _action_size(codec))
    return obs_dim, codec


def _agent_class(algo: str) -> type[Agent]:
    from polyak.rl.ddpg import DDPG
    from polyak.rl.dqn import DQN
    from polyak.rl.td3 import TD3

    return {"ddpg": DDPG, "td3": TD3, "dqn": DQN}[algo]


def evaluate(
    agent: Agent, codec: ActionCodec, env_id: str, episodes: int, seed: int
) -> list[float]:
    """Returns of ``episodes`` deterministic episodes (no exploration) on a fresh environment.

    Episode ``k`` is reset with seed ``seed + k``, and nothing here touches the training
    generators, so evaluating never changes the training run.
    """
    env = make_env(env_id)
    returns = []
    try:
        for k in range(episodes):
            obs, _ = env.reset(seed=seed + k)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(
                    codec.to_env(agent.act(obs, explore=False))
                )
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns


def _eval_seed(config: RunConfig) -> int:
    return config.seed + 1_000_000  # disjoint from the training environment's seed


def _test_seed(config: RunConfig) -> int:
    """Episodes of ``keep_best``'s final evaluation: disjoint from those the choice was made on."""
    return config.seed + 2_000_000


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint written by :func:`train`, its structure checked
    (:class:`~polyak.rl.checkpoint.CheckpointError` naming the file otherwise)."""
    ckpt = load_checkpoint(path)
    missing = sorted(_CHECKPOINT_KEYS - set(ckpt))
    if missing:
        raise CheckpointError(
            f"{path} is not a polyak.rl training checkpoint (it has no {', '.join(missing)}); "
            "move it away to start the run over, or use another --run-dir"
        )
    if ckpt["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is a version {ckpt['version']!r} checkpoint; this polyak reads version "
            f"{CHECKPOINT_VERSION}"
        )
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path}: its 'config' entry is not a config")
    return ckpt


def build_agent(config: RunConfig, *, cls: type[Agent] | None = None) -> Agent:
    """The agent :func:`train` builds for a fresh run of ``config``, built the same way: torch
    seeded with ``config.seed``, NumPy's generator seeded with it (``agent.rng``, which the
    loop then shares), networks sized for ``config.env``'s spaces.

    ``cls`` replaces the algorithm's agent class by a subclass taking the same arguments (an
    instrumented DQN, say): ``train(config, run_dir, agent=build_agent(config, cls=...))`` is
    then the plain run, draw for draw.
    """
    validate_config(config)
    env = make_env(config.env)
    try:
        return _seeded_agent(config, env, cls)[0]
    finally:
        env.close()


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    agent: Agent | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir`` and return its ``summary.json`` contents.

    ``agent``: train this agent instead of building one (:func:`build_agent` builds it as
    ``train`` would). It must be of ``config.algo``'s agent class (or a subclass), and the
    loop draws its warm-up actions and minibatches from the agent's generator ``agent.rng``.

    Everything is checked before anything is written to ``run_dir``: the config
    (``polyak.rl.validation``), the directory and any ``config.json`` in it, the environment and
    its spaces, the memory the run needs. Then the directory is locked for the run
    (``polyak.rl.rundir``), and a checkpoint in it is checked (readable, this run's
    configuration and seed) before ``config.json`` is written.
    """
    run_dir = Path(run_dir)
    validate_config(config)
    check_run_dir(run_dir, config)
    if agent is not None:
        _check_agent(agent, config)

    with contextlib.ExitStack() as cleanup:
        env = make_env(config.env)
        cleanup.callback(env.close)
        if agent is None:
            agent, codec, obs_dim = _seeded_agent(config, env, None)
        else:
            torch.set_num_threads(config.threads)
            obs_dim, codec = _checked_spaces(config, env)
        replay = ReplayBuffer(
            min(config.buffer_size, config.total_steps),  # never allocate rows that stay empty
            obs_dim,
            codec.dim,
            rng=agent.rng,
            device=agent.device,
            dtype=agent.dtype,
        )
        cleanup.enter_context(RunDirLock(run_dir))  # the first write to run_dir
        # Again, under the lock: another process may have started a run here meanwhile.
        check_run_dir(run_dir, config)
        remove_stale_temps(run_dir / CHECKPOINT)  # the lock says their writer is gone
        remove_stale_temps(run_dir / "policy.pt")
        run = _Run(config, run_dir, env, agent, codec, replay)
        run.start_or_resume()
        run.collect_and_train(progress)
        return run.finish()


def _seeded_agent(
    config: RunConfig, env: gym.Env, cls: type[Agent] | None
) -> tuple[Agent, ActionCodec, int]:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    return make_agent(config, env, np.random.default_rng(config.seed), cls=cls)


def _check_agent(agent: Any, config: RunConfig) -> None:
    expected = _agent_class(config.algo)
    if not isinstance(agent, expected):
        raise TypeError(
            f"train: agent must be a {expected.__name__} for algo={config.algo!r} (or a "
            f"subclass), got {type(agent).__name__}; build one with build_agent(config)"
        )
    if not isinstance(getattr(agent, "rng", None), np.random.Generator):
        raise TypeError(
            f"train: agent.rng must be the agent's numpy Generator (the loop shares it), got "
            f"{type(getattr(agent, 'rng', None)).__name__}"
        )


class Clock:
    """Wall-clock and CPU seconds of the training loop, accumulated between start and stop."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self.wall, self.cpu = wall, cpu
        self._started = (0.0, 0.0)

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        self.wall += time.perf_counter() - self._started[0]
        self.cpu += time.process_time() - self._started[1]


@dataclasses.dataclass
class LoopState:
    """What the step loop carries from one step to the next; the checkpoint's ``"loop"``
    entry (:meth:`state_dict`, :meth:`from_state_dict`).

    The episode in progress is the environment generator's state at its reset
    (``episode_env_rng``; ``None``: the first episode, reset with the run's seed) and the
    actions taken since; ``obs`` is the observation the next action answers.
    """

    obs: Any
    step: int = 0
    episodes: int = 0
    episode_return: float = 0.0
    episode_length: int = 0
    last_losses: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    clock: Clock = dataclasses.field(default_factory=Clock)  # evaluations, checkpoints excluded
    episode_env_rng: dict[str, Any] | None = None
    episode_actions: list[Any] = dataclasses.field(default_factory=list)
    # metrics.csv's left-out values (MetricsLogger.nonfinite, shared once the logger exists).
    nonfinite: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def state_dict(self, codec: ActionCodec) -> dict[str, Any]:
        actions = (
            torch.from_numpy(
                np.array(self.episode_actions, dtype=codec.dtype).reshape(-1, codec.dim)
            )
            if codec.dim
            else torch.tensor(self.episode_actions, dtype=torch.int64)
        )
        return {
            "step": self.step,
            "episodes": self.episodes,
            "episode_return": self.episode_return,
            "episode_length": self.episode_length,
            "last_losses": self.last_losses,
            "train_seconds": self.clock.wall,
            "train_cpu_seconds": self.clock.cpu,
            "episode_env_rng": self.episode_env_rng,
            "episode_actions": actions,
            "obs": torch.from_numpy(np.asarray(self.obs).copy()),
            "nonfinite_metrics": self.nonfinite,
        }

    @classmethod
    def from_state_dict(cls, loop: dict[str, Any], codec: ActionCodec) -> LoopState:
        return cls(
            obs=loop["obs"].numpy(),
            step=loop["step"],
            episodes=loop["episodes"],
            episode_return=loop["episode_return"],
            episode_length=loop["episode_length"],
            last_losses=loop["last_losses"],
            clock=Clock(loop["train_seconds"], loop["train_cpu_seconds"]),
            episode_env_rng=loop["episode_env_rng"],
            episode_actions=[a.numpy() if codec.dim else int(a) for a in loop["episode_actions"]],
            nonfinite=loop.get("nonfinite_metrics", {}),  # absent before it was recorded
        )


class _Run:
    """One training run in a locked run directory, in phases: :meth:`start_or_resume`,
    :meth:`collect_and_train` (the step loop: :meth:`collect`, :meth:`train_agent`,
    :meth:`evaluate`, :meth:`save_checkpoint`), :meth:`finish`."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        env: gym.Env,
        agent: Agent,
        codec: ActionCodec,
        replay: ReplayBuffer,
    ) -> None:
        self.config, self.run_dir, self.env = config, run_dir, env
        self.agent, self.codec, self.replay, self.rng = agent, codec, replay, agent.rng
        self.best = BestPolicy()  # keep_best's choice so far
        self.gradient_steps = (
            config.gradient_steps if config.gradient_steps > 0 else config.train_freq
        )
        self.state = LoopState(obs=None)
        self.logger: MetricsLogger | None = None

    # ------------------------------------------------------------------ start or resume

    def start_or_resume(self) -> None:
        """Resume from the run directory's checkpoint, or start at step 0; then write
        ``config.json`` and open ``metrics.csv`` from the step reached."""
        config, ckpt_path = self.config, self.run_dir / CHECKPOINT
        self.state.obs, _ = self.env.reset(seed=config.seed)
        if ckpt_path.exists():
            self._resume(ckpt_path)
        else:
            self.agent.on_episode_start()
        write_config(self.run_dir, config)
        # The final evaluation is logged after the last checkpoint: re-running a finished run
        # evaluates again, so its old row goes (periodic evaluations skip the last step).
        self.logger = MetricsLogger(
            self.run_dir,
            _loss_keys(config),
            resume_step=self.state.step,
            final_step=config.total_steps,
            nonfinite=self.state.nonfinite,
        )
        self.state.nonfinite = self.logger.nonfinite

    def _resume(self, ckpt_path: Path) -> None:
        ckpt = read_checkpoint(ckpt_path)
        check_same_run(ckpt_path, ckpt["config"], self.config)
        with restoring(ckpt_path):
            self.agent.load_networks(ckpt["agent"])
            self.agent.load_training_state(ckpt["training"])
            self.replay.load_state_dict(ckpt["replay"])
            if "best" in ckpt:  # absent from checkpoints written before keep_best existed
                self.best.load_state_dict(ckpt["best"])
            set_rng_state(self.rng, ckpt["rng"])
            state = LoopState.from_state_dict(ckpt["loop"], self.codec)
        # Rebuild the environment mid-episode: reset from the same generator state, replay.
        obs = self.state.obs
        if state.episode_env_rng is not None:
            self.env.unwrapped.np_random.bit_generator.state = state.episode_env_rng
            obs, _ = self.env.reset()
        for a in state.episode_actions:
            obs, *_ = self.env.step(a)
        if not np.array_equal(obs, state.obs):
            raise RuntimeError(
                f"{self.config.env} did not replay deterministically from the checkpoint; "
                "resuming this environment is not supported"
            )
        state.obs = obs
        self.state = state

    # ------------------------------------------------------------------ the step loop

    def collect_and_train(self, progress: bool) -> None:
        """Steps up to ``total_steps``: act and store, train, log, evaluate, checkpoint."""
        config, state, logger = self.config, self.state, self.logger
        assert logger is not None
        bar = Progress(
            config.total_steps, state.step, f"{config.algo} {config.env}", enabled=progress
        )
        try:
            state.clock.start()
            while state.step < config.total_steps:
                state.step += 1
                step = state.step
                # Collect: one environment step into the replay buffer.
                self.collect(bar)
                # Train: a burst of gradient steps every train_freq steps after the warm-up.
                self.agent.on_env_step(step)
                if step > config.learning_starts and step % config.train_freq == 0:
                    self.train_agent()
                if step % config.log_every == 0 and state.last_losses:
                    logger.log(step, **{k: float(v) for k, v in state.last_losses.items()})
                bar.update(step)
                # Evaluate and checkpoint, off the clock.
                periodic_eval = config.eval_every > 0 and step % config.eval_every == 0
                if periodic_eval and step < config.total_steps:
                    state.clock.stop()
                    self.evaluate()
                    state.clock.start()
                if step % config.checkpoint_every == 0 or step == config.total_steps:
                    state.clock.stop()
                    logger.flush()
                    self.save_checkpoint()
                    state.clock.start()
            state.clock.stop()
            bar.update(state.step, force=True)
        finally:
            bar.close()

    def collect(self, bar: Progress) -> None:
        """Act (uniformly at random during the warm-up), step the environment, store the
        transition; at an episode's end log it and reset."""
        config, state, env, logger = self.config, self.state, self.env, self.logger
        assert logger is not None
        if state.step <= config.learning_starts:
            action = self.codec.random(self.rng)
        else:
            action = self.agent.act(state.obs, explore=True)
        env_action = self.codec.to_env(action)
        next_obs, reward, terminated, truncated, _ = env.step(env_action)
        state.episode_actions.append(env_action)
        self.replay.add(state.obs, action, reward, next_obs, terminated, truncated)
        state.obs = next_obs
        state.episode_return += float(reward)
        state.episode_length += 1
        if terminated or truncated:
            logger.log(
                state.step,
                episode_return=state.episode_return,
                episode_length=state.episode_length,
            )
            bar.episode(state.episode_return)
            state.episodes += 1
            state.episode_return, state.episode_length = 0.0, 0
            state.episode_env_rng = env.unwrapped.np_random.bit_generator.state
            state.episode_actions = []
            state.obs, _ = env.reset()
            self.agent.on_episode_start()

    def train_agent(self) -> None:
        """``gradient_steps`` gradient steps on minibatches drawn in one go."""
        burst = self.replay.sample_burst(self.gradient_steps, self.config.batch_size)
        self.state.last_losses.update(self.agent.train_burst(burst, self.gradient_steps))

    def evaluate(self) -> None:
        """A periodic evaluation of the greedy policy (a validation with ``keep_best``)."""
        config, logger = self.config, self.logger
        assert logger is not None
        returns = evaluate(
            self.agent, self.codec, config.env, config.eval_episodes, _eval_seed(config)
        )
        logger.log(self.state.step, **eval_columns(returns))
        if config.keep_best:
            self.best.offer(self.state.step, float(np.mean(returns)), self.agent.policy_network())

    def save_checkpoint(self) -> None:
        save_atomic(
            {
                "version": CHECKPOINT_VERSION,
                "config": dataclasses.asdict(self.config),
                "agent": {k: m.state_dict() for k, m in self.agent.networks().items()},
                "training": self.agent.training_state(),
                "replay": self.replay.state_dict(),
                "rng": get_rng_state(self.rng),
                "best": self.best.state_dict(),
                "loop": self.state.state_dict(self.codec),
            },
            self.run_dir / CHECKPOINT,
        )

    # ------------------------------------------------------------------ finish

    def finish(self) -> dict[str, Any]:
        """The final evaluation (and ``keep_best``'s delivery), ``summary.json`` and the
        learning-curve picture; returns the summary."""
        config, state, agent, logger = self.config, self.state, self.agent, self.logger
        assert logger is not None
        returns = evaluate(agent, self.codec, config.env, config.eval_episodes, _eval_seed(config))
        final = float(np.mean(returns))
        logger.log(config.total_steps, **eval_columns(returns))
        logger.close()
        chosen: dict[str, Any] = {}
        if config.keep_best:
            returns, chosen = _deliver_best(
                config, agent, self.codec, self.best, final, self.run_dir
            )
            final = float(np.mean(returns))
        clock = state.clock
        summary = {
            "algo": config.algo,
            "env": config.env,
            "preset": config.preset,
            "total_steps": config.total_steps,
            "seed": config.seed,
            "final_eval_return": final,
            "final_eval_returns": returns,
            "final_eval_std": float(np.std(returns)),
            "final_eval_seed": _test_seed(config) if config.keep_best else _eval_seed(config),
            **chosen,
            "episodes": state.episodes,
            "steps_per_second": config.total_steps / clock.wall if clock.wall > 0 else None,
            "train_seconds": clock.wall,
            "train_cpu_seconds": clock.cpu,
            "threads": config.threads,
            "device": config.device,
        }
        warnings = logger.warnings()
        summary = {key: finite_or_null(value, key, warnings) for key, value in summary.items()}
        summary["warnings"] = warnings
        write_json(self.run_dir / "summary.json", summary)
        _try_plot(self.run_dir)
        return summary


def _deliver_best(
    config: RunConfig,
    agent: Agent,
    codec: ActionCodec,
    best: BestPolicy,
    last_validation: float,
    run_dir: Path,
) -> tuple[list[float], dict[str, Any]]:
    """``keep_best``'s end of a run: offer the last weights, put the chosen policy in the agent,
    write it to ``policy.pt``, and evaluate the last and the chosen policies on the held-out
    episodes. Returns the chosen policy's returns and the summary's extra fields."""
    network = agent.policy_network()
    test = (config.env, config.eval_episodes, _test_seed(config))
    last_returns = evaluate(agent, codec, *test)
    if not best.offer(config.total_steps, last_validation, network):
        network.load_state_dict(best.policy)
    returns = last_returns if best.step == config.total_steps else evaluate(agent, codec, *test)
    save_atomic(best.state_dict(), run_dir / "policy.pt")
    return returns, {
        "final_policy_step": best.step,
        "final_policy_validation_return": best.validation_return,
        "last_eval_return": float(np.mean(last_returns)),
    }


def _loss_keys(config: RunConfig) -> list[str]:
    return ["loss"] if config.algo == "dqn" else ["critic_loss", "actor_loss"]


def _try_plot(run_dir: Path) -> None:
    from polyak.rl.plot import plot_runs

    with contextlib.suppress(ImportError):  # matplotlib (the `plot` extra) is missing
        plot_runs([run_dir], run_dir / "learning_curve.png")
