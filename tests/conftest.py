"""Shared pytest configuration: make ``tests/helpers.py`` importable, tame hypothesis."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The test models are tiny: one intra-op thread avoids OpenMP spin-waiting, which on a
# shared 2-core machine made a 43-parameter HVP take ~100 ms instead of ~1 ms.
torch.set_num_threads(1)

settings.register_profile(
    "flatlens",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("flatlens")


def pytest_configure(config: pytest.Config) -> None:
    # torch.func registers decompositions through the deprecated torch.jit.script.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
    )


@pytest.fixture(autouse=True)
def _fixed_global_seed():
    """Tests draw their own data from explicit generators; pin the global RNG anyway."""
    torch.manual_seed(1234)
    yield
