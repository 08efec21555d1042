"""The end-to-end tests' harness: examples/stack.py (which starts and stops the sidecar, the demo
bank upstream and Envoy; shared with examples/demo.py) re-exported, plus the test-only bits: the
grpcurl binary, the example policy's acr strings and tokens minted at the current time.

No pytest here, so that `tests/test_grpcurl.py` can reuse it (fixtures are in conftest.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # `examples` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.stack import (
    BIN,
    DEV_JWKS,
    ENVOY,
    ENVOY_JWT_YAML,
    ENVOY_YAML,
    POLICY,
    ROOT,
    START_TIMEOUT,
    Bank,
    Envoy,
    Proc,
    Service,
    Sidecar,
    StackError,
    envoy_config,
    free_port,
    new_bank,
    new_envoy,
    new_sidecar,
    running,
    stop_all,
)
from tests.helpers import ACR_1FA as AAL1
from tests.helpers import ACR_2FA as AAL2
from tests.helpers import ACR_PHR as AAL2_PHR
from tests.helpers import ACR_PHRH as AAL3
from tests.helpers import ISSUER, make_token

__all__ = [
    "AAL1",
    "AAL2",
    "AAL2_PHR",
    "AAL3",
    "AUDIENCE",
    "BIN",
    "DEV_JWKS",
    "ENVOY",
    "ENVOY_JWT_YAML",
    "ENVOY_YAML",
    "GRPCURL",
    "ISSUER",
    "POLICY",
    "ROOT",
    "START_TIMEOUT",
    "Bank",
    "Envoy",
    "Proc",
    "Service",
    "Sidecar",
    "StackError",
    "envoy_config",
    "free_port",
    "mint",
    "new_bank",
    "new_envoy",
    "new_sidecar",
    "running",
    "stop_all",
]

GRPCURL = BIN / "grpcurl"
AUDIENCE = "bank-api"


def mint(
    sub: str = "alice",
    *,
    roles: tuple[str, ...] = ("teller",),
    scope: str = "payments",
    acr: str | None = AAL2_PHR,
    amr: tuple[str, ...] = ("pwd", "hwk"),
    auth_age: int = 0,
    ttl: int = 600,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    key: Any = None,
) -> str:
    """`tests.helpers.make_token` at the current time (what `stepup-sidecar dev-token` makes): a
    token from the example issuer, signed with the example development key unless `key` is given."""
    now = int(time.time())
    return make_token(
        now=now,
        key=key,
        drop=(*(() if scope else ("scope",)), *(() if acr is not None else ("acr",))),
        iss=issuer,
        aud=audience,
        sub=sub,
        iat=now,
        exp=now + ttl,
        auth_time=now - auth_age,
        roles=list(roles),
        scope=scope,
        acr=acr,
        amr=list(amr),
    )
