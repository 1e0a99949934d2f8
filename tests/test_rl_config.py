"""polyak.rl.config: ``--set KEY=VALUE`` overrides, typed and checked."""

from __future__ import annotations

import pytest

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from polyak.rl.config import DQNConfig, parse_overrides


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
