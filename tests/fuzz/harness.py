"""The fuzz target and its invariants: one input (the bytes of a serialized CheckRequest) through
`AuthorizationServicer.check_bytes` under each fuzzed policy, and what every answer must be.

For every input, whatever it holds (`check` raises `Violation` otherwise):

- no exception escapes the servicer; the internal-error counter does not move, the sidecar logs
  no error (a telemetry failure is swallowed and only logged), the reason is never
  `internal_error`;
- the answer parses as a CheckResponse and is well formed: status 0 <-> `ok_response`; otherwise a
  `denied_response` with HTTP 400/401/403 and the matching gRPC code 3/16/7, `status.message` the
  reason code (also in the dynamic metadata), `www-authenticate` exactly on 400/401 answers (and
  on the 403 `insufficient_scope` answer, README row 4), `grpc-status` and a decodable
  `grpc-status-details-bin` for gRPC callers, a JSON body with the same `reason` for HTTP callers,
  no CR, LF or NUL in any header; an unparsable input is a 400 `malformed_request`;
- on allow, each identity header is set with OVERWRITE_IF_EXISTS_OR_ADD or removed;
- when the independent reference (tests/reference.py) imports: nothing is allowed that it denies.
  Other disagreements with it are written to a triage log (JSON lines), never failed.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from sidecar._proto.envoy.config.core.v3 import base_pb2
from sidecar._proto.envoy.service.auth.v3 import external_auth_pb2
from sidecar.compiler import load_policy_text
from sidecar.runtime import Runtime
from sidecar.server import AuthorizationServicer
from sidecar.telemetry import Metrics, Telemetry
from tests.fuzz.generate import SECOND_ISSUER
from tests.helpers import EXAMPLE_POLICY, NOW, FixedClock

try:  # written by another engineer; the reference check switches itself on once it imports
    from tests.reference import Reference
except Exception as e:  # missing, or broken mid-edit
    Reference = None  # type: ignore[assignment,misc]
    REFERENCE_PROBLEM = f"{type(e).__name__}: {e}"
else:
    REFERENCE_PROBLEM = ""

ROOT = EXAMPLE_POLICY.parent.parent
JWKS_FILE = EXAMPLE_POLICY.parent / "keys" / "dev-jwks.json"
JWKS = json.loads(JWKS_FILE.read_text())
DEFAULT_TRIAGE_LOG = ROOT / ".fuzz" / "disagreements.jsonl"

GRPC_CODE = {400: 3, 401: 16, 403: 7}
IDENTITY_HEADERS = ("x-auth-subject", "x-auth-issuer", "x-auth-assurance", "x-auth-decision-id")
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
ALLOW_REASONS = frozenset({"public", "allowed", "workload_granted"})
# The README's decision table and spec-issue8; a code outside this set is logged for triage.
KNOWN_REASONS = ALLOW_REASONS | frozenset(
    {
        "invalid_path", "invalid_header", "invalid_method", "ambiguous_credentials", "malformed_request",
        "no_matching_rule", "unknown_sensitivity", "missing_credential", "token_expired", "bad_signature",
        "unknown_key", "unknown_issuer", "wrong_audience", "disallowed_algorithm", "malformed_token",
        "invalid_claim", "token_not_yet_valid", "token_issued_in_future", "invalid_token",
        "permission_denied", "insufficient_scope", "acr_too_low", "auth_too_old", "amr_missing",
    }
)  # fmt: skip
_REASON_FORM = re.compile(r"[a-z][a-z0-9_]*")


class Violation(AssertionError):
    """An answer that breaks an invariant (the fuzzer's crash). `signature` names its kind (for
    grouping findings); the message says what exactly."""

    def __init__(self, message: str, signature: str = "") -> None:
        super().__init__(message)
        self.signature = signature or message.split("\n", 1)[0][:160]


# ------------------------------------------------------------------------------------------------
# Policies
# ------------------------------------------------------------------------------------------------


def example_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE_POLICY.read_text())
    doc["issuers"][0]["jwks_file"] = str(JWKS_FILE)
    return doc


def variant_doc() -> dict[str, Any]:
    """The example policy plus every other kind of rule: a second issuer with dotted claim names and
    a list-valued acr claim, `anyone` on a non-public operation, principal prefixes, users, groups,
    issuers, roles + scopes, required_amr, a freshness-only level, literal reserved characters in
    patterns, and all three risk conditions (one of each firing at the fixed clock, one not)."""
    doc = example_doc()
    doc["issuers"].append(
        {
            "id": "partner",
            "issuer": SECOND_ISSUER,
            "audiences": ["partner-api"],
            "jwks_file": str(JWKS_FILE),
            "algorithms": ["RS256", "ES256"],
            "jwt_authn_payload": "partner_payload",
            "claims": {"subject": "uid", "roles": "realm_access.roles", "acr": "acrs"},
            "acr": {
                "aal1": {"accept": ["bronze", "silver"], "request": ["silver"]},
                "aal2": {"accept": ["gold"]},
                "aal2_phr": {"accept": ["platinum"]},
                "aal3": {"accept": ["diamond"], "implies_amr": {"diamond": ["hwk"]}},
            },
        }
    )
    doc["issuers"][0]["acr"]["aal3"]["implies_amr"] = {"phrh": ["hwk"]}  # required_amr must be askable
    levels = doc["sensitivity"]["levels"]
    levels["step_hwk"] = {"min_assurance": "aal2", "required_amr": ["hwk"]}
    levels["fresh_only"] = {"max_age": "5m"}
    doc["sensitivity"]["rules"] += [
        {"id": "statements", "match": ["GET /v1/accounts/*/statements"], "level": "step_hwk"},
        {"id": "freeze", "match": ["POST /v1/accounts/7:freeze"], "level": "high"},
        {"id": "me", "match": ["GET /v1/users/@me"], "level": "low"},
        {"id": "partner", "match": ["GET /v1/partner/**"], "level": "low"},
        {"id": "ops", "match": ["GET /v1/ops/**"], "level": "fresh_only"},
        {"id": "docs", "match": ["GET /docs/*"], "level": "public"},
        {"id": "docs-secret", "match": ["GET /docs/secret"], "level": "critical"},
        {"id": "refund", "match": ["/bank.v1.Payments/Refund"], "level": "personal"},
    ]
    doc["permissions"] += [
        {"id": "anyone-history", "match": ["GET /v1/accounts/*/history/**"], "allow": {"anyone": True}},
        {"id": "batch", "match": ["/bank.v1.Accounts/*"], "allow": {"principals": ["spiffe://cluster.local/ns/bank/sa/batch-*"]}},
        {"id": "bob-admin-users", "match": ["GET /v1/admin/users"], "allow": {"users": ["bob"]}},
        {"id": "auditors", "match": ["GET /v1/admin/**"], "allow": {"roles": ["auditor"], "scopes": ["audit"]}},
        {"id": "freeze", "match": ["POST /v1/accounts/7:freeze"], "allow": {"roles": ["teller"]}},
        {"id": "me", "match": ["GET /v1/users/@me"], "allow": {"authenticated": True}},
        {"id": "partner", "match": ["GET /v1/partner/**"], "allow": {"issuers": ["partner"]}},
        {"id": "ops", "match": ["GET /v1/ops/**"], "allow": {"groups": ["ops"]}},
        {"id": "docs", "match": ["GET /docs/*"], "allow": {"anyone": True}},
        {"id": "docs-secret", "match": ["GET /docs/secret"], "allow": {"roles": ["admin"]}},
        {"id": "refund", "match": ["/bank.v1.Payments/Refund"], "allow": {"roles": ["teller"], "principals": [LEDGER_PRINCIPAL]}},
        {"id": "partner-tellers", "match": ["GET /v1/accounts/**"], "allow": {"issuers": ["partner"], "roles": ["teller"]}},
    ]  # fmt: skip
    # With two issuers a rule on roles, scopes, users or groups must say whose they are (a load
    # error otherwise): the example's rules are the dev issuer's.
    for rule in doc["permissions"]:
        allow = rule["allow"]
        if "issuers" not in allow and allow.keys() & {"roles", "scopes", "users", "groups"}:
            allow["issuers"] = ["dev"]
    doc["risk"] += [
        {"id": "unknown-device", "when": {"device_unknown": {"header": "x-device-id", "known": ["laptop-7f3a"]}}, "raise": 1},
        # NOW is Friday 2027-01-15 09:00 in Berlin: this window excludes it (fires, no raise) ...
        {"id": "off-hours", "when": {"outside_hours": {"timezone": "Europe/Berlin", "days": ["mon", "tue", "wed", "thu", "fri"], "from": "10:00", "to": "18:00"}}, "raise": 0, "max_age": "20m"},
        # ... this one includes it (does not fire) ...
        {"id": "friday-morning", "when": {"outside_hours": {"timezone": "Europe/Berlin", "days": ["fri"], "from": "08:00", "to": "10:00"}}, "raise": 2},
        # ... and this one crosses midnight (09:00 is outside it: fires).
        {"id": "night-shift", "when": {"outside_hours": {"timezone": "UTC", "days": ["thu", "fri"], "from": "22:00", "to": "06:00"}}, "raise": 0, "max_age": "2h"},
    ]  # fmt: skip
    return doc


LEDGER_PRINCIPAL = "spiffe://cluster.local/ns/bank/sa/ledger"
POLICY_DOCS = {"example": example_doc, "variant": variant_doc}


# ------------------------------------------------------------------------------------------------
# What the sidecar answered
# ------------------------------------------------------------------------------------------------


@dataclass
class Observed:
    policy: str
    outcome: str
    http_status: int
    reason: str
    grpc_shape: bool = False
    www: str = ""
    upstream: dict[str, str] = field(default_factory=dict)
    removed: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {"outcome": self.outcome, "http_status": self.http_status, "reason": self.reason}
        if self.www:
            d["www"] = self.www
        if self.upstream:
            d["upstream"] = {k: v for k, v in self.upstream.items() if k != "x-auth-decision-id"}
        return d


def parse_request(data: bytes) -> Any | None:
    """As the servicer parses (protobuf's own limits decide what does not parse)."""
    try:
        return external_auth_pb2.CheckRequest.FromString(data)
    except Exception:
        return None


def request_json(req: Any) -> str:
    """The request as protobuf JSON, or "null" when it holds what JSON cannot (NaN in a Struct)."""
    try:
        return json_format.MessageToJson(req, indent=None)
    except Exception:
        return "null"


def expected_grpc_caller(req: Any) -> bool | None:
    """Whether the caller is a gRPC one (its content-type starts with application/grpc, repeats
    joined as Envoy joins them); None when the request leaves it open (both header forms, or two
    spellings of content-type in the `headers` map, whose order protobuf does not keep)."""
    if req is None:
        return False
    http = req.attributes.request.http
    if len(http.header_map.headers):
        if len(http.headers):
            return None
        values = []
        for h in http.header_map.headers:
            if h.key.lower() == "content-type":
                raw = h.raw_value if h.raw_value else h.value.encode("utf-8")
                try:
                    values.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    return None
        return ",".join(values).startswith("application/grpc")
    keys = [k for k in http.headers if k.lower() == "content-type"]
    if len(keys) > 1:
        return None
    return bool(keys) and http.headers[keys[0]].startswith("application/grpc")


def _fail(what: str, policy: str, resp: Any = None) -> None:
    detail = f"\n  answer: {json_format.MessageToJson(resp, indent=None)[:2000]}" if resp is not None else ""
    raise Violation(f"[{policy}] {what}{detail}", f"[{policy}] {what}"[:160])


def check_response(policy: str, req: Any | None, out: Any) -> Observed:
    """Every invariant of one wire answer (see the module docstring) -> what it says."""
    if not isinstance(out, bytes):
        _fail(f"check_bytes returned {type(out).__name__}, not bytes", policy)
    try:
        resp = external_auth_pb2.CheckResponse.FromString(out)
    except Exception as e:
        _fail(f"the answer does not parse as a CheckResponse ({type(e).__name__})", policy)
    md = resp.dynamic_metadata.fields
    md_reason = md["reason"].string_value if "reason" in md else ""
    md_outcome = md["outcome"].string_value if "outcome" in md else ""
    md_id = md["decision_id"].string_value if "decision_id" in md else ""
    if not md_id:
        _fail("no decision_id in the dynamic metadata", policy, resp)
    code = resp.status.code

    if code == 0:
        if not resp.HasField("ok_response") or resp.HasField("denied_response"):
            _fail("status OK without ok_response (or with a denied_response)", policy, resp)
        if md_outcome != "allow" or md_reason not in ALLOW_REASONS:
            _fail(f"OK answer with metadata outcome {md_outcome!r}, reason {md_reason!r}", policy, resp)
        if req is None:
            _fail("an unparsable request was allowed", policy, resp)
        ok = resp.ok_response
        upstream: dict[str, str] = {}
        for o in ok.headers:
            key, value = o.header.key, o.header.value
            if key in upstream:
                _fail(f"upstream header {key!r} set twice", policy, resp)
            if o.append_action != OVERWRITE or (o.HasField("append") and o.append.value):
                _fail(f"upstream header {key!r} is not OVERWRITE_IF_EXISTS_OR_ADD", policy, resp)
            _clean(policy, key, value, resp)
            upstream[key] = value
        removed = tuple(ok.headers_to_remove)
        for name in IDENTITY_HEADERS:
            if (name in upstream) == (name in removed):
                state = "both set and removed" if name in upstream else "neither set nor removed"
                _fail(f"identity header {name!r} is {state}", policy, resp)
        if upstream.get("x-auth-decision-id") != md_id:
            _fail("x-auth-decision-id is not the decision id", policy, resp)
        if ("x-auth-subject" in upstream) != ("x-auth-issuer" in upstream):
            _fail("x-auth-subject without x-auth-issuer (or the reverse)", policy, resp)
        return Observed(policy, "allow", 200, md_reason, upstream=upstream, removed=removed)

    if resp.HasField("ok_response") or not resp.HasField("denied_response"):
        _fail("a non-OK status without a denied_response (or with an ok_response)", policy, resp)
    denied = resp.denied_response
    status = int(denied.status.code)
    if status not in GRPC_CODE:
        _fail(f"HTTP status {status} is not 400, 401 or 403", policy, resp)
    if code != GRPC_CODE[status]:
        _fail(f"gRPC code {code} does not match HTTP {status}", policy, resp)
    reason = resp.status.message
    if reason == "internal_error":
        _fail("internal_error", policy, resp)
    if not _REASON_FORM.fullmatch(reason):
        _fail(f"status.message {reason!r} is not a reason code", policy, resp)
    if md_reason != reason:
        _fail(f"metadata reason {md_reason!r} != status.message {reason!r}", policy, resp)
    if (req is None) != (reason == "malformed_request"):
        _fail(f"parsable={req is not None} but reason {reason!r}", policy, resp)
    if reason == "malformed_request" and status != 400:
        _fail("malformed_request is not a 400", policy, resp)

    headers: dict[str, str] = {}
    for o in denied.headers:
        key, value = o.header.key, o.header.value
        if key in headers:
            _fail(f"response header {key!r} twice", policy, resp)
        _clean(policy, key, value, resp)
        headers[key] = value
    www = headers.get("www-authenticate", "")
    want_www = status in (400, 401) or reason == "insufficient_scope"
    if bool(www) != want_www:
        _fail(f"www-authenticate {'missing' if want_www else 'present'} on a {status} {reason}", policy, resp)
    if www and not www.startswith('Bearer realm="'):
        _fail("www-authenticate is not a Bearer challenge with a realm", policy, resp)
    step_up = 'error="insufficient_user_authentication"' in www
    if status == 400 and 'error="invalid_request"' not in www:
        _fail("a 400 challenge without error=invalid_request", policy, resp)
    outcome = "step_up" if step_up else "unauthenticated" if status == 401 else "deny"
    if step_up and status != 401:
        _fail("a step-up challenge on a non-401 answer", policy, resp)
    if md_outcome != outcome:
        _fail(f"metadata outcome {md_outcome!r}, but the answer reads as {outcome!r}", policy, resp)

    grpc_caller = expected_grpc_caller(req)
    grpc_shape = "grpc-status" in headers
    if grpc_caller is not None and grpc_shape != grpc_caller:
        _fail(f"{'gRPC' if grpc_caller else 'HTTP'} caller got the other caller's answer", policy, resp)
    if grpc_shape:
        if headers["grpc-status"] != str(code):
            _fail("grpc-status does not match status.code", policy, resp)
        details = headers.get("grpc-status-details-bin")
        if details is None:
            _fail("grpc-status without grpc-status-details-bin", policy, resp)
        try:
            st = status_pb2.Status.FromString(base64.b64decode(details, validate=True))
        except Exception:  # binascii.Error, DecodeError
            _fail("grpc-status-details-bin does not decode to a google.rpc.Status", policy, resp)
        info = error_details_pb2.ErrorInfo()
        if st.code != code or len(st.details) != 1 or not st.details[0].Unpack(info):
            _fail("grpc-status-details-bin: wrong code or no ErrorInfo", policy, resp)
        if info.metadata.get("reason") != reason or info.metadata.get("decision_id") != md_id:
            _fail("ErrorInfo metadata reason / decision_id differ from the answer's", policy, resp)
    else:
        if "grpc-status-details-bin" in headers:
            _fail("grpc-status-details-bin without grpc-status", policy, resp)
        try:
            body = json.loads(denied.body)
        except ValueError:
            _fail("an HTTP caller's body is not JSON", policy, resp)
        if not isinstance(body, dict) or body.get("reason") != reason or body.get("decision_id") != md_id:
            _fail("the JSON body's reason / decision_id differ from the answer's", policy, resp)
        if headers.get("content-type") != "application/json":
            _fail("an HTTP caller's JSON body without content-type application/json", policy, resp)
    return Observed(policy, outcome, status, reason, grpc_shape, www)


def _clean(policy: str, key: str, value: str, resp: Any) -> None:
    if any(c in key or c in value for c in "\r\n\x00"):
        _fail(f"header {key!r} carries CR, LF or NUL", policy, resp)


# ------------------------------------------------------------------------------------------------
# The target
# ------------------------------------------------------------------------------------------------


class _Errors(logging.Handler):
    """Collects the sidecar's ERROR log records (type and place only: that is all it logs)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        extra = {k: getattr(record, k) for k in ("error", "where") if hasattr(record, k)}
        self.records.append(f"{record.getMessage()} {extra}")


@dataclass
class _Seat:
    name: str
    doc: dict[str, Any]
    servicer: AuthorizationServicer
    metrics: Metrics
    reference: Any


class Target:
    """The servicer under each policy, one event loop, and the reference when it imports."""

    def __init__(
        self,
        policies: tuple[str, ...] = ("example", "variant"),
        triage_log: Path | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors = _Errors()
        logger = logging.getLogger("stepup")
        logger.addHandler(self.errors)
        self._restore: list[tuple[logging.Logger, bool, int]] = []
        if quiet:  # the fuzzer: an error log is a Violation anyway; OTel warns about odd trace headers
            for lg in (logger, logging.getLogger("opentelemetry")):
                self._restore.append((lg, lg.propagate, lg.level))
            logger.propagate = False
            logging.getLogger("opentelemetry").setLevel(logging.ERROR)
        self.seats: list[_Seat] = []
        self.reference_problem = REFERENCE_PROBLEM
        for name in policies:
            doc = POLICY_DOCS[name]()
            policy = load_policy_text(yaml.safe_dump(doc), file=f"<fuzz:{name}>", base_dir=EXAMPLE_POLICY.parent)
            metrics = Metrics()
            runtime = Runtime(policy, Telemetry(None, decision_log=None, metrics=metrics), FixedClock(NOW))
            reference = None
            if Reference is not None:
                try:
                    reference = Reference(copy.deepcopy(doc), JWKS, NOW)
                except Exception as e:  # an interface that changed under us: no reference check
                    self.reference_problem = f"Reference(doc, jwks, now) failed: {type(e).__name__}: {e}"
            self.seats.append(_Seat(name, doc, AuthorizationServicer(runtime), metrics, reference))
        self.triage = Triage(triage_log)

    @property
    def reference_enabled(self) -> bool:
        return all(s.reference is not None for s in self.seats)

    def close(self) -> None:
        logging.getLogger("stepup").removeHandler(self.errors)
        for lg, propagate, level in self._restore:
            lg.propagate, lg.level = propagate, level
        self.loop.close()

    def check(self, data: bytes) -> list[Observed]:
        """Run one input under every policy; raise Violation on a broken invariant."""
        req = parse_request(data)
        seen = []
        for seat in self.seats:
            before = _internal_errors(seat.metrics)
            self.errors.records.clear()
            try:
                out = self.loop.run_until_complete(seat.servicer.check_bytes(data, None))
            except Exception as e:
                raise Violation(
                    f"[{seat.name}] check_bytes raised {type(e).__name__}: {e}",
                    f"[{seat.name}] check_bytes raised {type(e).__name__}",
                ) from e
            if _internal_errors(seat.metrics) != before or self.errors.records:
                what = "internal error" if _internal_errors(seat.metrics) != before else "logged an error"
                raise Violation(
                    f"[{seat.name}] {what}: {self.errors.records}", f"[{seat.name}] {what}: {self.errors.records[:1]}"
                )
            got = check_response(seat.name, req, out)
            if req is not None and seat.reference is not None:
                self._against_reference(seat, req, data, got)
            if got.reason not in KNOWN_REASONS:
                self.triage.record("unknown_reason", seat.name, got.reason, data, got.summary(), None)
            seen.append(got)
        return seen

    def _against_reference(self, seat: _Seat, req: Any, data: bytes, got: Observed) -> None:
        try:
            ref = seat.reference.decide(req)
        except Exception as e:
            self.triage.record("reference_error", seat.name, type(e).__name__, data, got.summary(), repr(e)[:300])
            return
        ref_summary = {"outcome": ref.outcome, "http_status": ref.http_status, "reason": ref.reason, "also": list(ref.also)}
        http = req.attributes.request.http
        if len(http.headers) and len(http.header_map.headers):
            # Envoy sends `header_map` *instead of* `headers` (encode_raw_headers): a request with
            # both is no Envoy request, and the reference reads both by its own CHOICE while the
            # sidecar reads `header_map`. Logged, not failed.
            if (got.outcome, got.reason) != (ref.outcome, ref.reason):
                key = f"both header forms: {ref.outcome}:{ref.reason} -> {got.outcome}:{got.reason}"
                self.triage.record("disagreement", seat.name, key, data, got.summary(), ref_summary)
            return
        if got.outcome == "allow" and ref.outcome != "allow":
            raise Violation(
                f"[{seat.name}] allowed ({got.reason}) where the reference denies: {ref_summary}"
                f"\n  request: {request_json(req)[:3000]}",
                f"[{seat.name}] allowed {got.reason}, reference {ref.outcome} {ref.reason}",
            )
        reason_ok = "*" in ref.also or got.reason in ref.reasons()
        if (got.outcome, got.http_status) != (ref.outcome, ref.http_status) or not reason_ok:
            key = f"{ref.outcome}:{ref.reason} -> {got.outcome}:{got.reason}"
            self.triage.record("disagreement", seat.name, key, data, got.summary(), ref_summary)
        elif got.outcome == "allow":
            subject, assurance = got.upstream.get("x-auth-subject", ""), got.upstream.get("x-auth-assurance", "")
            if (ref.subject and subject != ref.subject) or (ref.assurance and assurance != ref.assurance):
                key = f"identity {ref.subject}/{ref.assurance} -> {subject}/{assurance}"
                self.triage.record("disagreement", seat.name, key, data, got.summary(), ref_summary)


def _internal_errors(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("stepup_internal_errors_total") or 0.0


class Triage:
    """Disagreements with the reference (and other oddities that are not failures), as JSON lines:
    the first few of each kind, with the input in base64 and the request as JSON."""

    PER_KEY = 3

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.counts: dict[tuple[str, str, str], int] = {}

    def record(self, kind: str, policy: str, key: str, data: bytes, got: Any, ref: Any) -> None:
        k = (kind, policy, key)
        n = self.counts[k] = self.counts.get(k, 0) + 1
        if self.path is None or n > self.PER_KEY:
            return
        req = parse_request(data)
        line = {
            "kind": kind,
            "policy": policy,
            "key": key,
            "sidecar": got,
            "reference": ref,
            "pid": os.getpid(),
            "input_b64": base64.b64encode(data).decode(),
            "request": json.loads(request_json(req)) if req is not None else None,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


# ------------------------------------------------------------------------------------------------
# Regression files (tests/data/fuzz_regressions/*.json)
# ------------------------------------------------------------------------------------------------


def load_regression(path: Path) -> bytes:
    """A regression case: {"why": ..., "request": <CheckRequest as JSON>} or {"why": ..., "base64": ...}
    (the exact input bytes, for inputs that do not survive a JSON round trip)."""
    doc = json.loads(path.read_text())
    if "base64" in doc:
        return base64.b64decode(doc["base64"])
    msg = json_format.ParseDict(doc["request"], external_auth_pb2.CheckRequest())
    data: bytes = msg.SerializeToString()
    return data
