"""Shared pytest fixtures and options.

Tests set dtype and seed through fixtures, never globally: use ``f64`` / ``rng``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread: the suite is dominated by small ops, for which a second OpenMP
    # thread only adds synchronisation (and collapses on a loaded 2-core machine).
    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _find_data_root() -> Path | None:
    candidates = []
    if os.environ.get("BILEVEL_DATA_ROOT"):
        candidates.append(Path(os.environ["BILEVEL_DATA_ROOT"]))
    candidates += [REPO.parent / "shared" / "data", Path("/work/shared/data")]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The real-data folder (``../shared/data``); skips the test with a reason when absent."""
    root = _find_data_root()
    if root is None:
        pytest.skip("real data not found: set BILEVEL_DATA_ROOT or place it in ../shared/data")
    return root


@pytest.fixture
def f64() -> torch.dtype:
    return torch.float64


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator; pass it to torch.randn(..., generator=gen)."""
    return torch.Generator().manual_seed(0)
