"""Shared pytest configuration: make ``tests/helpers.py`` importable, tame hypothesis."""

from __future__ import annotations

import os
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


# End-to-end tests run a whole program: an example script, the demo, a torchrun launch, a
# browser, the docs build, the code blocks of the docs pages. ``pytest -m "not e2e"`` leaves
# them out for a fast inner loop; ``make test`` runs everything.
E2E_FILES = {
    "test_examples.py",
    "test_browser.py",
    "test_distributed.py",
    "test_landscape_distributed.py",
    "test_distributed_cli.py",
    "test_distributed_diagnose.py",
    "test_distributed_objective.py",
    "test_distributed_parallel.py",
    "test_fsdp.py",
}
E2E_TESTS = {
    "test_mkdocs_builds_strict",
    "test_page_runs_and_prints_what_it_shows",
    "test_page_prints_the_same_without_the_peer_libraries",
}


def pytest_configure(config: pytest.Config) -> None:
    # torch.func registers decompositions through the deprecated torch.jit.script.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
    )
    # flatlens' own code and tests use the current names (tests of the old ones expect the
    # warning with pytest.warns).
    config.addinivalue_line(
        "filterwarnings", "error:.*is deprecated and stops working in flatlens:FutureWarning"
    )
    config.addinivalue_line(
        "markers", "e2e: runs a whole program (example, demo, torchrun, browser, docs build)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        if path.name in E2E_FILES or item.originalname in E2E_TESTS:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _fixed_global_seed():
    """Tests draw their own data from explicit generators; pin the global RNG anyway."""
    torch.manual_seed(1234)
    yield


# `make test` installs every extra (models, lightning, transformers, tensorboard, docs) and
# sets FLATLENS_NO_SKIPS=1: there a skip (a missing optional package, no /proc, no browser)
# would hide a broken integration, so it fails the test instead, with the skip's reason.
NO_SKIPS = os.environ.get("FLATLENS_NO_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped where FLATLENS_NO_SKIPS=1 (make test): {reason}"
