"""Shared test fixtures: ``device`` runs a test on every available device (cpu, plus cuda).

Hypothesis profiles: ``make test`` (and so CI) runs ``HYPOTHESIS_PROFILE=ci``, the same examples
on every run, so a gate never turns red by chance; a plain ``pytest`` explores new random
examples (how the NaN round-trip case in test_ema_properties.py was found).
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)
