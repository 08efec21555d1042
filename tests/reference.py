"""An independent reference evaluator for the Check decision, written from the specification only.

Sources, and nothing else (no file of the `sidecar` package was read to write this, and nothing
from it is imported):

- /work/notes/spec-issue8.md: methods, paths, claims, workloads (where it and the README disagree,
  it wins: e.g. dot segments and `//` are refused, never resolved);
- README.md "What the sidecar answers" (the decision table, the challenge) and "Policy format"
  (the reference table, patterns, risk rules);
- DESIGN.md §2 (the order of the decision), §3 (assurance), §4 (tables);
- examples/policy.yaml (the shape of a policy document).

`Reference(doc, jwks, now).decide(check_request)` reads the protobuf CheckRequest itself, verifies
RS256 bearer tokens itself (its own base64url decoder and JSON parser, RSA PKCS#1 v1.5 + SHA-256
with the `cryptography` package) and walks the policy document with plain loops on every call:
no compiled tables, no tries, no caches. Slow and obvious on purpose.

Where the specification is silent or ambiguous, the choice taken is written down in a comment
starting with "CHOICE:". Where the specification leaves the order of two checks of the same step
open, the answer names one reason and lists the others in `RefAnswer.also` (any of them is right).
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# ------------------------------------------------------------------------------------------------
# The answer
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefAnswer:
    outcome: str  # "allow" | "deny" | "unauthenticated" | "step_up"
    http_status: int  # 200 | 400 | 401 | 403
    reason: str  # the reason code (README decision table)
    error: str = ""  # RFC 6750 / RFC 9470 error code of the challenge, "" when there is none
    # acr_values of a step-up challenge, () when absent; for a required method, only the values
    # the issuer's implies_amr says guarantee it.
    acr_values: tuple[str, ...] | None = ()
    max_age: int | None = None  # max_age of a step-up challenge, None when absent
    # Other reason codes that are equally right: the spec does not order some checks of one step
    # (e.g. a token that is both expired and for the wrong audience). "*" = the spec names no
    # reason code for this case at all (only the outcome and status are specified).
    also: tuple[str, ...] = ()
    scope: tuple[str, ...] = ()  # the `scope` of an insufficient_scope challenge
    subject: str = ""  # on allow for a user: the subject (x-auth-subject)
    assurance: str = ""  # on allow for a user: the assurance level reached (x-auth-assurance)

    def reasons(self) -> tuple[str, ...]:
        return (self.reason, *self.also)


# ------------------------------------------------------------------------------------------------
# Constants from the specs
# ------------------------------------------------------------------------------------------------

ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DIGIT = "0123456789"
HEXDIG = "0123456789abcdefABCDEF"
# RFC 9110 tchar (spec-issue8 "Method").
TCHAR = ALPHA + DIGIT + "!#$%&'*+-.^_`|~"
UNRESERVED = ALPHA + DIGIT + "-._~"
# spec-issue8 "Path" 3: the raw characters a path part may hold.
PATH_RAW_ALLOWED = ALPHA + DIGIT + "-._~!$&'()*+,=:@/%"
# spec-issue8 "Path" 4: escapes decoded for matching: unreserved, sub-delims except ';', ':' '@'.
PATH_DECODED = UNRESERVED + "!$&'()*+,=:@"
# spec-issue8 "Path" 4: escapes refused.
PATH_REFUSED_BYTES = [0x2F, 0x5C, 0x25, 0x3B, 0x7F, *range(0x00, 0x20)]
MAX_PATH = 8192
# RFC 6750 §2.1 b64token.
B64TOKEN = ALPHA + DIGIT + "-._~+/"
B64URL = ALPHA + DIGIT + "-_"
# CHOICE: the reference's JSON parser refuses nesting deeper than this. The spec says "nested
# deeper than the JSON parser allows -> malformed_token" without a number; the property test only
# generates depths far below (20) or far above (5000) any usual parser limit.
MAX_JSON_DEPTH = 64  # README: a token's JSON nests at most 64 levels
TWO_53 = 2**53

# RFC 8176 authentication method reference values, by factor class (DESIGN §3, README
# `amr_derivation`). Values outside the three classes (mfa, geo, rba, mca, user, wia, ...) are
# not a factor class.
KNOWLEDGE = ["pwd", "pin", "kba"]
POSSESSION = ["hwk", "swk", "otp", "sms", "tel", "sc", "pop"]
INHERENCE = ["fpt", "face", "iris", "retina", "vbm"]

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

JWT_AUTHN = "envoy.filters.http.jwt_authn"


class _BadJson(Exception):
    pass


class Reference:
    """A slow, obvious reading of one policy document."""

    def __init__(self, doc: dict[str, Any], jwks: dict[str, Any], now: float) -> None:
        # `jwks`: one JWKS ({"keys": [...]}) used for every issuer, or {issuer id: JWKS}.
        self.doc = doc
        self.jwks = jwks
        self.now = now

    # ============================================================================================
    # The decision (README "What the sidecar answers", DESIGN §2): the first failing step decides.
    # ============================================================================================

    def decide(self, req: Any) -> RefAnswer:
        attrs = req.attributes
        http = attrs.request.http
        method = http.method
        raw_path = http.path
        headers = self.read_headers(http)

        # Step 0: requests that cannot be judged safely -> 400 invalid_request.
        # CHOICE: the spec does not order the step-0 checks against each other; the reference
        # takes the order of an HTTP request (method, target, header fields, then the credential)
        # and lists every other step-0 problem of the request in `also`.
        bad = self.bad_request_reasons(method, raw_path, headers)
        if bad:
            return RefAnswer("deny", 400, bad[0], "invalid_request", also=tuple(bad[1:]))
        path = self.canonical_path(raw_path)
        assert path is not None
        # README: a trailing slash is decided under both readings (`/x/` and `/x`, since
        # frameworks disagree); allowed only if both allow, else the first that does not.
        first = self.operation(req, method, path, headers)
        if path != "/" and path.endswith("/") and first.outcome == "allow":
            second = self.operation(req, method, path[:-1], headers)
            if second.outcome != "allow":
                return second
        return first

    def operation(self, req: Any, method: str, path: str, headers: list[tuple[str, bytes]]) -> RefAnswer:
        """Steps 1 to 6 for one reading of the operation."""
        attrs = req.attributes
        # Step 1: the sensitivity table.
        table_level = self.sensitivity_level(method, path)
        if table_level is None:
            return RefAnswer("deny", 403, "no_matching_rule")
        requirement = self.level_requirement(table_level)
        ext_key = self.doc["sensitivity"].get("context_extension")
        if ext_key and ext_key in attrs.context_extensions:
            ext_level = attrs.context_extensions[ext_key]
            if ext_level not in self.doc["sensitivity"]["levels"]:
                # CHOICE: a context extension naming a level the policy does not define is a
                # mismatch between Envoy's config and the policy: fail closed with 403. The spec
                # names no reason code for it ("*": any reason but internal_error).
                return RefAnswer("deny", 403, "no_matching_rule", also=("*",))
            # README: "it can only make the requirement stricter". CHOICE: component by component
            # (the stronger minimum, the shorter max_age, the union of required amr), so that it
            # can never weaken any part of the table's requirement.
            requirement = self.stricter(requirement, self.level_requirement(ext_level))

        # Step 2: public operations.
        if requirement["public"]:
            return RefAnswer("allow", 200, "public")

        # Step 3: the credential.
        principal = attrs.source.principal
        cred = self.credential(req, headers)
        if cred["kind"] == "bad":
            reasons = cred["reasons"]
            return RefAnswer("unauthenticated", 401, reasons[0], error_for(reasons[0]), also=tuple(reasons[1:]))
        if cred["kind"] == "none":
            # No end-user token: only a rule naming nothing but principals can grant (README
            # `permissions[]`); anything else is "a user token is what is missing"
            # (spec-issue8 "Workloads").
            if principal:
                for rule in self.doc.get("permissions", []):
                    if not self.rule_matches(rule, method, path):
                        continue
                    if self.principal_only(rule["allow"]) and self.principal_ok(rule["allow"], principal):
                        return RefAnswer("allow", 200, "workload_granted")
            return RefAnswer("unauthenticated", 401, "missing_credential")

        user = cred["user"]

        # Step 4: the permission table. Any matching rule may grant.
        granted = False
        missing_scopes: list[str] = []
        for rule in self.doc.get("permissions", []):
            if not self.rule_matches(rule, method, path):
                continue
            allow = rule["allow"]
            if self.principal_only(allow):
                continue  # with a user token, user rules apply (README `permissions[]`)
            failing = self.failing_kinds(allow, user, principal)
            if not failing:
                granted = True
            elif failing == ["scopes"]:
                # CHOICE: "a scope is what is missing" = a matching rule fails on its scopes and
                # on nothing else; the challenge's scope lists the scopes of all such rules.
                for s in allow["scopes"]:
                    if s not in missing_scopes:
                        missing_scopes.append(s)
        if not granted:
            if missing_scopes:
                return RefAnswer(
                    "deny", 403, "insufficient_scope", "insufficient_scope", scope=tuple(missing_scopes)
                )
            return RefAnswer("deny", 403, "permission_denied")

        # Step 5: the requirement (sensitivity + risk rules) against what the token presents.
        levels = self.doc["assurance"]["levels"]
        minimum = requirement["min"]
        max_age = requirement["max_age"]
        raise_by = 0
        for risk in self.doc.get("risk", []):
            if not self.risk_fires(risk["when"], attrs, headers):
                continue
            amount = risk.get("raise", 1)
            if amount > raise_by:
                raise_by = amount
            if risk.get("max_age") is not None:
                cap = duration(risk["max_age"])
                if max_age is None or cap < max_age:
                    max_age = cap
        if raise_by > 0:
            # CHOICE: an operation without a minimum level counts as "below the first level", so a
            # raise of 1 asks for the first level. Never above the top level.
            base = -1 if minimum is None else minimum
            minimum = base + raise_by
            if minimum > len(levels) - 1:
                minimum = len(levels) - 1

        presented = self.presented_level(user)
        skew = self.skew()
        strength_short = minimum is not None and (presented is None or presented < minimum)
        # Issue 12: a required method is met by the token's amr, or by one of its acr values
        # whose login the issuer's mapping says always includes it (implies_amr).
        methods = list(user["amr"])
        for level_entry in (user["issuer"].get("acr") or {}).values():
            for value, implied in ((level_entry or {}).get("implies_amr") or {}).items():
                if value in user["acr"] and value in (level_entry.get("accept") or []):
                    methods.extend(implied)
        amr_short = False
        for needed in requirement["amr"]:
            if needed not in methods:
                amr_short = True
        fresh_short = False
        if max_age is not None:
            if user["auth_time"] is None:
                fresh_short = True  # DESIGN §3: a required max_age with no auth_time fails
            elif self.now - user["auth_time"] > max_age + skew:
                fresh_short = True
        short: list[str] = []
        if strength_short:
            short.append("acr_too_low")
        if amr_short:
            short.append("amr_missing")
        if fresh_short:
            short.append("auth_too_old")
        if short:
            # CHOICE: one challenge asks for everything that is short (DESIGN §3); its reason is
            # the strength reason first (acr, then amr), freshness last; the others are in `also`.
            # Issue 12: the acr values asked for are those whose login meets the level AND
            # includes every required method, so that one re-login satisfies the challenge.
            acr_values: tuple[str, ...] = ()
            if strength_short or amr_short:
                wanted = self.challenge_acr_values(user["issuer"], minimum if minimum is not None else 0)
                acr_values = tuple(
                    v for v in wanted
                    if all(m in self.implied_methods(user["issuer"], v) for m in requirement["amr"])
                )
            return RefAnswer(
                "step_up",
                401,
                short[0],
                "insufficient_user_authentication",
                acr_values=acr_values,
                max_age=max_age if fresh_short else None,
                also=tuple(short[1:]),
            )

        # Step 6.
        return RefAnswer(
            "allow",
            200,
            "allowed",
            subject=user["subject"],
            assurance=levels[presented] if presented is not None else "",
        )

    # ============================================================================================
    # Reading the CheckRequest
    # ============================================================================================

    def read_headers(self, http: Any) -> list[tuple[str, bytes]]:
        """All request headers as (lower-case name, raw value bytes), from both forms.

        DESIGN §1: `headers` (repeats comma-joined by Envoy) or `header_map` (repeats kept apart,
        values in `raw_value`). CHOICE: when a request carries both forms, both are read (a
        duplicate then counts as a repeat, which can only make the answer stricter). Names are
        case-insensitive (RFC 9110 §5.1), so `Authorization` and `authorization` are one name."""
        out: list[tuple[str, bytes]] = []
        for name in http.headers:
            out.append((name.lower(), http.headers[name].encode("utf-8")))
        for hv in http.header_map.headers:
            raw = hv.raw_value if len(hv.raw_value) > 0 else hv.value.encode("utf-8")
            out.append((hv.key.lower(), raw))
        return out

    def header_values(self, headers: list[tuple[str, bytes]], name: str) -> list[str]:
        values = []
        for key, raw in headers:
            if key == name:
                values.append(raw.decode("utf-8"))  # step 0 made sure they all decode
        return values

    # ============================================================================================
    # Step 0
    # ============================================================================================

    def bad_request_reasons(self, method: str, raw_path: str, headers: list[tuple[str, bytes]]) -> list[str]:
        reasons = []
        if not self.method_ok(method):
            reasons.append("invalid_method")
        elif method != method.upper() and method not in self.named_methods():
            # README: a case variant of a method is refused unless the policy names it exactly.
            reasons.append("invalid_method")
        if self.method_override(raw_path, headers):
            reasons.append("invalid_method")
        if self.canonical_path(raw_path) is None:
            reasons.append("invalid_path")
        if not self.headers_ok(headers):
            reasons.append("invalid_header")
        if self.headers_ok(headers) and self.authorization_ambiguous(headers):
            reasons.append("ambiguous_credentials")
        return reasons

    def named_methods(self) -> set[str]:
        out = set()
        for rule in [*self.doc["sensitivity"]["rules"], *self.doc["permissions"]]:
            for pattern in rule["match"]:
                if " " in pattern:
                    m = pattern.split(" ", 1)[0]
                    if m != "*":
                        out.add(m)
        return out

    def method_override(self, raw_path: str, headers: list[tuple[str, bytes]]) -> bool:
        """README: X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override, or `_method=` in the
        query, are refused (frameworks would run the named method instead)."""
        for name, _ in headers:
            if name in ("x-http-method-override", "x-http-method", "x-method-override"):
                return True
        if "?" in raw_path and "_method=" in raw_path.split("?", 1)[1]:
            return True
        return False

    def method_ok(self, method: str) -> bool:
        # spec-issue8 "Method": 1 to 32 tchar, exactly as sent; `*` alone is the policy's wildcard.
        if len(method) < 1 or len(method) > 32 or method == "*":
            return False
        for ch in method:
            if ch not in TCHAR:
                return False
        return True

    def headers_ok(self, headers: list[tuple[str, bytes]]) -> bool:
        """README step 0 "control characters", DESIGN §5 "NUL bytes in headers", "invalid UTF-8".

        A field value may hold VCHAR, SP, HTAB and obs-text (RFC 9110 §5.5); CHOICE: any other
        control byte (NUL, CR, LF, ...), DEL, or a value that is not valid UTF-8, in any header,
        refuses the request with `invalid_header`. README: a header over 16 KiB is refused too
        (for a repeated header, its comma-joined value)."""
        sizes: dict[str, int] = {}
        for name, raw in headers:
            sizes[name] = sizes.get(name, -1) + 1 + len(raw)
        for size in sizes.values():
            if size > 16 * 1024:
                return False
        for name, raw in headers:
            for ch in name:
                if ord(ch) < 0x21 or ord(ch) == 0x7F:
                    return False
            for byte in raw:
                if (byte < 0x20 and byte != 0x09) or byte == 0x7F:
                    return False
            if not utf8_ok(raw):
                return False
        return True

    def authorization_ambiguous(self, headers: list[tuple[str, bytes]]) -> bool:
        """README step 0 "repeated Authorization", DESIGN §5 "repeated authorization headers (deny
        when ambiguous)", "comma-joined multi-value headers". A bearer credential never holds a
        comma (RFC 6750 b64token), so a comma means Envoy joined two values."""
        values = self.header_values(headers, "authorization")
        if len(values) > 1:
            return True
        for v in values:
            if "," in v:
                return True
        return False

    def canonical_path(self, raw: str) -> str | None:
        """spec-issue8 "Path", steps 1-6: the operation path used for matching, or None (400)."""
        # 1.
        if len(raw) > MAX_PATH:
            return None
        # 2. Cut at the first '?' or '#'; in the rest only controls are refused.
        cut = len(raw)
        for i in range(len(raw)):
            if raw[i] == "?" or raw[i] == "#":
                cut = i
                break
        for ch in raw[cut:]:
            if ord(ch) < 0x21 or ord(ch) == 0x7F:
                return None
        part = raw[:cut]
        # 3.
        if not part.startswith("/"):
            return None
        for ch in part:
            if ch not in PATH_RAW_ALLOWED:
                return None
        # 4. Percent-escapes.
        text = ""
        octets = bytearray()
        i = 0
        while i < len(part):
            ch = part[i]
            if ch != "%":
                text += ch
                octets += ch.encode("ascii")
                i += 1
                continue
            hex2 = part[i + 1 : i + 3]
            if len(hex2) != 2 or hex2[0] not in HEXDIG or hex2[1] not in HEXDIG:
                return None
            value = int(hex2, 16)
            if value in PATH_REFUSED_BYTES:
                return None
            if value < 0x80 and chr(value) in PATH_DECODED:
                text += chr(value)
            else:
                text += "%" + hex2.upper()
            octets.append(value)
            i += 3
        if not utf8_ok(bytes(octets)):
            return None
        # 5. Already canonical: no dot segment, no empty segment but the last.
        segments = text[1:].split("/")
        for n, seg in enumerate(segments):
            if seg == "." or seg == "..":
                return None
            if seg == "" and n != len(segments) - 1:
                return None
        return text

    # ============================================================================================
    # Patterns and the sensitivity table
    # ============================================================================================

    def pattern_rank(self, pattern: str, method: str, path: str) -> tuple[int, ...] | None:
        """None when `pattern` does not match; else a sort key, smaller = more specific.

        README "Patterns": `/pkg.Service/Method`, `/pkg.Service/*`, `METHOD /path/*/more/**`;
        `*` = one non-empty segment, `**` = the rest (zero or more segments, last only); no method
        or `*` = any (valid) method; spec-issue8: methods are compared exactly (case-sensitive).
        CHOICE for "most specific": segment by segment from the left (as a walk down a segment
        trie would try them): the path ending here < a literal segment < `*` < `**`; an exact
        method beats "any method" only between patterns whose paths rank the same."""
        if " " in pattern:
            pmethod, ppath = pattern.split(" ", 1)
        else:
            pmethod, ppath = "*", pattern
        if pmethod == "*":
            method_rank = 2
        elif pmethod == method:
            method_rank = 0
        elif method == "HEAD" and pmethod == "GET" and not self.has_head_rule(ppath):
            # spec-issue8: HEAD without a HEAD rule of its own runs the GET handler.
            method_rank = 1
        else:
            return None
        if self.doc.get("paths", {}).get("case_sensitive", True) is False:
            # README "Policy format" `paths.case_sensitive: false`: compared in lower case.
            ppath, path = ppath.lower(), path.lower()
        want = ppath[1:].split("/")
        have = path[1:].split("/")
        rank: list[int] = []
        i = 0
        for w in want:
            if w == "**":
                rank.append(3)
                rank.append(method_rank)
                return tuple(rank)
            if i >= len(have):
                return None
            if w == "*":
                if have[i] == "":
                    return None
                rank.append(2)
            elif w == have[i]:
                rank.append(1)
            else:
                return None
            i += 1
        if i != len(have):
            return None
        rank.append(0)
        rank.append(method_rank)
        return tuple(rank)

    def has_head_rule(self, ppath: str) -> bool:
        """Whether some rule names `HEAD` for exactly this pattern path."""
        for rule in [*self.doc["sensitivity"]["rules"], *self.doc["permissions"]]:
            for pattern in rule["match"]:
                if pattern == f"HEAD {ppath}":
                    return True
        return False

    def rule_matches(self, rule: dict[str, Any], method: str, path: str) -> bool:
        for pattern in rule["match"]:
            if self.pattern_rank(pattern, method, path) is not None:
                return True
        return False

    def sensitivity_level(self, method: str, path: str) -> str | None:
        """The level of the most specific matching sensitivity rule (ties cannot load; the first
        one would win here)."""
        best_rank: tuple[int, ...] | None = None
        best_level = None
        for rule in self.doc["sensitivity"]["rules"]:
            for pattern in rule["match"]:
                rank = self.pattern_rank(pattern, method, path)
                if rank is None:
                    continue
                if best_rank is None or rank < best_rank:
                    best_rank = rank
                    best_level = rule["level"]
        return best_level

    def level_requirement(self, name: str) -> dict[str, Any]:
        spec = self.doc["sensitivity"]["levels"][name] or {}
        levels = self.doc["assurance"]["levels"]
        minimum = None
        if spec.get("min_assurance") is not None:
            minimum = levels.index(spec["min_assurance"])
        return {
            "public": spec.get("authentication") == "none",
            "min": minimum,
            "max_age": duration(spec["max_age"]) if spec.get("max_age") is not None else None,
            "amr": list(spec.get("required_amr") or []),
        }

    def stricter(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        minimum = a["min"]
        if b["min"] is not None and (minimum is None or b["min"] > minimum):
            minimum = b["min"]
        max_age = a["max_age"]
        if b["max_age"] is not None and (max_age is None or b["max_age"] < max_age):
            max_age = b["max_age"]
        amr = list(a["amr"])
        for m in b["amr"]:
            if m not in amr:
                amr.append(m)
        return {"public": a["public"] and b["public"], "min": minimum, "max_age": max_age, "amr": amr}

    def skew(self) -> int:
        value = self.doc.get("assurance", {}).get("clock_skew")
        return 60 if value is None else duration(value)

    # ============================================================================================
    # Step 3: the credential
    # ============================================================================================

    def credential(self, req: Any, headers: list[tuple[str, bytes]]) -> dict[str, Any]:
        """{"kind": "user", "user": {...}} | {"kind": "none"} | {"kind": "bad", "reasons": [...]}.

        Claims that Envoy's jwt_authn verified (issuers with `jwt_authn_payload`) come first: the
        bearer header is then not verified a second time (policy.yaml comment)."""
        fm = req.attributes.metadata_context.filter_metadata
        if JWT_AUTHN in fm:
            fields = fm[JWT_AUTHN].fields
            for issuer in self.doc["issuers"]:
                key = issuer.get("jwt_authn_payload")
                if key and key in fields:
                    return self.metadata_credential(key, fields[key])

        values = self.header_values(headers, "authorization")
        if not values:
            return {"kind": "none"}
        value = values[0].strip(" \t")  # step 0: at most one; RFC 9110 §5.5: OWS is no part of it
        if " " in value:
            scheme, rest = value.split(" ", 1)
        else:
            scheme, rest = value, ""
        if scheme.lower() != "bearer":
            # RFC 6750 §3.1: a request with an unsupported authentication method is like one with
            # no authentication information: a challenge without an error code.
            return {"kind": "none"}
        token = rest.lstrip(" ")  # RFC 6750 §2.1: "Bearer" 1*SP b64token
        if token == "":
            # CHOICE: the Bearer scheme with no token at all (Envoy trims the trailing space of
            # "Bearer "): a credential was attempted but none is there. missing_credential, or
            # malformed_token: both are right; either way it is not "no user token", so it never
            # lets a workload's principal-only grant through.
            return {"kind": "bad", "reasons": ["missing_credential", "malformed_token"]}
        return self.bearer_credential(token)

    def metadata_credential(self, key: str, value: Any) -> dict[str, Any]:
        """spec-issue8 "Claims": jwt_authn claims get the same checks as a bearer token: `iss` must
        be the issuer's (a string), `aud` must contain one of the issuer's audiences, time and
        type checks. No signature (Envoy verified it)."""
        if value.WhichOneof("kind") != "struct_value":
            # CHOICE: a payload that is not an object cannot be claims: malformed_token.
            return {"kind": "bad", "reasons": ["malformed_token", "invalid_claim"]}
        claims = struct_to_python(value.struct_value)
        candidates = []
        for issuer in self.doc["issuers"]:
            if issuer.get("jwt_authn_payload") == key:
                candidates.append(issuer)
        iss = claims.get("iss")
        if iss is None:
            return {"kind": "bad", "reasons": ["unknown_issuer", "invalid_claim", "malformed_token"]}
        if not isinstance(iss, str):
            return {"kind": "bad", "reasons": ["invalid_claim", "malformed_token", "unknown_issuer"]}
        chosen = None
        for issuer in candidates:
            if issuer["issuer"] == iss:
                chosen = issuer
                break
        reasons = []
        if chosen is None:
            reasons.append("unknown_issuer")
            chosen = candidates[0]
        reasons = reasons + self.claim_problems(claims, chosen)
        if reasons:
            return {"kind": "bad", "reasons": dedupe(reasons)}
        return {"kind": "user", "user": self.user_of(claims, chosen)}

    def bearer_credential(self, token: str) -> dict[str, Any]:
        """A compact JWS: decode, pick the issuer by the (unverified) `iss`, the key by `kid`,
        verify, then check the claims. Reasons in the order an expert checks them; every problem
        found is listed (the first one is the reference's answer, the rest are `also`)."""
        bad = {"kind": "bad", "reasons": ["malformed_token"]}
        if len(token) > 8 * 1024:
            return bad  # README: tokens are at most 8 KiB
        for ch in token:
            if ch not in B64TOKEN + ".=":
                return bad
        if "=" in token:
            # RFC 7515 §2: base64url *without* padding, so a padded part is malformed. An
            # implementation that decodes the padding and then fails the signature, or finds
            # whatever else is wrong with the unpadded token, is also right.
            unpadded = ".".join(part.rstrip("=") for part in token.split("."))
            inner = self.bearer_credential(unpadded) if "=" not in unpadded else bad
            more = inner["reasons"] if inner["kind"] == "bad" else []
            return {"kind": "bad", "reasons": dedupe(["malformed_token", "bad_signature", *more])}
        parts = token.split(".")
        if len(parts) != 3:
            return bad  # CHOICE: a JWE (5 parts) or anything else is malformed_token
        header_bytes = b64url_decode(parts[0])
        payload_bytes = b64url_decode(parts[1])
        signature = b64url_decode(parts[2])
        if header_bytes is None or payload_bytes is None or signature is None:
            return bad
        ok_h, header = parse_json(header_bytes)
        ok_p, payload = parse_json(payload_bytes)
        reasons: list[str] = []
        if not ok_h or not ok_p:
            # `NaN`, `Infinity` are not JSON and a lone surrogate escape is not a character
            # (RFC 8259 §6, §8.2), so such a token is malformed_token. But the spec's "exp must
            # be finite" shows it expects parsers that read such text (Python's json does); an
            # implementation using one judges what it read (e.g. a non-finite exp is an
            # invalid_claim, a signature that does not verify is bad_signature). Any of those is
            # right, as long as the token is refused: the rest of the checks run on the lenient
            # reading, and malformed_token comes first.
            ok_h, header = parse_json(header_bytes, lenient=True)
            ok_p, payload = parse_json(payload_bytes, lenient=True)
            if not ok_h or not ok_p:
                return bad
            reasons.append("malformed_token")
        if not isinstance(header, dict) or not isinstance(payload, dict):
            return bad
        if len(parts[0]) > 512:
            # README "Security notes": a JWS header over 512 bytes (base64url) is refused as
            # malformed (the JOSE library's limit; real headers carry alg, kid, typ).
            reasons.append("malformed_token")
        alg = header.get("alg")
        kid = header.get("kid")
        if alg is None:
            # CHOICE: a header without `alg` is malformed (RFC 7515 §4.1.1: it MUST be present);
            # calling it a disallowed algorithm is also right.
            return {"kind": "bad", "reasons": dedupe([*reasons, "malformed_token", "disallowed_algorithm"])}
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            return bad

        if alg == "none" or alg.startswith("HS"):
            reasons.append("disallowed_algorithm")  # README: never accepted, for any issuer
        iss = payload.get("iss")
        issuer = None
        if iss is None:
            # CHOICE: no `iss`: no trusted issuer is named (unknown_issuer).
            reasons += ["unknown_issuer", "malformed_token", "invalid_claim"]
        elif not isinstance(iss, str):
            # spec-issue8: an `iss` that is a list or object -> malformed_token (or invalid_claim).
            reasons += ["malformed_token", "invalid_claim", "unknown_issuer"]
        else:
            for candidate in self.doc["issuers"]:
                if candidate["issuer"] == iss:
                    issuer = candidate
                    break
            if issuer is None:
                reasons.append("unknown_issuer")

        if issuer is not None:
            allowed_algs = issuer.get("algorithms") or ["RS256", "ES256"]
            if alg == "none" or alg.startswith("HS") or alg not in allowed_algs:
                reasons.append("disallowed_algorithm")
            else:
                keys = self.keys_for(issuer, alg, kid)
                if not keys:
                    reasons.append("unknown_key")
                else:
                    signing_input = (parts[0] + "." + parts[1]).encode("ascii")
                    verified = False
                    for jwk in keys:
                        if verify_rs256(jwk, signing_input, signature):
                            verified = True
                    if not verified:
                        reasons.append("bad_signature")
            reasons += self.claim_problems(payload, issuer)
        elif self.doc["issuers"]:
            # The claims can still be judged against the first issuer's claim names, so that an
            # implementation checking them before the issuer is not called wrong.
            reasons += self.claim_problems(payload, self.doc["issuers"][0])

        if reasons:
            return {"kind": "bad", "reasons": dedupe(reasons)}
        assert issuer is not None
        return {"kind": "user", "user": self.user_of(payload, issuer)}

    def keys_for(self, issuer: dict[str, Any], alg: str, kid: str | None) -> list[dict[str, Any]]:
        """The issuer's JWKS keys that can verify this token. README: keys come only from the
        configured JWKS (`jku`, `x5u`, `jwk` headers ignored).
        CHOICE: a token without `kid` may be verified by any suitable key (Envoy's jwt_authn
        does this); the property test does not generate kid-less tokens."""
        jwks = self.jwks
        if "keys" not in jwks:
            jwks = jwks[issuer["id"]]
        if alg != "RS256":
            raise NotImplementedError(f"the reference verifies RS256 only, not {alg}")
        out = []
        for jwk in jwks["keys"]:
            if kid is not None and jwk.get("kid") != kid:
                continue
            if jwk.get("kty") != "RSA":
                continue
            if jwk.get("alg") is not None and jwk.get("alg") != alg:
                continue
            if jwk.get("use") is not None and jwk.get("use") != "sig":
                continue
            out.append(jwk)
        return out

    def claim_problems(self, claims: dict[str, Any], issuer: dict[str, Any]) -> list[str]:
        """spec-issue8 "Claims", in this order: types (invalid_claim), exp, nbf, iat, aud,
        auth_time in the future (invalid_claim)."""
        names = self.claim_names(issuer)
        now = self.now
        skew = self.skew()
        out = []

        types_bad = False
        sub = claim_at(claims, names["subject"])
        if not isinstance(sub, str) or sub == "" or not unicode_ok(sub):
            types_bad = True  # (a lone surrogate, read by a lenient parser, is no text either)
        elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in sub):
            types_bad = True  # README: the subject goes to a header: no control characters
        for kind in ("roles", "groups", "amr"):
            value = claim_at(claims, names[kind])
            if value is not None and not string_or_strings(value):
                types_bad = True
        scope = claim_at(claims, names["scopes"])
        if scope is not None and not string_or_strings(scope):
            types_bad = True  # CHOICE: a scope that is neither a string nor strings
        acr = claim_at(claims, names["acr"])
        if acr is not None and not string_or_strings(acr):
            types_bad = True  # CHOICE: README: acr is "a string, or a list"
        aud = claims.get("aud")
        if aud is not None and not string_or_strings(aud):
            types_bad = True  # RFC 7519 §4.1.3: a string or an array of strings
        exp = claims.get("exp")
        if exp is None or not good_number(exp):
            types_bad = True
        times: dict[str, Any] = {"nbf": claims.get("nbf"), "iat": claims.get("iat")}
        times["auth_time"] = claim_at(claims, names["auth_time"])
        for value in times.values():
            if value is not None and not good_number(value):
                types_bad = True
        if types_bad:
            out.append("invalid_claim")

        if exp is not None and good_number(exp) and now > exp + skew:
            out.append("token_expired")
        nbf = times["nbf"]
        if nbf is not None and good_number(nbf) and nbf > now + skew:
            out.append("token_not_yet_valid")
        iat = times["iat"]
        if iat is not None and good_number(iat) and iat > now + skew:
            out.append("token_issued_in_future")
        audiences = issuer.get("audiences") or []
        if audiences:
            have = []
            if isinstance(aud, str):
                have = [aud]
            elif isinstance(aud, list):
                have = aud
            hit = False
            for a in audiences:
                if a in have:
                    hit = True
            if not hit:
                out.append("wrong_audience")
        auth_time = times["auth_time"]
        if auth_time is not None and good_number(auth_time) and auth_time > now + skew:
            out.append("invalid_claim")
        return dedupe(out)

    def claim_names(self, issuer: dict[str, Any]) -> dict[str, str]:
        names = {
            "subject": "sub",
            "roles": "roles",
            "groups": "groups",
            "scopes": "scope",
            "acr": "acr",
            "amr": "amr",
            "auth_time": "auth_time",
        }
        for k, v in (issuer.get("claims") or {}).items():
            names[k] = v
        return names

    def user_of(self, claims: dict[str, Any], issuer: dict[str, Any]) -> dict[str, Any]:
        names = self.claim_names(issuer)
        scope = claim_at(claims, names["scopes"])
        scopes: list[str] = []
        if isinstance(scope, str):
            for s in scope.split(" "):
                if s != "":
                    scopes.append(s)
        elif isinstance(scope, list):
            scopes = list(scope)
        return {
            "issuer": issuer,
            "subject": claim_at(claims, names["subject"]),
            "roles": values_of(claim_at(claims, names["roles"])),
            "groups": values_of(claim_at(claims, names["groups"])),
            "scopes": scopes,
            "acr": values_of(claim_at(claims, names["acr"])),
            "amr": values_of(claim_at(claims, names["amr"])),
            "auth_time": claim_at(claims, names["auth_time"]),
        }

    # ============================================================================================
    # Step 4: permissions
    # ============================================================================================

    def principal_only(self, allow: dict[str, Any]) -> bool:
        named = []
        for kind, value in allow.items():
            if value is not None and value is not False and value != []:
                named.append(kind)
        return named == ["principals"]

    def principal_ok(self, allow: dict[str, Any], principal: str) -> bool:
        """README: exact, or a prefix ending in `*`, never a regex."""
        if not principal:
            return False
        for pattern in allow.get("principals", []):
            if pattern.endswith("*"):
                if principal.startswith(pattern[:-1]):
                    return True
            elif principal == pattern:
                return True
        return False

    def failing_kinds(self, allow: dict[str, Any], user: dict[str, Any], principal: str) -> list[str]:
        """README `permissions[]`: every listed kind must match, any value within a kind."""
        failing = []
        for kind, wanted in allow.items():
            if kind == "anyone":
                ok = bool(wanted)
            elif kind == "authenticated":
                ok = bool(wanted)
            elif kind == "issuers":
                # CHOICE: an issuer is named by its policy `id` or by its `issuer` URL.
                ok = user["issuer"]["id"] in wanted or user["issuer"]["issuer"] in wanted
            elif kind == "users":
                ok = user["subject"] in wanted
            elif kind in ("roles", "groups", "scopes"):
                ok = False
                for v in user[kind]:
                    if v in wanted:
                        ok = True
            elif kind == "principals":
                ok = self.principal_ok(allow, principal)
            else:
                raise NotImplementedError(kind)
            if not ok:
                failing.append(kind)
        return failing

    # ============================================================================================
    # Step 5: assurance and risk
    # ============================================================================================

    def presented_level(self, user: dict[str, Any]) -> int | None:
        """DESIGN §3: a mapped acr decides the level (of a list, the strongest mapped value);
        without one, amr may derive it: mfa or two factor classes -> second level, one method ->
        first level, never the top level from amr alone."""
        levels = self.doc["assurance"]["levels"]
        acr_map = user["issuer"].get("acr") or {}
        best = None
        for value in user["acr"]:
            for idx, level in enumerate(levels):
                entry = acr_map.get(level) or {}
                if value in (entry.get("accept") or []):
                    if best is None or idx > best:
                        best = idx
        if best is not None:
            return best
        if not self.doc["assurance"].get("amr_derivation", True):
            return None
        if "0" in user["acr"]:
            return None  # OIDC Core §2: acr "0" is explicitly no assurance
        amr = user["amr"]
        if not amr:
            return None
        known = False
        for m in amr:
            if m == "mfa" or m in KNOWLEDGE or m in POSSESSION or m in INHERENCE:
                known = True
        if not known:
            return None  # README: only RFC 8176 factor methods count (not `user`, `rba`, ...)
        classes = 0
        for members in (KNOWLEDGE, POSSESSION, INHERENCE):
            for m in members:
                if m in amr:
                    classes += 1
                    break
        level = 0
        if "mfa" in amr or classes >= 2:
            level = 1
        if level >= len(levels) - 1:
            level = max(0, len(levels) - 2)
        return level

    def implied_methods(self, issuer: dict[str, Any], value: str) -> list[str]:
        """The methods a login at acr `value` always includes (the issuer's implies_amr)."""
        out: list[str] = []
        for entry in (issuer.get("acr") or {}).values():
            out.extend(((entry or {}).get("implies_amr") or {}).get(value) or [])
        return out

    def challenge_acr_values(self, issuer: dict[str, Any], minimum: int) -> tuple[str, ...]:
        """README: the issuer's acr values for the required level, then for each stronger level,
        least friction first; `request` defaults to `accept`."""
        levels = self.doc["assurance"]["levels"]
        acr_map = issuer.get("acr") or {}
        out: list[str] = []
        for level in levels[minimum:]:
            entry = acr_map.get(level)
            if not entry:
                continue
            values = entry.get("request")
            if values is None:
                values = entry.get("accept") or []
            for v in values:
                if v not in out:
                    out.append(v)
        return tuple(out)

    def risk_fires(self, when: dict[str, Any], attrs: Any, headers: list[tuple[str, bytes]]) -> bool:
        if "source_not_in" in when:
            return not self.source_in(attrs.source.address.socket_address.address, when["source_not_in"])
        if "device_unknown" in when:
            spec = when["device_unknown"]
            values = self.header_values(headers, spec["header"].lower())
            if not values:
                return True
            # CHOICE: repeated device headers are read as Envoy's comma-joined value.
            return ",".join(values) not in spec["known"]
        if "outside_hours" in when:
            spec = when["outside_hours"]
            local = datetime.fromtimestamp(self.now, ZoneInfo(spec["timezone"]))
            if DAYS[local.weekday()] not in spec.get("days", DAYS):
                return True
            minute = local.hour * 60 + local.minute
            start = hhmm(spec["from"])
            end = hhmm(spec["to"])
            # CHOICE: the window is [from, to); from > to is a window across midnight.
            if start <= end:
                inside = start <= minute < end
            else:
                inside = minute >= start or minute < end
            return not inside
        raise NotImplementedError(str(when))

    def source_in(self, address: str, cidrs: list[str]) -> bool:
        """README: a missing source counts as untrusted. CHOICE: an unparsable address is
        untrusted too; an IPv4-mapped IPv6 address (::ffff:a.b.c.d, as a dual-stack listener
        reports IPv4 peers) is the IPv4 address."""
        if not address:
            return False
        try:
            ip: Any = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            if ip.version == net.version and ip in net:
                return True
        return False


