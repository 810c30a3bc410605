"""Helpers shared by the QP-layer and head tests (tests/test_qp.py, tests/test_heads.py)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These problems are tiny: OpenMP threads only spin on shared CI cores (10x slowdowns)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
