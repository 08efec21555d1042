from __future__ import annotations

import pytest

from sidecar.config import load_policy
from sidecar.engine import Engine, Policy
from tests.helpers import EXAMPLE_POLICY, NOW, FixedClock


@pytest.fixture(scope="session")
def example_policy() -> Policy:
    return load_policy(EXAMPLE_POLICY, clock=FixedClock(NOW))


@pytest.fixture
def engine(example_policy: Policy) -> Engine:
    return Engine(example_policy)