# ================================================================================================
# Small helpers, each written out
# ================================================================================================


STEP0_REASONS = ["invalid_method", "invalid_path", "invalid_header", "ambiguous_credentials"]
STEP_UP_REASONS = ["acr_too_low", "amr_missing", "auth_too_old"]


def error_for(reason: str) -> str:
    """The challenge's error code for a reason code (README decision table; RFC 6750 §3.1: no
    error code for a request without credentials; RFC 9470 for step-up)."""
    if reason in STEP0_REASONS:
        return "invalid_request"
    if reason in STEP_UP_REASONS:
        return "insufficient_user_authentication"
    if reason == "insufficient_scope":
        return "insufficient_scope"
    if reason in ("missing_credential", "no_matching_rule", "permission_denied", "public", "allowed"):
        return ""
    if reason == "workload_granted":
        return ""
    return "invalid_token"


def duration(value: Any) -> int:
    """README: seconds, or e.g. 30s, 15m, 12h, 1d."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def hhmm(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def dedupe(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def utf8_ok(data: bytes) -> bool:
    """Strict UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF)."""
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        if 0xC2 <= b <= 0xDF:
            need, low, high = 1, 0x80, 0xBF
        elif b == 0xE0:
            need, low, high = 2, 0xA0, 0xBF
        elif 0xE1 <= b <= 0xEC or 0xEE <= b <= 0xEF:
            need, low, high = 2, 0x80, 0xBF
        elif b == 0xED:
            need, low, high = 2, 0x80, 0x9F
        elif b == 0xF0:
            need, low, high = 3, 0x90, 0xBF
        elif 0xF1 <= b <= 0xF3:
            need, low, high = 3, 0x80, 0xBF
        elif b == 0xF4:
            need, low, high = 3, 0x80, 0x8F
        else:
            return False
        if i + need >= n:
            return False  # truncated sequence
        second = data[i + 1]
        if not (low <= second <= high):
            return False
        for k in range(2, need + 1):
            if not (0x80 <= data[i + k] <= 0xBF):
                return False
        i += need + 1
    return True


def b64url_decode(text: str) -> bytes | None:
    """RFC 7515 §2 base64url without padding. CHOICE: padding '=' is refused; unused trailing
    bits are ignored."""
    if len(text) % 4 == 1:
        return None
    out = bytearray()
    bits = 0
    nbits = 0
    for ch in text:
        value = B64URL.find(ch)
        if value < 0:
            return None
        bits = (bits << 6) | value
        nbits += 6
        if nbits >= 8:
            nbits -= 8
            out.append((bits >> nbits) & 0xFF)
            bits = bits & ((1 << nbits) - 1)
    return bytes(out)


def b64url_int(text: str) -> int:
    data = b64url_decode(text)
    assert data is not None
    return int.from_bytes(data, "big")


def verify_rs256(jwk: dict[str, Any], signing_input: bytes, signature: bytes) -> bool:
    public = rsa.RSAPublicNumbers(b64url_int(jwk["e"]), b64url_int(jwk["n"])).public_key()
    try:
        public.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def unicode_ok(text: str) -> bool:
    for ch in text:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return False
    return True


def good_number(value: Any) -> bool:
    """spec-issue8: a JSON number, not a boolean, finite, magnitude below 2^53."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -TWO_53 < value < TWO_53
    if isinstance(value, float):
        return math.isfinite(value) and -TWO_53 < value < TWO_53
    return False


