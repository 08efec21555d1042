"""JWKS from a URL (cached, refreshed on an unknown kid, rate-limited) and policy hot reload."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import RSAKey

from sidecar.attributes import from_check_request
from sidecar.compiler import load_policy
from sidecar.engine import Engine
from sidecar.keys import RemoteKeys
from sidecar.runtime import PolicyWatcher, Runtime
from sidecar.telemetry import Metrics, Telemetry
from tests.helpers import EXAMPLE_POLICY, NOW, PRIVATE_JWK, FixedClock, check_request, make_token

BALANCE = "/bank.v1.Accounts/GetBalance"
URL = "https://idp.example.test/jwks"


class FakeIdP:
    """A JWKS endpoint double: serves `keys`, counts fetches, can be taken down."""

    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.fetches = 0
        self.down = False

    def __call__(self, url: str, timeout: float) -> bytes:
        assert url == URL
        self.fetches += 1
        if self.down:
            raise OSError("connection refused")
        return json.dumps({"keys": self.keys}).encode()


def _public(jwk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k in ("kty", "n", "e", "kid", "alg", "use")}


ROTATED = RSAKey.generate_key(2048, parameters={"kid": "rotated-2"})


def _policy_with_url(tmp_path: Path, idp: FakeIdP, clock: FixedClock) -> Any:
    text = EXAMPLE_POLICY.read_text().replace("jwks_file: keys/dev-jwks.json", f"jwks_uri: {URL}")
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    return load_policy(p, fetch=idp)


def _decide(engine: Engine, token: str) -> str:
    return engine.decide(from_check_request(check_request(BALANCE, token=token)), NOW).reason


def test_keys_are_fetched_at_load_and_cached(tmp_path: Path) -> None:
    idp = FakeIdP(_public(PRIVATE_JWK))
    engine = Engine(_policy_with_url(tmp_path, idp, FixedClock(NOW)))
    assert _decide(engine, make_token()) == "allowed"
    assert _decide(engine, make_token(sub="bob")) == "allowed"
    assert idp.fetches == 1


def test_unknown_kid_triggers_one_rate_limited_refresh(tmp_path: Path) -> None:
    idp = FakeIdP(_public(PRIVATE_JWK))
    policy = _policy_with_url(tmp_path, idp, FixedClock(NOW))
    runtime = Runtime(policy, Telemetry(None, decision_log=None, metrics=Metrics()), FixedClock(NOW))
    rotated_token = make_token(header={"kid": "rotated-2"}, key=ROTATED)
    remote = policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    remote._last_attempt = float("-inf")  # the load-time fetch does not count against the limit here
    idp.keys.append(_public(ROTATED.as_dict(private=False)))
    ev = asyncio.run(runtime.evaluate(check_request(BALANCE, token=rotated_token)))
    assert ev.decision.reason == "allowed" and idp.fetches == 2
    # A flood of made-up kids does not hammer the IdP: at most one fetch per interval.
    for i in range(5):
        ev = asyncio.run(
            runtime.evaluate(check_request(BALANCE, token=make_token(header={"kid": f"bogus{i}"})))
        )
        assert ev.decision.reason == "unknown_key"
    assert idp.fetches == 2


def test_idp_down_keeps_the_cached_keys(tmp_path: Path) -> None:
    idp = FakeIdP(_public(PRIVATE_JWK))
    policy = _policy_with_url(tmp_path, idp, FixedClock(NOW))
    remote = policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    idp.down = True
    remote._last_attempt = float("-inf")
    assert remote.refresh() is False and remote.fetch_failures == 1
    assert _decide(Engine(policy), make_token()) == "allowed"


def test_idp_down_at_start_refuses_tokens_with_a_warning(tmp_path: Path) -> None:
    idp = FakeIdP(_public(PRIVATE_JWK))
    idp.down = True
    policy = _policy_with_url(tmp_path, idp, FixedClock(NOW))
    assert any("could not be fetched" in w for w in policy.warnings)
    assert _decide(Engine(policy), make_token()) == "unknown_key"


# --- hot reload --------------------------------------------------------------------------------
def _configmap(tmp_path: Path, version: str, policy_text: str) -> None:
    """Lay out files like a mounted ConfigMap: each key is a symlink into ..data, ..data -> ..<ver>."""
    d = tmp_path / f"..{version}"
    d.mkdir()
    (d / "policy.yaml").write_text(policy_text)
    shutil.copy(EXAMPLE_POLICY.parent / "keys" / "dev-jwks.json", d / "dev-jwks.json")
    tmp = tmp_path / "..data_tmp"
    tmp.symlink_to(d.name)
    tmp.replace(tmp_path / "..data")  # atomic rename, as kubelet does
    for name in ("policy.yaml", "dev-jwks.json"):
        link = tmp_path / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def _text(transfer_level: str = "high") -> str:
    t = EXAMPLE_POLICY.read_text().replace("jwks_file: keys/dev-jwks.json", "jwks_file: dev-jwks.json")
    return t.replace(
        'match: ["/bank.v1.Payments/Transfer", "POST /v1/transfers"], level: high',
        f'match: ["/bank.v1.Payments/Transfer", "POST /v1/transfers"], level: {transfer_level}',
    )


@pytest.mark.parametrize("broken", ["version: [", "version: 1\n", _text("nonexistent")])
def test_configmap_swap_reloads_or_keeps_last_good(tmp_path: Path, broken: str) -> None:
    _configmap(tmp_path, "v1", _text())
    metrics = Metrics()
    runtime = Runtime(
        load_policy(tmp_path / "policy.yaml"), Telemetry(None, decision_log=None, metrics=metrics)
    )
    watcher = PolicyWatcher(tmp_path / "policy.yaml", runtime, interval=0.05)
    v1 = runtime.policy.version

    async def scenario() -> None:
        assert await watcher.check() is False  # nothing changed
        _configmap(tmp_path, "v2", broken)
        assert await watcher.check() is False
        assert runtime.policy.version == v1 and "policy.yaml" in watcher.last_error
        _configmap(tmp_path, "v3", _text("low"))
        assert await watcher.check() is True
        assert runtime.policy.version != v1 and watcher.last_error == ""

    asyncio.run(scenario())
    assert metrics.registry.get_sample_value("stepup_policy_reloads_total", {"result": "rejected"}) == 1
    assert metrics.registry.get_sample_value("stepup_policy_reloads_total", {"result": "applied"}) == 1
    rule = runtime.policy.tables.sensitivity("POST", "/bank.v1.Payments/Transfer")
    assert rule is not None and rule.level == "low"


def test_a_changed_jwks_file_alone_triggers_a_reload(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [_public(PRIVATE_JWK)]}))
    text = EXAMPLE_POLICY.read_text().replace("jwks_file: keys/dev-jwks.json", "jwks_file: jwks.json")
    (tmp_path / "policy.yaml").write_text(text)
    runtime = Runtime(
        load_policy(tmp_path / "policy.yaml"), Telemetry(None, decision_log=None, metrics=Metrics())
    )
    watcher = PolicyWatcher(tmp_path / "policy.yaml", runtime, interval=0.05)
    rotated = make_token(header={"kid": "rotated-2"}, key=ROTATED)
    assert _decide(runtime.engine, rotated) == "unknown_key"
    jwks.write_text(json.dumps({"keys": [_public(ROTATED.as_dict(private=False))]}))

    assert asyncio.run(watcher.check()) is True
    assert _decide(runtime.engine, rotated) == "allowed"
    assert _decide(runtime.engine, make_token()) == "unknown_key"  # the removed key no longer verifies


def test_a_slow_idp_does_not_hold_a_check_beyond_the_refresh_wait(tmp_path: Path) -> None:
    import time

    idp = FakeIdP(_public(PRIVATE_JWK))
    policy = _policy_with_url(tmp_path, idp, FixedClock(NOW))
    remote = policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    remote._last_attempt = float("-inf")

    def slow(url: str, timeout: float) -> bytes:
        time.sleep(1.0)
        return idp(url, timeout)

    remote._fetch = slow
    runtime = Runtime(policy, Telemetry(None, decision_log=None, metrics=Metrics()), FixedClock(NOW))

    async def scenario() -> tuple[str, float]:
        t0 = time.monotonic()
        ev = await runtime.evaluate(check_request(BALANCE, token=make_token(header={"kid": "unknown"})))
        elapsed = time.monotonic() - t0
        await asyncio.sleep(1.2)  # let the background fetch finish before the loop closes
        return ev.decision.reason, elapsed

    reason, elapsed = asyncio.run(scenario())
    assert reason == "unknown_key" and elapsed < 0.9


def test_stale_remote_keys_are_refetched_periodically(tmp_path: Path) -> None:
    idp = FakeIdP(_public(PRIVATE_JWK))
    policy = _policy_with_url(tmp_path, idp, FixedClock(NOW))
    remote = policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    runtime = Runtime(policy, Telemetry(None, decision_log=None, metrics=Metrics()), FixedClock(NOW))
    asyncio.run(runtime.refresh_stale_keys())
    assert idp.fetches == 1  # still fresh: nothing fetched
    remote._fresh.clear()
    remote._last_attempt = float("-inf")
    idp.keys = [_public(ROTATED.as_dict(private=False))]  # the IdP dropped the old key
    asyncio.run(runtime.refresh_stale_keys())
    assert idp.fetches == 2
    assert _decide(runtime.engine, make_token()) == "unknown_key"


def test_jwks_fetches_and_failures_are_counted_by_issuer(tmp_path: Path) -> None:
    idp = FakeIdP(_public(PRIVATE_JWK))
    policy = _policy_with_url(tmp_path, idp, FixedClock(NOW))
    metrics = Metrics()
    runtime = Runtime(policy, Telemetry(None, decision_log=None, metrics=metrics), FixedClock(NOW))
    remote = policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)

    def sample(result: str) -> float | None:
        metrics.sync(runtime.verifier, {"active": runtime.policy})
        return metrics.registry.get_sample_value("stepup_jwks_fetches_total", {"issuer": "dev", "result": result})

    assert sample("ok") == 1 and sample("failed") == 0  # the load-time fetch
    idp.down = True
    remote._last_attempt = float("-inf")
    assert remote.refresh() is False
    assert sample("ok") == 1 and sample("failed") == 1
    idp.down = False
    remote._last_attempt = float("-inf")
    assert remote.refresh() is True
    assert sample("ok") == 2 and sample("failed") == 1
    assert sample("ok") == 2  # syncing again adds nothing
    info = metrics.registry.get_sample_value(
        "stepup_policy_info",
        {"role": "active", "name": "bank-demo", "version": policy.version, "hash": policy.version.split("@")[1]},
    )
    assert info == 1


def _runtime_with_url(tmp_path: Path, idp: FakeIdP) -> tuple[Runtime, Path]:
    from sidecar.keys import KeyStore

    text = EXAMPLE_POLICY.read_text().replace("jwks_file: keys/dev-jwks.json", f"jwks_uri: {URL}")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    keys = KeyStore(idp)
    policy = load_policy(path, keys=keys)
    return Runtime(policy, Telemetry(None, decision_log=None, metrics=Metrics()), FixedClock(NOW), keys=keys), path


def _reason(runtime: Runtime, token: str) -> str:
    return asyncio.run(runtime.evaluate(check_request(BALANCE, token=token))).decision.reason


def test_a_key_the_idp_removed_stops_verifying_tokens_it_verified_before(tmp_path: Path) -> None:
    idp = FakeIdP(_public(PRIVATE_JWK))
    runtime, _ = _runtime_with_url(tmp_path, idp)
    token = make_token()
    assert _reason(runtime, token) == "allowed"
    assert _reason(runtime, token) == "allowed"  # (now in the policy's memo and the verified cache)
    remote = runtime.policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    idp.keys = [_public(ROTATED.as_dict(private=False))]  # the IdP drops the key
    remote._last_attempt = float("-inf")
    assert remote.refresh() is True
    assert _reason(runtime, token) == "unknown_key"
    assert _reason(runtime, make_token(sub="bob")) == "unknown_key"


def test_a_refetch_that_brings_the_same_keys_keeps_tokens_verified(tmp_path: Path) -> None:
    idp = FakeIdP(_public(PRIVATE_JWK))
    runtime, _ = _runtime_with_url(tmp_path, idp)
    token = make_token()
    assert _reason(runtime, token) == "allowed"
    before = runtime.verifier.verifications
    remote = runtime.policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    assert remote.refresh(force=True) is True and idp.fetches == 2
    assert _reason(runtime, token) == "allowed"
    assert runtime.verifier.verifications == before  # no signature checked again


def test_a_reload_refetches_the_jwks_so_a_removed_key_stops_verifying_at_once(tmp_path: Path) -> None:
    idp = FakeIdP(_public(PRIVATE_JWK))
    runtime, path = _runtime_with_url(tmp_path, idp)
    seen = make_token()
    assert _reason(runtime, seen) == "allowed"
    idp.keys = [_public(ROTATED.as_dict(private=False))]  # compromised key removed at the IdP
    watcher = PolicyWatcher(path, runtime, 0)
    remote = runtime.policy.issuers[0].keys
    assert isinstance(remote, RemoteKeys)
    remote._last_attempt -= 60  # a while later (a reload skips a JWKS fetched just now)

    async def reload() -> bool:
        return await watcher.reload()

    fetches = idp.fetches
    assert asyncio.run(reload()) is True
    assert idp.fetches == fetches + 1  # refetched although the provider was reused
    assert _reason(runtime, seen) == "unknown_key"
    assert _reason(runtime, make_token(sub="mallory")) == "unknown_key"  # never seen before


def test_the_identity_memo_never_answers_for_an_earlier_instant(tmp_path: Path) -> None:
    """(`stepup-sidecar test` runs cases at any `at`; a clock may step back.)"""
    idp = FakeIdP(_public(PRIVATE_JWK))
    runtime, _ = _runtime_with_url(tmp_path, idp)
    token = make_token(nbf=NOW - 5)
    assert _reason(runtime, token) == "allowed"
    runtime.clock = FixedClock(NOW - 3600)  # type: ignore[assignment]
    assert _reason(runtime, token) != "allowed"


@pytest.mark.parametrize(
    ("old", "new"),
    [("    algorithms: [RS256]\n", "    algorithms: [RS256, ES256]\n"),
     ("    algorithms: [RS256]\n", "    algorithms: [RS256]\n    jwks_refresh: 5m\n")],
)
def test_a_reload_that_changes_only_algorithms_or_refresh_keeps_the_keys_while_the_idp_is_down(
    tmp_path: Path, old: str, new: str
) -> None:
    """Red-team F10: such a change made a new, empty provider; with the IdP unreachable at that
    moment, every token of the issuer was refused until it answered again."""
    idp = FakeIdP(_public(PRIVATE_JWK))
    runtime, path = _runtime_with_url(tmp_path, idp)
    token = make_token()
    assert _reason(runtime, token) == "allowed"
    before = runtime.policy.issuers[0].keys
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    idp.down = True
    watcher = PolicyWatcher(path, runtime, 0)

    async def reload() -> bool:
        return await watcher.reload()

    assert asyncio.run(reload()) is True
    after = runtime.policy.issuers[0].keys
    assert isinstance(after, RemoteKeys) and after is not before  # a provider of its own
    assert after.keyset() is not None and after.keyset() is not before.keyset()
    assert _reason(runtime, token) == "allowed"  # verified again, under the new algorithms
    assert _reason(runtime, make_token(sub="bob")) == "allowed"


def test_narrowed_algorithms_refilter_the_seeded_keys(tmp_path: Path) -> None:
    from joserfc.jwk import ECKey

    from sidecar.keys import KeyStore

    ec = ECKey.generate_key("P-256", parameters={"kid": "ec-1", "alg": "ES256"}).as_dict(private=False)
    idp = FakeIdP(_public(PRIVATE_JWK), ec)
    store = KeyStore(idp)
    both = store.remote(URL, ["RS256", "ES256"], 600)
    assert both.refresh() is True
    ks = both.keyset()
    assert ks is not None and sorted(k.as_dict()["kty"] for k in ks.keys) == ["EC", "RSA"]
    idp.down = True
    rs_only = store.remote(URL, ["RS256"], 600)
    ks = rs_only.keyset()
    assert ks is not None and [k.as_dict()["kty"] for k in ks.keys] == ["RSA"]
