"""The training loop: interact, store, train, evaluate, log, checkpoint, resume.

One environment step ``t = 1 .. total_steps``::

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

Reproducibility: the only randomness is the seed's NumPy generator (warm-up actions, exploration
noise, epsilon, replay sampling), torch's generators (network init; TD3's smoothing noise has its
own), and the environment's generator. A checkpoint stores all of them, plus the replay buffer,
the agent, its optimizers and targets, the counters, and the episode in progress. The episode in
progress is stored as the environment generator's state at its reset plus the actions taken
since: on resume the environment is reset from that state and the actions replayed, which
rebuilds its exact internal state without pickling the environment (gymnasium environments are
deterministic given their generator). So a run killed at any moment and resumed from its last
checkpoint takes exactly the steps the uninterrupted run takes.
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

__all__ = ["ConfigMismatchError", "evaluate", "make_agent", "read_checkpoint", "train"]

CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = {"version", "config", "agent", "training", "replay", "rng", "loop"}


class _ActionCodec:
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
    config: RunConfig, env: gym.Env, rng: np.random.Generator
) -> tuple[Agent, _ActionCodec, int]:
    """Build the agent of ``config.algo`` for ``env``'s spaces (checked, with clear errors),
    once the memory it and its replay buffer need is known to be there."""
    from polyak.rl.ddpg import DDPG
    from polyak.rl.dqn import DQN
    from polyak.rl.td3 import TD3

    obs_dim = check_observations(env.observation_space, config.algo)
    codec = _ActionCodec(env, config.algo)
    check_memory(config, obs_dim, codec.n if codec.discrete else codec.dim)
    device = torch.device(config.device)
    cls = {"ddpg": DDPG, "td3": TD3, "dqn": DQN}[config.algo]
    agent = cls(config, obs_dim, codec.n if codec.discrete else codec.dim, rng, device)
    return agent, codec, obs_dim


def evaluate(
    agent: Agent, codec: _ActionCodec, env_id: str, episodes: int, seed: int
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


class _Clock:
    """Wall-clock and CPU seconds of the training loop, accumulated between start and stop."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self.wall, self.cpu = wall, cpu
        self._started = (0.0, 0.0)

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        self.wall += time.perf_counter() - self._started[0]
        self.cpu += time.process_time() - self._started[1]


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


