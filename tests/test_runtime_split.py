"""Verification is shared, interpretation is per policy (the runtime split of the test-and-explain
issue): the key store and the verified-token cache live for the process, so a reload neither
re-verifies signatures nor refetches unchanged JWKS; compiling a policy fetches nothing; a cached
verification counts only under the very same keys."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from joserfc.jwk import RSAKey

from sidecar.compiler import compile_document, load_policy
from sidecar.keys import KeyStore, RemoteKeys
from sidecar.policyfile import content_digest, parse_text
from sidecar.runtime import PolicyWatcher, Runtime
from sidecar.telemetry import Metrics, Telemetry
from tests.helpers import EXAMPLE_POLICY, NOW, PRIVATE_JWK, FixedClock, check_request, make_token

BALANCE = "/bank.v1.Accounts/GetBalance"
URL = "https://idp.example.test/jwks"
LEVEL_LINE = 'match: ["/bank.v1.Payments/Transfer", "POST /v1/transfers"], level: high'


class FakeIdP:
    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.fetches = 0

    def __call__(self, url: str, timeout: float) -> bytes:
        self.fetches += 1
        return json.dumps({"keys": self.keys}).encode()


def _public(jwk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k in ("kty", "n", "e", "kid", "alg", "use")}


def _write(path: Path, transfer_level: str = "high", jwks: str = "jwks_file: keys/dev-jwks.json") -> None:
    text = EXAMPLE_POLICY.read_text().replace("jwks_file: keys/dev-jwks.json", jwks)
    path.write_text(text.replace(LEVEL_LINE, LEVEL_LINE.replace("high", transfer_level)))


def _runtime(path: Path, keys: KeyStore) -> Runtime:
    return Runtime(
        load_policy(path, keys=keys), Telemetry(None, decision_log=None, metrics=Metrics()), FixedClock(NOW), keys=keys
    )


def _check(runtime: Runtime, token: str) -> str:
    return asyncio.run(runtime.evaluate(check_request(BALANCE, token=token))).decision.reason


def _in_process_loader(keys: KeyStore) -> Any:
    return lambda p: load_policy(p, keys=keys)


def test_a_reload_keeps_the_verified_token_cache(tmp_path: Path) -> None:
    """The same token after a reload (transfer level changed, same issuer and keys) is not
    verified again: the signature check is the process's, the reading is the new policy's."""
    (tmp_path / "keys").mkdir()
    shutil.copy(EXAMPLE_POLICY.parent / "keys" / "dev-jwks.json", tmp_path / "keys")
    path = tmp_path / "policy.yaml"
    _write(path)
    keys = KeyStore()
    runtime = _runtime(path, keys)
    tokens = [make_token(sub=f"user{i}") for i in range(5)]
    assert [_check(runtime, t) for t in tokens] == ["allowed"] * 5
    assert runtime.verifier.verifications == 5
    old = runtime.policy
    # The isolated default loader, then the in-process one.
    for level, loader in (("critical", None), ("low", _in_process_loader(keys))):
        _write(path, transfer_level=level)
        watcher = PolicyWatcher(path, runtime, interval=1, loader=loader)
        assert asyncio.run(watcher.reload()) is True
        assert runtime.policy is not old and runtime.policy.version != old.version
        assert [_check(runtime, t) for t in tokens] == ["allowed"] * 5
        assert runtime.verifier.verifications == 5  # no signature checked again
        rule = runtime.policy.tables.sensitivity("POST", "/bank.v1.Payments/Transfer")
        assert rule is not None and rule.level == level  # the new policy decides
        old = runtime.policy


def test_changed_keys_mean_the_token_is_verified_again(tmp_path: Path) -> None:
    """A cached verification counts only under the very same key set: when the JWKS file changes
    (the dev key is gone, a rotated one is in), the cached token is checked again and refused."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [_public(PRIVATE_JWK)]}))
    path = tmp_path / "policy.yaml"
    _write(path, jwks="jwks_file: jwks.json")
    keys = KeyStore()
    runtime = _runtime(path, keys)
    token = make_token()
    assert _check(runtime, token) == "allowed"
    rotated = RSAKey.generate_key(2048, parameters={"kid": "rotated-2"})
    jwks.write_text(json.dumps({"keys": [_public(rotated.as_dict(private=False))]}))
    watcher = PolicyWatcher(path, runtime, interval=1, loader=_in_process_loader(keys))
    assert asyncio.run(watcher.reload()) is True
    assert _check(runtime, token) == "unknown_key"
    assert runtime.verifier.verifications == 2  # checked again under the new key set, refused


