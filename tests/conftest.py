"""Shared test setup: deterministic, small and quiet."""
import os

import pytest
import torch

os.environ.setdefault("MEXIFY_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