def train(config: RunConfig, run_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir`` and return its ``summary.json`` contents.

    Everything is checked before anything is written to ``run_dir``: the config
    (``polyak.rl.validation``), the directory and any ``config.json`` in it, the environment and
    its spaces, the memory the run needs. Then the directory is locked for the run
    (``polyak.rl.rundir``), and a checkpoint in it is checked (readable, this run's
    configuration and seed) before ``config.json`` is written.
    """
    run_dir = Path(run_dir)
    validate_config(config)
    check_run_dir(run_dir, config)
    ckpt_path = run_dir / "checkpoint.pt"

    with contextlib.ExitStack() as cleanup:
        env = make_env(config.env)
        cleanup.callback(env.close)
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        agent, codec, obs_dim = make_agent(config, env, rng)
        replay = ReplayBuffer(
            min(config.buffer_size, config.total_steps),  # never allocate rows that stay empty
            obs_dim,
            codec.dim,
            rng=rng,
            device=agent.device,
            dtype=agent.dtype,
        )
        cleanup.enter_context(RunDirLock(run_dir))  # the first write to run_dir
        # Again, under the lock: another process may have started a run here meanwhile.
        check_run_dir(run_dir, config)
        remove_stale_temps(ckpt_path)  # the lock says their writer is gone
        remove_stale_temps(run_dir / "policy.pt")
        summary = _train_locked(config, run_dir, env, agent, codec, replay, rng, progress)
    return summary


def _train_locked(
    config: RunConfig,
    run_dir: Path,
    env: gym.Env,
    agent: Agent,
    codec: _ActionCodec,
    replay: ReplayBuffer,
    rng: np.random.Generator,
    progress: bool,
) -> dict[str, Any]:
    """:func:`train` once the run directory is locked: resume or start, the step loop, the
    final evaluation and ``summary.json``."""
    ckpt_path = run_dir / "checkpoint.pt"
    # Loop state; everything here goes into the checkpoint.
    step, episodes, ep_return, ep_length = 0, 0, 0.0, 0
    last_losses: dict[str, torch.Tensor] = {}
    clock = _Clock()  # time spent in the loop, evaluations and checkpoint writes excluded
    best = BestPolicy()  # keep_best's choice so far
    nonfinite: dict[str, list[int]] = {}  # metrics.csv's left-out values (MetricsLogger)
    obs, _ = env.reset(seed=config.seed)
    ep_env_rng: dict[str, Any] | None = None  # env generator state before this episode's reset
    ep_actions: list[Any] = []

    if ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path)
        check_same_run(ckpt_path, ckpt["config"], config)
        with restoring(ckpt_path):
            agent.load_networks(ckpt["agent"])
            agent.load_training_state(ckpt["training"])
            replay.load_state_dict(ckpt["replay"])
            if "best" in ckpt:  # absent from checkpoints written before keep_best existed
                best.load_state_dict(ckpt["best"])
            set_rng_state(rng, ckpt["rng"])
            loop = ckpt["loop"]
            step, episodes = loop["step"], loop["episodes"]
            ep_return, ep_length = loop["episode_return"], loop["episode_length"]
            last_losses = loop["last_losses"]
            clock = _Clock(loop["train_seconds"], loop["train_cpu_seconds"])
            ep_env_rng = loop["episode_env_rng"]
            nonfinite = loop.get("nonfinite_metrics", {})  # absent before it was recorded
            saved_actions, saved_obs = loop["episode_actions"], loop["obs"].numpy()
        # Rebuild the environment mid-episode: reset from the same generator state, replay.
        if ep_env_rng is not None:
            env.unwrapped.np_random.bit_generator.state = ep_env_rng
            obs, _ = env.reset()
        ep_actions = [a.numpy() if codec.dim else int(a) for a in saved_actions]
        for a in ep_actions:
            obs, *_ = env.step(a)
        if not np.array_equal(obs, saved_obs):
            raise RuntimeError(
                f"{config.env} did not replay deterministically from the checkpoint; "
                "resuming this environment is not supported"
            )
    else:
        agent.on_episode_start()
    write_config(run_dir, config)

    # The final evaluation is logged after the last checkpoint: re-running a finished run
    # evaluates again, so its old row goes (periodic evaluations skip the last step).
    logger = MetricsLogger(
        run_dir,
        _loss_keys(config),
        resume_step=step,
        final_step=config.total_steps,
        nonfinite=nonfinite,
    )

    def save_checkpoint() -> None:
        actions = (
            torch.from_numpy(np.array(ep_actions, dtype=codec.dtype).reshape(-1, codec.dim))
            if codec.dim
            else torch.tensor(ep_actions, dtype=torch.int64)
        )
        save_atomic(
            {
                "version": CHECKPOINT_VERSION,
                "config": dataclasses.asdict(config),
                "agent": {k: m.state_dict() for k, m in agent.networks().items()},
                "training": agent.training_state(),
                "replay": replay.state_dict(),
                "rng": get_rng_state(rng),
                "best": best.state_dict(),
                "loop": {
                    "step": step,
                    "episodes": episodes,
                    "episode_return": ep_return,
                    "episode_length": ep_length,
                    "last_losses": last_losses,
                    "train_seconds": clock.wall,
                    "train_cpu_seconds": clock.cpu,
                    "episode_env_rng": ep_env_rng,
                    "episode_actions": actions,
                    "obs": torch.from_numpy(np.asarray(obs).copy()),
                    "nonfinite_metrics": logger.nonfinite,
                },
            },
            ckpt_path,
        )

    gradient_steps = config.gradient_steps if config.gradient_steps > 0 else config.train_freq
    bar = Progress(config.total_steps, step, f"{config.algo} {config.env}", enabled=progress)
    try:
        clock.start()
        while step < config.total_steps:
            step += 1
            if step <= config.learning_starts:
                action = codec.random(rng)
            else:
                action = agent.act(obs, explore=True)
            env_action = codec.to_env(action)
            next_obs, reward, terminated, truncated, _ = env.step(env_action)
            ep_actions.append(env_action)
            replay.add(obs, action, reward, next_obs, terminated, truncated)
            obs = next_obs
            ep_return += float(reward)
            ep_length += 1
            if terminated or truncated:
                logger.log(step, episode_return=ep_return, episode_length=ep_length)
                bar.episode(ep_return)
                episodes += 1
                ep_return, ep_length = 0.0, 0
                ep_env_rng = env.unwrapped.np_random.bit_generator.state
                ep_actions = []
                obs, _ = env.reset()
                agent.on_episode_start()

            agent.on_env_step(step)
            if step > config.learning_starts and step % config.train_freq == 0:
                burst = replay.sample_burst(gradient_steps, config.batch_size)
                last_losses.update(agent.train_burst(burst, gradient_steps))
            if step % config.log_every == 0 and last_losses:
                logger.log(step, **{k: float(v) for k, v in last_losses.items()})
            bar.update(step)

            periodic_eval = config.eval_every > 0 and step % config.eval_every == 0
            if periodic_eval and step < config.total_steps:
                clock.stop()
                returns = evaluate(
                    agent, codec, config.env, config.eval_episodes, _eval_seed(config)
                )
                validation = float(np.mean(returns))
                logger.log(step, **eval_columns(returns))
                if config.keep_best:
                    best.offer(step, validation, agent.policy_network())
                clock.start()
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                clock.stop()
                logger.flush()
                save_checkpoint()
                clock.start()
        clock.stop()
        bar.update(step, force=True)
    finally:
        bar.close()

    returns = evaluate(agent, codec, config.env, config.eval_episodes, _eval_seed(config))
    final = float(np.mean(returns))
    logger.log(config.total_steps, **eval_columns(returns))
    logger.close()
    chosen: dict[str, Any] = {}
    if config.keep_best:
        returns, chosen = _deliver_best(config, agent, codec, best, final, run_dir)
        final = float(np.mean(returns))
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
        "episodes": episodes,
        "steps_per_second": config.total_steps / clock.wall if clock.wall > 0 else None,
        "train_seconds": clock.wall,
        "train_cpu_seconds": clock.cpu,
        "threads": config.threads,
        "device": config.device,
    }
    warnings = logger.warnings()
    summary = {key: finite_or_null(value, key, warnings) for key, value in summary.items()}
    summary["warnings"] = warnings
    write_json(run_dir / "summary.json", summary)
    _try_plot(run_dir)
    return summary


def _deliver_best(
    config: RunConfig,
    agent: Agent,
    codec: _ActionCodec,
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
