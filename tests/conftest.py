"""Shared test fixtures: ``device`` runs a test on every available device (cpu, plus cuda);
``crash_at_replay_write`` kills an RL training run at a chosen replay write; ``one_torch_thread``
runs a test with ``torch.set_num_threads(1)`` (polyak.optim's CPU path through NumPy, which it
takes with one thread only).

Hypothesis profiles: ``make test`` (and so CI) runs ``HYPOTHESIS_PROFILE=ci``, the same examples
on every run, so a gate never turns red by chance; a plain ``pytest`` explores new random
examples (how the NaN round-trip case in test_ema_properties.py was found).
"""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Crash(Exception):
    pass


@pytest.fixture
def crash_at_replay_write(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """``crash(config, run_dir, n)``: train in ``run_dir`` until the ``n``-th replay write
    raises; returns the step of the checkpoint left behind (replay writes work again after)."""
    from polyak.rl import loop, train
    from polyak.rl.checkpoint import load_checkpoint

    def crash(config, run_dir: Path, n: int) -> int:
        calls = {"n": 0}
        real_add = loop.ReplayBuffer.add

        def crashing_add(self, *args):
            calls["n"] += 1
            if calls["n"] == n:
                raise _Crash
            real_add(self, *args)

        monkeypatch.setattr(loop.ReplayBuffer, "add", crashing_add)
        with pytest.raises(_Crash):
            train(config, run_dir, progress=False)
        monkeypatch.setattr(loop.ReplayBuffer, "add", real_add)
        return load_checkpoint(run_dir / "checkpoint.pt")["loop"]["step"]

    return crash
