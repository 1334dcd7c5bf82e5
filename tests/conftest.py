"""Shared test setup: deterministic, small and quiet."""
import os

import pytest
import torch

os.environ.setdefault("MEXIFY_NO_PROGRESS", "1")
# the suite trusts its own model files (tests/*.py), as a user trusts their own package; the trust
# tests clear this to see what a stranger's bundle may do
os.environ.setdefault("MEXIFY_TRUSTED_CODE", os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: the tests use small tensors, where a second thread only adds contention
    (and DataLoader workers take the other core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