def test_a_reload_refetches_an_unchanged_jwks_url_and_keeps_its_tokens_verified(tmp_path: Path) -> None:
    """A reload refetches every JWKS (so keys the IdP removed stop verifying at once); when the
    keys are the same, the provider and what it verified stay."""
    idp = FakeIdP(_public(PRIVATE_JWK))
    path = tmp_path / "policy.yaml"
    _write(path, jwks=f"jwks_uri: {URL}")
    keys = KeyStore(fetch=idp)
    runtime = _runtime(path, keys)
    assert idp.fetches == 1
    assert _check(runtime, make_token()) == "allowed"
    remote = runtime.policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    remote._last_attempt -= 60  # a while later (a reload skips a JWKS fetched just now)
    _write(path, jwks=f"jwks_uri: {URL}", transfer_level="critical")
    watcher = PolicyWatcher(path, runtime, interval=1, loader=_in_process_loader(keys))
    assert asyncio.run(watcher.reload()) is True
    assert runtime.policy.issuers[0].keys is remote  # the same provider, keys and all
    assert idp.fetches == 2
    assert _check(runtime, make_token()) == "allowed"
    assert runtime.verifier.verifications == 1
    # A URL the new policy names for the first time is fetched once, before it serves.
    _write(path, jwks=f"jwks_uri: {URL}?v=2")
    assert asyncio.run(watcher.reload()) is True
    assert idp.fetches == 3 and isinstance(runtime.policy.issuers[0].keys, RemoteKeys)
    assert runtime.policy.issuers[0].keys is not remote


def test_compiling_a_policy_fetches_nothing(tmp_path: Path) -> None:
    """Config parsing does no I/O: the key store hands out a provider for the URL; `prime` (the
    runtime, before the policy serves) is what fetches."""

    def no_network(url: str, timeout: float) -> bytes:
        raise AssertionError(f"fetched {url} while compiling")

    path = tmp_path / "policy.yaml"
    _write(path, jwks=f"jwks_uri: {URL}")
    text = path.read_text()
    keys = KeyStore(fetch=no_network)
    policy = compile_document(parse_text(text, str(path)), base_dir=tmp_path, digest=content_digest(text), keys=keys)
    remote = policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys) and remote.keyset() is None


def test_one_key_store_serves_two_policies_with_one_provider(tmp_path: Path) -> None:
    """Two policies naming the same JWKS file share one provider (what a candidate policy beside
    the active one will rely on: no second fetch, no second signature check)."""
    (tmp_path / "keys").mkdir()
    shutil.copy(EXAMPLE_POLICY.parent / "keys" / "dev-jwks.json", tmp_path / "keys")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    _write(a)
    _write(b, transfer_level="critical")
    keys = KeyStore()
    pa, pb = load_policy(a, keys=keys), load_policy(b, keys=keys)
    assert pa.issuers[0].keys is pb.issuers[0].keys
    from sidecar.attributes import from_check_request
    from sidecar.engine import Engine
    from sidecar.tokens import Verifier

    verifier = Verifier()
    token = make_token()
    for policy in (pa, pb):
        d = Engine(policy, verifier).decide(from_check_request(check_request(BALANCE, token=token)), NOW)
        assert d.reason == "allowed"
    assert verifier.verifications == 1
