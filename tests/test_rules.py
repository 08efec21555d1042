"""Policy tables, assurance derivation and risk rules as pure functions."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from sidecar.assurance import build_issuer_acr, level_from_claims
from sidecar.attributes import from_check_request
from sidecar.compiler import load_policy_text
from sidecar.policy import SubjectView, build_index
from sidecar.risk import DeviceUnknown, OutsideHours, SourceNotIn
from tests.helpers import NOW, check_request, example_policy_text, make_token


# --- operation index ---------------------------------------------------------------------------
def _index(patterns: list[str]):  # type: ignore[no-untyped-def]
    errors: list[str] = []
    idx = build_index([(p, p) for p in patterns], lambda pos, m: errors.append(m), unique=lambda v: v)
    assert not errors
    return idx


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/svc.A/Get", "/svc.A/Get"),
        ("POST", "/svc.A/Put", "/svc.A/*"),
        ("GET", "/v1/items/7", "GET /v1/items/*"),
        ("DELETE", "/v1/items/7", "/v1/**"),
        ("GET", "/v1/items/7/parts", "/v1/**"),
        ("GET", "/v1", "/v1/**"),
        ("GET", "/v1/items/", "/v1/**"),  # '*' never matches an empty segment
        ("GET", "/other", None),
    ],
)
def test_most_specific_pattern_wins(method: str, path: str, expected: str | None) -> None:
    idx = _index(["/svc.A/Get", "/svc.A/*", "GET /v1/items/*", "/v1/**"])
    assert idx.most_specific(method, path) == expected


def test_all_matches_are_found_for_permissions() -> None:
    idx = _index(["/svc.A/Get", "/svc.A/*", "/**"])
    assert idx.all_matches("POST", "/svc.A/Get") == ("/svc.A/Get", "/svc.A/*", "/**")


def test_lookup_in_100k_rules() -> None:
    patterns = [f"/pkg{i % 100}.Service{i}/*" for i in range(100_000)]
    idx = _index(patterns)
    assert idx.most_specific("POST", "/pkg7.Service99907/Call") == "/pkg7.Service99907/*"
    assert idx.most_specific("POST", "/pkg7.Service99907") is None


def test_principal_patterns_are_literal_not_regex() -> None:
    text = example_policy_text(
        (
            'allow: {principals: ["spiffe://cluster.local/ns/bank/sa/ledger"]}',
            'allow: {principals: ["spiffe://cluster.local/ns/bank.prod/sa/*"]}',
        )
    )
    policy = load_policy_text(text)
    tables = policy.tables

    def granted(principal: str) -> bool:
        who = SubjectView(False, "", "", frozenset(), frozenset(), frozenset(), principal)
        return tables.permission("POST", "/bank.v1.Accounts/GetBalance", who).granted

    assert granted("spiffe://cluster.local/ns/bank.prod/sa/ledger")
    assert not granted("spiffe://cluster.local/ns/bankXprod/sa/ledger")  # '.' is not a wildcard
    assert not granted("spiffe://cluster.local/ns/bank.prod/sa")


# --- assurance ---------------------------------------------------------------------------------
LEVELS = ("aal1", "aal2", "aal3")
VOCAB = build_issuer_acr(
    LEVELS, {"aal1": (["silver"], []), "aal2": (["gold"], []), "aal3": (["platinum"], [])}
)


@pytest.mark.parametrize(
    ("acr", "amr", "expected"),
    [
        (("gold",), (), (1, "acr")),
        (("gold",), ("pwd",), (1, "acr")),  # amr never lowers a mapped acr
        (("silver", "platinum"), (), (2, "acr")),  # strongest mapped value of a list (Entra acrs)
        ((), ("pwd",), (0, "amr")),
        ((), ("otp",), (0, "amr")),
        ((), ("pwd", "otp"), (1, "amr")),  # knowledge + possession
        ((), ("pwd", "kba"), (0, "amr")),  # two methods of one class are one factor
        ((), ("mfa",), (1, "amr")),
        ((), ("hwk", "face", "pin", "mfa"), (1, "amr")),  # never the top level from amr
        (("unmapped",), (), (None, "")),
        ((), (), (None, "")),
        # `user` is a presence test, not a factor (RFC 8176): a key tap without PIN is one factor
        ((), ("pwd", "user"), (0, "amr")),
        ((), ("hwk", "user"), (0, "amr")),
        ((), ("pwd", "bio"), (0, "amr")),  # `bio` is no RFC 8176 value
        # values that name no authentication factor derive no level at all
        ((), ("rba",), (None, "")),
        ((), ("",), (None, "")),
        ((), ("user",), (None, "")),
        # OIDC acr "0": explicitly no assurance, whatever amr says
        (("0",), ("pwd", "otp"), (None, "")),
    ],
)
def test_level_from_acr_and_amr(
    acr: tuple[str, ...], amr: tuple[str, ...], expected: tuple[int | None, str]
) -> None:
    assert level_from_claims(acr, amr, VOCAB, len(LEVELS), True) == expected


def test_amr_derivation_can_be_disabled() -> None:
    assert level_from_claims((), ("pwd", "otp"), VOCAB, 3, False) == (None, "")


def test_challenge_lists_required_level_then_stronger_ones() -> None:
    vocab = build_issuer_acr(
        LEVELS, {"aal1": (["a1"], []), "aal2": (["a2", "a2b"], ["a2"]), "aal3": (["a3"], [])}
    )
    assert vocab.request == (("a1", "a2", "a3"), ("a2", "a3"), ("a3",))


# --- risk --------------------------------------------------------------------------------------
def _attrs(**kw):  # type: ignore[no-untyped-def]
    return from_check_request(check_request(token=make_token(), **kw))


def test_source_network_rule() -> None:
    import ipaddress

    rule = SourceNotIn((ipaddress.ip_network("10.0.0.0/8"),))
    assert not rule.fires(_attrs(source="10.2.3.4"), NOW)
    assert rule.fires(_attrs(source="192.168.1.1"), NOW)
    assert rule.fires(_attrs(source="not-an-ip"), NOW)
    assert rule.fires(_attrs(source=""), NOW)


def test_device_rule_fires_on_missing_or_unknown_device() -> None:
    rule = DeviceUnknown("x-device-id", frozenset({"laptop-1"}))
    assert rule.fires(_attrs(), NOW)
    assert rule.fires(_attrs(headers={"x-device-id": "  "}), NOW)
    assert rule.fires(_attrs(headers={"x-device-id": "phone-9"}), NOW)
    assert not rule.fires(_attrs(headers={"x-device-id": "laptop-1"}), NOW)
    assert not DeviceUnknown("x-device-id", frozenset()).fires(_attrs(headers={"x-device-id": "any"}), NOW)


def _at(zone: str, y: int, mo: int, d: int, h: int, mi: int) -> float:
    return dt.datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(zone)).timestamp()


def test_hours_rule_uses_the_named_time_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    rule = OutsideHours(berlin, frozenset(range(5)), 7 * 60, 20 * 60)  # Mon-Fri 07:00-20:00
    a = _attrs()
    assert not rule.fires(a, _at("Europe/Berlin", 2026, 11, 25, 9, 0))  # Wednesday 09:00
    assert rule.fires(a, _at("Europe/Berlin", 2026, 11, 25, 20, 0))  # end is exclusive
    assert rule.fires(a, _at("Europe/Berlin", 2026, 11, 25, 6, 59))
    assert rule.fires(a, _at("Europe/Berlin", 2026, 11, 28, 12, 0))  # Saturday
    # 07:30 in Berlin is 06:30 UTC: the zone, not UTC, decides
    assert not rule.fires(a, _at("UTC", 2026, 11, 25, 6, 30))


def test_hours_window_across_midnight() -> None:
    rule = OutsideHours(ZoneInfo("UTC"), frozenset({0}), 22 * 60, 6 * 60)  # Monday 22:00 - Tuesday 06:00
    a = _attrs()
    assert not rule.fires(a, _at("UTC", 2026, 11, 23, 23, 0))  # Monday 23:00
    assert not rule.fires(a, _at("UTC", 2026, 11, 24, 5, 0))  # Tuesday 05:00
    assert rule.fires(a, _at("UTC", 2026, 11, 24, 23, 0))  # Tuesday 23:00


def test_risk_rules_raise_by_one_and_cap_max_age_in_a_policy() -> None:
    text = example_policy_text()
    text = text.replace(
        "risk:\n",
        "risk:\n  - id: unknown-device\n    when: {device_unknown: {header: x-device-id}}\n    raise: 1\n"
        "    max_age: 10m\n",
    )
    from sidecar.engine import Engine

    engine = Engine(load_policy_text(text))
    ok = engine.decide(_attrs(headers={"x-device-id": "d1"}), NOW)
    assert ok.allowed
    d = engine.decide(_attrs(), NOW)
    assert (d.reason, d.acr_values) == ("acr_too_low", ("urn:okta:loa:2fa:any", "phr", "phrh"))
    assert d.requirement is not None and d.requirement.max_age == 600
    assert "unknown-device" in d.matched_rules
