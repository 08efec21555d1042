from __future__ import annotations

import pytest

from sidecar.compiler import load_policy
from sidecar.engine import Engine
from sidecar.policy import Policy
from tests.helpers import EXAMPLE_POLICY


@pytest.fixture(scope="session")
def example_policy() -> Policy:
    return load_policy(EXAMPLE_POLICY)


@pytest.fixture
def engine(example_policy: Policy) -> Engine:
    return Engine(example_policy)