def string_or_strings(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        for v in value:
            if not isinstance(v, str):
                return False
        return True
    return False


def values_of(value: Any) -> list[str]:
    """spec-issue8: a JSON string is ONE value; a list of strings is the values."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def claim_at(claims: dict[str, Any], name: str) -> Any:
    """README `issuers[].claims`: dotted paths allowed (`realm_access.roles`).

    CHOICE: a claim whose value is JSON null counts as absent (OpenID Connect Core §5.1 asks
    for omission rather than null, and libraries read null as "not there"); for `exp`, which is
    required, that is an invalid_claim."""
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def struct_to_python(struct: Any) -> dict[str, Any]:
    out = {}
    for key in struct.fields:
        out[key] = value_to_python(struct.fields[key])
    return out


def value_to_python(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "null_value" or kind is None:
        return None
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_python(value.struct_value)
    items = []
    for v in value.list_value.values:
        items.append(value_to_python(v))
    return items


# ------------------------------------------------------------------------------------------------
# A strict RFC 8259 JSON parser (no NaN/Infinity, no leading zeros, no trailing data, no control
# characters in strings, lone surrogates refused, nesting limited to MAX_JSON_DEPTH). CHOICE: of
# duplicate member names the last one counts (RFC 7519 §4 allows that or a rejection).
# ------------------------------------------------------------------------------------------------


def parse_json(data: bytes, lenient: bool = False) -> tuple[bool, Any]:
    if not utf8_ok(data):
        return False, None
    text = data.decode("utf-8")
    parser = _JsonParser(text)
    parser.lenient = lenient
    try:
        parser.skip_ws()
        value = parser.value(0)
        parser.skip_ws()
        if parser.pos != len(text):
            return False, None
    except _BadJson:
        return False, None
    return True, value


class _JsonParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        # Only to know what a lenient parser (Python's json) would have read: NaN, Infinity,
        # lone surrogates.
        self.lenient = False

    def peek(self) -> str:
        if self.pos >= len(self.text):
            raise _BadJson("end of input")
        return self.text[self.pos]

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\n\r":
            self.pos += 1

    def expect(self, literal: str) -> None:
        if self.text[self.pos : self.pos + len(literal)] != literal:
            raise _BadJson(literal)
        self.pos += len(literal)

    def value(self, depth: int) -> Any:
        ch = self.peek()
        if ch == "{":
            return self.obj(depth + 1)
        if ch == "[":
            return self.arr(depth + 1)
        if ch == '"':
            return self.string()
        if ch == "t":
            self.expect("true")
            return True
        if ch == "f":
            self.expect("false")
            return False
        if ch == "n":
            self.expect("null")
            return None
        if self.lenient:
            for literal, number in (("NaN", math.nan), ("Infinity", math.inf), ("-Infinity", -math.inf)):
                if self.text[self.pos : self.pos + len(literal)] == literal:
                    self.pos += len(literal)
                    return number
        return self.number()

    def obj(self, depth: int) -> dict[str, Any]:
        if depth > MAX_JSON_DEPTH:
            raise _BadJson("too deep")
        self.expect("{")
        out: dict[str, Any] = {}
        self.skip_ws()
        if self.peek() == "}":
            self.pos += 1
            return out
        while True:
            self.skip_ws()
            if self.peek() != '"':
                raise _BadJson("key")
            key = self.string()
            self.skip_ws()
            self.expect(":")
            self.skip_ws()
            out[key] = self.value(depth)
            self.skip_ws()
            ch = self.peek()
            self.pos += 1
            if ch == "}":
                return out
            if ch != ",":
                raise _BadJson(",")

    def arr(self, depth: int) -> list[Any]:
        if depth > MAX_JSON_DEPTH:
            raise _BadJson("too deep")
        self.expect("[")
        out: list[Any] = []
        self.skip_ws()
        if self.peek() == "]":
            self.pos += 1
            return out
        while True:
            self.skip_ws()
            out.append(self.value(depth))
            self.skip_ws()
            ch = self.peek()
            self.pos += 1
            if ch == "]":
                return out
            if ch != ",":
                raise _BadJson(",")

    def string(self) -> str:
        self.expect('"')
        out = ""
        while True:
            ch = self.peek()
            self.pos += 1
            if ch == '"':
                return out
            if ord(ch) < 0x20:
                raise _BadJson("control character in a string")
            if ch != "\\":
                out += ch
                continue
            esc = self.peek()
            self.pos += 1
            simple = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
            if esc in simple:
                out += simple[esc]
                continue
            if esc != "u":
                raise _BadJson("escape")
            code = self.hex4()
            if 0xD800 <= code <= 0xDBFF and self.text[self.pos : self.pos + 2] == "\\u":
                digits = self.text[self.pos + 2 : self.pos + 6]
                low = 0
                if len(digits) == 4 and all(c in HEXDIG for c in digits):
                    low = int(digits, 16)
                if 0xDC00 <= low <= 0xDFFF:
                    self.pos += 2
                    self.hex4()
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
            if 0xD800 <= code <= 0xDFFF and not self.lenient:
                raise _BadJson("lone surrogate")
            out += chr(code)

    def hex4(self) -> int:
        digits = self.text[self.pos : self.pos + 4]
        if len(digits) != 4 or any(c not in HEXDIG for c in digits):
            raise _BadJson("\\u")
        self.pos += 4
        return int(digits, 16)

    def number(self) -> int | float:
        start = self.pos
        if self.pos < len(self.text) and self.text[self.pos] == "-":
            self.pos += 1
        int_start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in DIGIT:
            self.pos += 1
        int_digits = self.text[int_start : self.pos]
        if int_digits == "" or (len(int_digits) > 1 and int_digits[0] == "0"):
            raise _BadJson("number")
        is_float = False
        if self.pos < len(self.text) and self.text[self.pos] == ".":
            is_float = True
            self.pos += 1
            frac_start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] in DIGIT:
                self.pos += 1
            if self.pos == frac_start:
                raise _BadJson("fraction")
        if self.pos < len(self.text) and self.text[self.pos] in "eE":
            is_float = True
            self.pos += 1
            if self.pos < len(self.text) and self.text[self.pos] in "+-":
                self.pos += 1
            exp_start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] in DIGIT:
                self.pos += 1
            if self.pos == exp_start:
                raise _BadJson("exponent")
        literal = self.text[start : self.pos]
        if is_float:
            return float(literal)  # may be inf: a number, but not a finite one
        if len(int_digits) > 4000:
            return float(literal)  # beyond int()'s digit limit; surely not below 2^53
        return int(literal)
