"""Fixtures for the delta tests (helpers live in delta_helpers.py)."""

import pytest
import torch
from delta_helpers import CASES, Case


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request) -> Case:
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 99, (3, 7), generator=g)   # (B, T)
