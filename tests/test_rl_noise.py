"""polyak.rl.noise: Ornstein-Uhlenbeck and Gaussian exploration noise."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gymnasium")  # polyak.rl needs the rl extra

from polyak.rl.noise import GaussianNoise, OrnsteinUhlenbeckNoise


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
