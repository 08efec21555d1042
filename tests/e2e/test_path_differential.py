"""Path differential through a real Envoy: the upstream runs the operation the sidecar authorised.

A generated, deterministic cross product of request-targets (percent-escapes of unreserved and
reserved characters in both cases, dot segments in every spelling, repeated slashes, `;`
parameters, queries, fragments, case, unicode raw and escaped, trailing slashes, backslashes,
odd and lower-case methods) goes through a real Envoy, byte for byte (tests/e2e/raw_client.py,
HTTP/1.1 and, for what HTTP/1.1 parsers refuse, h2c), to a recording upstream
(tests/e2e/recorder.py) that keeps the exact request-target it received.

The property, for every request the upstream received: the sidecar allowed it under rule R (its
decision log, joined by the `x-auth-decision-id` the upstream got) and the received path, decoded
as frameworks decode it before routing (everything percent-decoded, query and fragment dropped;
also with one trailing slash ignored, as Express and Spring do), is matched by R's pattern under
the independent matcher below, and by no strictly more specific rule of the policy. No received
path holds a dot segment, `//`, a backslash or NUL once decoded.

Run twice: Envoy as examples/envoy/envoy.yaml ships it (normalize_path, merge_slashes, escaped
slashes rejected), and with all three off, where the sidecar is the only line of defence.
Readings that only some frameworks apply (HEAD served by the GET handler, case-insensitive routes,
`;` parameters stripped, `\\` as `/`) are counted and printed as advisories, not asserted.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import e2e_stack as st
import pytest
import yaml
from raw_client import Answer, send_h1, send_h2c

pytestmark = pytest.mark.e2e

RECORDER = Path(__file__).resolve().parent / "recorder.py"
HOST = "pd.example.test"
ID_HEADER = "x-pd-id"

# -- the policy ---------------------------------------------------------------------------------
# (name, patterns, sensitivity level, who may call). Every request carries a token with role
# `teller` at aal1: `TELLER` rules at level `low` allow it, `ADMIN` rules never do. A request the
# sidecar allows under a public or teller rule that the upstream routes to a more specific rule's
# handler is a bypass.

ANYONE: dict[str, Any] = {"anyone": True}
TELLER: dict[str, Any] = {"roles": ["teller"]}
ADMIN: dict[str, Any] = {"roles": ["admin"]}

RULES: list[tuple[str, list[str], str, dict[str, Any]]] = [
    ("docs-public", ["GET /docs/*"], "public", ANYONE),
    ("docs-secret", ["GET /docs/secret"], "critical", ADMIN),
    ("admin", ["* /admin/**"], "critical", ADMIN),
    ("status-public", ["* /status/**"], "public", ANYONE),
    ("status-internal", ["GET /status/internal"], "critical", ADMIN),
    ("v1-public", ["GET /v1/**"], "public", ANYONE),
    ("v1-admin", ["* /v1/admin/**"], "critical", ADMIN),
    ("users-me", ["GET /v1/users/me"], "low", TELLER),
    ("users-export", ["GET /v1/users/me:export"], "critical", ADMIN),
    ("at-sign", ["GET /v1/a@b/*"], "low", TELLER),
    ("bang", ["* /v1/x!y"], "critical", ADMIN),
    ("items-all", ["GET /v1/items/(all)"], "critical", ADMIN),
    ("items-one", ["GET /v1/items/*"], "low", TELLER),
    ("batch", ["* /v1/$batch"], "critical", ADMIN),
    ("plus", ["GET /v1/c+d"], "low", TELLER),
]
PATTERNS = {name: patterns for name, patterns, _, _ in RULES}


def write_policy(path: Path) -> Path:
    """The example policy (issuer, assurance and sensitivity levels) with the rules above and no
    risk rules (a loopback client must not raise the level)."""
    doc = yaml.safe_load(st.POLICY.read_text())
    doc["name"] = "path-differential"
    for issuer in doc["issuers"]:
        issuer["jwks_file"] = str(st.DEV_JWKS)
    doc["sensitivity"]["rules"] = [
        {"id": f"s.{name}", "match": patterns, "level": level} for name, patterns, level, _ in RULES
    ]
    doc["permissions"] = [
        {"id": f"p.{name}", "match": patterns, "allow": who} for name, patterns, _, who in RULES
    ]
    doc.pop("risk", None)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# -- the independent matcher --------------------------------------------------------------------
# Written from the README's pattern semantics, not from sidecar/: `*` is one non-empty segment,
# `**` (last only) the rest, zero or more segments; no method or `*` matches any method, an
# explicit method matches exactly (case-sensitive), and a GET pattern also matches HEAD (the GET
# handler runs). More specific: literal beats `*` beats `**`, earlier segments weigh more, then
# an explicit method beats `*`.

_LIT, _STAR, _REST = 0, 1, 2


def _split(pattern: str) -> tuple[str, list[str]]:
    method, _, path = pattern.rpartition(" ")
    return method or "*", path.split("/")[1:]


def pattern_matches(pattern: str, method: str, path: str, *, fold: bool = False) -> bool:
    """`fold`: compare literals case-insensitively (Express's default routing)."""
    pmethod, psegs = _split(pattern)
    # Frameworks answer HEAD with the GET handler (the test policy names no HEAD rule).
    head_as_get = method == "HEAD" and pmethod == "GET"
    if (pmethod not in ("*", method) and not head_as_get) or not path.startswith("/"):
        return False
    segs = path.split("/")[1:]
    for i, p in enumerate(psegs):
        if p == "**":
            return True
        if i >= len(segs) or (p == "*" and segs[i] == ""):
            return False
        if p != "*" and (p.casefold() != segs[i].casefold() if fold else p != segs[i]):
            return False
    return len(segs) == len(psegs)


def specificity(pattern: str) -> tuple[tuple[int, ...], int]:
    """Smaller is more specific (Python's tuple order: a shorter prefix sorts first)."""
    pmethod, psegs = _split(pattern)
    kinds = tuple(_REST if p == "**" else _STAR if p == "*" else _LIT for p in psegs)
    return kinds, int(pmethod == "*")


def best_pattern(rule: str, method: str, path: str, *, fold: bool = False) -> str | None:
    found = [p for p in PATTERNS[rule] if pattern_matches(p, method, path, fold=fold)]
    return min(found, key=specificity) if found else None


def more_specific_rules(
    rule: str, method: str, paths: list[str], *, fold: bool = False
) -> Iterator[tuple[str, str, str]]:
    """(other rule, its pattern, path) for each rule strictly more specific than `rule`'s best
    match that matches one of `paths`."""
    own = [p for v in paths if (p := best_pattern(rule, method, v, fold=fold))]
    if not own:
        return
    mine = min(specificity(p) for p in own)
    for other in PATTERNS:
        for v in paths:
            theirs = best_pattern(other, method, v, fold=fold)
            if other != rule and theirs and specificity(theirs) < mine:
                yield other, theirs, v
                break


def decode_for_routing(target: str) -> str:
    """The path as a framework routes on it: cut at `?`/`#`, every escape decoded (UTF-8;
    undecodable bytes kept as surrogates so they never equal a literal)."""
    raw = target.encode("latin-1")
    path = raw.split(b"?", 1)[0].split(b"#", 1)[0]
    return urllib.parse.unquote_to_bytes(path).decode("utf-8", "surrogateescape")


def readings(decoded: str) -> list[str]:
    """The decoded path, and (when it has one) without its trailing slash (Express, Spring)."""
    return [decoded, decoded[:-1]] if len(decoded) > 1 and decoded.endswith("/") else [decoded]


def structural_problems(decoded: str) -> list[str]:
    problems = []
    if any(s in (".", "..") for s in decoded.split("/")):
        problems.append("dot segment after decoding")
    if "//" in decoded:
        problems.append("'//' after decoding")
    if "\\" in decoded:
        problems.append("backslash after decoding")
    if "\x00" in decoded:
        problems.append("NUL after decoding")
    return problems


# Readings some frameworks apply, reported but not asserted: (method, decoded) -> (method, paths,
# fold). None when the reading does not apply to this request.
ADVISORY: dict[str, Callable[[str, str], tuple[str, list[str], bool] | None]] = {
    "HEAD served by the GET handler (Express, Spring, Flask)": lambda m, p: (
        ("GET", readings(p), False) if m == "HEAD" else None
    ),
    "case-insensitive routes (Express default)": lambda m, p: (m, readings(p), True),
    "';' parameters stripped (Spring, Tomcat)": lambda m, p: (
        (m, readings("/".join(s.split(";")[0] for s in p.split("/"))), False) if ";" in p else None
    ),
    "'\\' read as '/' (IIS, some servlet containers)": lambda m, p: (
        (m, readings(p.replace("\\", "/")), False) if "\\" in p else None
    ),
}


# -- generated requests -------------------------------------------------------------------------

BASES = [
    "/docs/readme",
    "/docs/secret",
    "/admin/users",
    "/admin",
    "/status/ok",
    "/status/internal",
    "/v1/things",
    "/v1/admin/keys",
    "/v1/users/me",
    "/v1/users/me:export",
    "/v1/a@b/c",
    "/v1/x!y",
    "/v1/items/(all)",
    "/v1/items/7",
    "/v1/$batch",
    "/v1/c+d",
]
DOTDOT = ["..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", ".%2E", "%2E.", "%2e%2E", "%252e%252e", "%c0%ae%c0%ae"]
DOT = [".", "%2e", "%2E", "%252e"]
FEW_DOTS = ["..", "%2E%2e", ".", "%2e"]
# (prefix, suffix): prefix/<dot-dot>/suffix resolves elsewhere than the prefix suggests.
SMUGGLE = [
    ("/docs/readme", "secret"),
    ("/docs/x", "secret"),
    ("/v1/things", "admin/keys"),
    ("/v1/users/x", "me:export"),
    ("/v1/users/x", "me%3Aexport"),
    ("/v1/x", "x!y"),
    ("/v1/items/7", "(all)"),
    ("/v1/x", "$batch"),
    ("/status/x", "internal"),
    ("/docs/secret", "readme"),
    ("/admin", "v1/things"),
    ("/admin/users", "docs/readme"),
    ("/v1/admin", "things"),
    ("/v1/x!y", "things"),
    ("/v1/users/me:export", "me"),
]
RESERVED = ":@!()$+,;=*'&"
QUERIES = ["?", "?q=1", "?q=[1]|{2}^", "?a=/../admin/users", "?%2e%2e/admin", "?x=%2F%5C", "??x", "?x#y"]
FRAGMENTS = ["#", "#frag", "#/../secret", "#?x=1"]
UNICODE = ["/é", "/%C3%A9", "/%c3%a9", "/%C3", "/%FF", "/%c0%ae", "/%c0%af", "/%EF%BC%8F", "/日本"]
TRAILING = ["/", "//", "/.", "/%2e", "/./", "/..", "/%2e%2e", "/..;", ";", "%20", "%09"]
BAD_ESCAPES = ["%", "%2", "%zz", "%%73", "%00", "%2500"]
H1_METHODS = ["HEAD", "POST", "DELETE", "PURGE", "get", "M-SEARCH"]
H2_METHODS = ["GET", "get", "Get", "HEAD", "head", "delete", "PURGE", "M-SEARCH", "*"]
# Characters an HTTP/1.1 request line cannot carry or Envoy's HTTP/1 codec refuses, tried on h2c.
H2_ODD_PATHS = ["/é", "#frag", "#/../secret", "/a b", "/a|b", "/[x]", "/a\\..\\..\\secret", "/%2e%2e/"]


def _pct(s: str, lower: bool = False) -> str:
    return "".join(f"%{b:02x}" if lower else f"%{b:02X}" for b in s.encode())


def _variants(base: str) -> Iterator[str]:
    segs = base.split("/")[1:]
    yield base
    # One character percent-encoded, in both cases: each segment's first character, every
    # reserved character and every separating slash.
    for i, c in enumerate(base):
        first = i > 0 and base[i - 1] == "/"
        if (c != "/" and (first or c in RESERVED)) or (c == "/" and i > 0):
            for lower in (False, True):
                yield base[:i] + _pct(c, lower) + base[i + 1 :]
    # Everything but the slashes encoded.
    for lower in (False, True):
        yield "/" + "/".join(_pct(s, lower) for s in segs)
    # Dot segments before each segment (every spelling after the first segment): x/<..>/, <.>/
    for k in range(len(segs) + 1):
        head, tail = "/".join(["", *segs[:k]]), "/".join(segs[k:])
        for dd in DOTDOT + DOT if k == 1 else FEW_DOTS:
            yield f"{head}/x/{dd}/{tail}" if dd in DOTDOT else f"{head}/{dd}/{tail}"
    # Repeated slashes, each separator in turn, and leading.
    for i, c in enumerate(base):
        if c == "/":
            yield base[:i] + "//" + base[i + 1 :]
    yield "//" + base.lstrip("/")
    # `;` path parameters on each segment.
    for k in range(len(segs)):
        yield "/" + "/".join(s + ";x=1" if j == k else s for j, s in enumerate(segs))
    # Case of each segment.
    for k in range(len(segs)):
        for f in (str.upper, str.capitalize):
            yield "/" + "/".join(f(s) if j == k else s for j, s in enumerate(segs))
    # Backslash for each separator.
    for i, c in enumerate(base):
        if c == "/" and i > 0:
            for bs in ("\\", "%5C", "%5c"):
                yield base[:i] + bs + base[i + 1 :]
    # Double encoding of the last segment's first character.
    last = base.rfind("/") + 1
    yield base[:last] + "%25" + _pct(base[last])[1:] + base[last + 1 :]
    for suffix in [*QUERIES, *FRAGMENTS, *UNICODE, *TRAILING, *BAD_ESCAPES, "/%2e%2e?x=1", "/?x=1"]:
        yield base + suffix


def _smuggles() -> Iterator[str]:
    for prefix, suffix in SMUGGLE:
        for dd in DOTDOT:
            yield f"{prefix}/{dd}/{suffix}"
        yield f"{prefix}/..;/{suffix}"
        yield f"{prefix}/%2e%2e;/{suffix}"
        yield f"{prefix}%2F..%2F{suffix}"
        yield f"{prefix}/..%2F{suffix}"
        yield f"{prefix}\\..\\{suffix}"
        yield f"{prefix}/..\\{suffix}"
        yield f"{prefix}/%5C../{suffix}"
        yield f"{prefix}//../{suffix}"
    for dd in ("..", "%2e%2e", ".%2E"):
        yield f"/{dd}/docs/secret"
        yield f"/v1/things/{dd}/{dd}/admin/users"
        yield f"/docs/secret/{dd}"
        yield f"/v1/admin/keys/{dd}"
        yield f"/v1/admin/{dd}"
    yield from [
        "/v1/items/%28all%29",
        "/v1/items/%28all)",
        "/v1/x%21y",
        "/v1/%24batch",
        "/v1/c%2Bd",
        "/v1/c%2bd",
        "/v1/a%40b/c",
        "/v1/users/me%3Aexport",
        "/v1/users/me%3aexport",
        "/status/%69nternal",
        "/status/internal%3B",
    ]


@dataclass(frozen=True)
class Probe:
    n: int
    proto: str  # "h1" or "h2c"
    method: str
    target: str


def probes() -> list[Probe]:
    """The request set: every path variant with GET over HTTP/1.1; odd methods on each base
    path, its trailing-slash and fully encoded spellings (HTTP/1.1 and h2c); on h2c also the
    characters HTTP/1.1 cannot carry."""
    seen: set[tuple[str, str, str]] = set()
    out: list[Probe] = []

    def add(proto: str, method: str, target: str) -> None:
        if (proto, method, target) not in seen:
            seen.add((proto, method, target))
            out.append(Probe(len(out), proto, method, target))

    for base in BASES:
        for v in _variants(base):
            add("h1", "GET", v)
    for v in _smuggles():
        add("h1", "GET", v)
    for base in BASES:
        spellings = [base, base + "/", "/" + "/".join(_pct(s) for s in base.split("/")[1:])]
        for method in H1_METHODS:
            for v in spellings:
                add("h1", method, v)
        for method in H2_METHODS:
            for v in spellings:
                add("h2c", method, v)
        for suffix in H2_ODD_PATHS:
            add("h2c", "GET", base + suffix)
    return out


def send(address: str, probe: Probe, token: str, run: str) -> Answer | None:
    headers = [("host", HOST), ("authorization", f"Bearer {token}"), (ID_HEADER, f"{run}.{probe.n}")]
    client = send_h1 if probe.proto == "h1" else send_h2c
    return client(address, probe.method, probe.target, headers)


# -- the stack ----------------------------------------------------------------------------------


@dataclass
class Recorder(st.Service):
    port: int = 0

    def wait_ready(self) -> None:
        out = self.proc.stdout
        first = self.proc.wait_for(lambda: out().partition("\n")[0] if "\n" in out() else "", "ready")
        self.port = int(json.loads(first)["port"])

    def received(self) -> list[dict[str, Any]]:
        """What the upstream received, one record per request, in arrival order."""
        return list(_json_lines(self.proc.stdout().partition("\n")[2]))


def envoy_bootstrap(sidecar: st.Sidecar, recorder: Recorder, *, normalize: bool) -> dict[str, Any]:
    """examples/envoy/envoy.yaml pointed at the sidecar and the recorder, its access log also
    carrying our request id; with `normalize=False` Envoy leaves the path alone."""
    doc = st.envoy_config(
        st.ENVOY_YAML, ext_authz=sidecar.port, bank_upstream=recorder.port, http_upstream=recorder.port
    )
    (listener,) = doc["static_resources"]["listeners"]
    ((hcm,),) = [chain["filters"] for chain in listener["filter_chains"]]
    cfg = hcm["typed_config"]
    shipped = (cfg["normalize_path"], cfg["merge_slashes"], cfg["path_with_escaped_slashes_action"])
    assert shipped == (True, True, "REJECT_REQUEST"), f"examples/envoy/envoy.yaml now has {shipped}"
    if not normalize:
        cfg["normalize_path"] = False
        cfg["merge_slashes"] = False
        cfg["path_with_escaped_slashes_action"] = "KEEP_UNCHANGED"
    (log,) = cfg["access_log"]
    log["typed_config"]["log_format"]["json_format"]["pd_id"] = f"%REQ({ID_HEADER.upper()})%"
    return doc


def new_envoy(workdir: Path, name: str, bootstrap: dict[str, Any]) -> st.Envoy:
    """Like examples/stack.py new_envoy, for a bootstrap built here."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(bootstrap))
    admin_path = workdir / f"{name}.admin"
    argv = [
        str(st.ENVOY),
        "-c",
        str(cfg_path),
        "-l",
        "warn",
        "--use-dynamic-base-id",
        "--admin-address-path",
        str(admin_path),
        "--concurrency",
        "1",
        "--file-flush-interval-msec",
        "100",
    ]
    return st.Envoy(st.Proc(name, argv, workdir), admin_path)


@pytest.fixture(scope="module")
def pd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("path-differential")


@pytest.fixture(scope="module")
def pd_sidecar(pd_dir: Path) -> Iterator[st.Sidecar]:
    policy = write_policy(pd_dir / "policy.yaml")
    sidecar = st.new_sidecar(pd_dir, "pd-sidecar", console_spans=False, policy=policy)
    with st.running(sidecar):
        yield sidecar.start()


@pytest.fixture(scope="module")
def pd_recorder(pd_dir: Path) -> Iterator[Recorder]:
    argv = [sys.executable, str(RECORDER), "--listen", "127.0.0.1:0"]
    recorder = Recorder(st.Proc("pd-recorder", argv, pd_dir, {"PYTHONUNBUFFERED": "1"}))
    with st.running(recorder):
        yield recorder.start()


# -- joining the logs ---------------------------------------------------------------------------


@dataclass
class Outcome:
    probe: Probe
    kind: str  # allowed / envoy (refused by Envoy) / sidecar_400 / denied / lost (allowed, never received)
    answer: Answer | None
    reason: str = ""
    received: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None


def _json_lines(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line still being written


def collect(
    run: str,
    sent: list[tuple[Probe, Answer | None]],
    envoy: st.Envoy,
    sidecar: st.Sidecar,
    recorder: Recorder,
) -> list[Outcome]:
    """Join each request to what the upstream received (by x-pd-id), to Envoy's access log line
    (x-pd-id -> the sidecar's decision id, when Envoy asked the sidecar) and the decision log."""

    def our_id(value: object) -> int | None:
        tag, _, n = str(value).partition(".")
        return int(n) if tag == run and n.isdigit() else None

    by_id: dict[int, dict[str, Any]] = {}
    for record in recorder.received():
        n = our_id(dict(record["headers"]).get(ID_HEADER))
        if n is not None:
            assert n not in by_id, f"the upstream received request {run}.{n} twice"
            by_id[n] = record
    # Envoy writes one access log line per request (pd_id null when its codec refused the request
    # before reading headers), flushed asynchronously: wait for all of them.
    deadline = time.monotonic() + 10
    while len(lines := list(_json_lines(envoy.proc.stdout()))) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.1)
    access = {n: line for line in lines if (n := our_id(line.get("pd_id"))) is not None}
    decisions: dict[str, dict[str, Any]] = {d["decision_id"]: d for d in sidecar.decisions()}
    out = []
    for probe, answer in sent:
        rec = by_id.get(probe.n)
        decision_id = dict(rec["headers"]).get("x-auth-decision-id") if rec else None
        decision_id = decision_id or access.get(probe.n, {}).get("authz_decision_id")
        found = decisions.get(decision_id) if isinstance(decision_id, str) else None
        if rec is not None:
            out.append(Outcome(probe, "allowed", answer, "", rec, found))
        elif found is None:
            status = answer.status if answer else None
            note = answer.note if answer else "no answer"
            out.append(Outcome(probe, "envoy", answer, f"{status or ''} {note}".strip()))
        elif found["outcome"] == "allow":
            out.append(Outcome(probe, "lost", answer, "allowed, never received", None, found))
        else:
            kind = "sidecar_400" if found["http_status"] == 400 else "denied"
            out.append(Outcome(probe, kind, answer, found["reason"], None, found))
    return out


# -- the property -------------------------------------------------------------------------------


def _allowing_rules(o: Outcome) -> tuple[list[str], list[str]]:
    rules = (o.decision or {}).get("rules", [])
    return [r[2:] for r in rules if r.startswith("s.")], [r[2:] for r in rules if r.startswith("p.")]


def most_specific_rule(method: str, path: str, *, fold: bool = False) -> str | None:
    found = [(specificity(p), r) for r in PATTERNS if (p := best_pattern(r, method, path, fold=fold))]
    return min(found)[1] if found else None


def violations(o: Outcome) -> list[str]:
    """What is wrong with one request the upstream received (empty when nothing is)."""
    assert o.received is not None
    if o.decision is None:
        return ["no decision log line for the decision id the upstream received"]
    if o.decision["outcome"] != "allow":
        return [f"the upstream received a request the sidecar decided {o.decision['outcome']!r}"]
    sens, perms = _allowing_rules(o)
    if not sens:
        return [f"the decision names no sensitivity rule: {o.decision['rules']}"]
    method, decoded = o.received["method"], decode_for_routing(o.received["target"])
    views = readings(decoded)
    problems = structural_problems(decoded)
    # Every reading the upstream may route on must have been decided under its own most
    # specific rule (a trailing-slash path is decided under both readings, naming both rules).
    for v in views:
        best = most_specific_rule(method, v)
        if best is not None and best not in sens:
            pattern = best_pattern(best, method, v)
            problems.append(f"more specific rule {best} ({pattern}) matches {method} {v}")
    if not any(best_pattern(r, method, v) for r in sens for v in views):
        problems.append(f"rules {sens} do not match {method} {' or '.join(views)}")
    for p in perms:
        if not any(best_pattern(p, method, v) for v in views):
            problems.append(
                f"permission rule {p} ({' | '.join(PATTERNS[p])}) does not match {method} {views}"
            )
    return problems


def advisories(o: Outcome) -> list[str]:
    """The advisory readings under which a rule more specific than the allowing one matches."""
    assert o.received is not None
    sens, _ = _allowing_rules(o)
    if not sens:
        return []
    rule = sens[0]
    method, decoded = o.received["method"], decode_for_routing(o.received["target"])
    found = []
    for name, reading in ADVISORY.items():
        r = reading(method, decoded)
        if r is None:
            continue
        m, paths, fold = r
        hits = [
            f"{other} ({pattern})" for other, pattern, _ in more_specific_rules(rule, m, paths, fold=fold)
        ]
        if hits:
            found.append(f"{name}: {', '.join(hits)}")
    return found


def describe(o: Outcome, problems: list[str]) -> str:
    assert o.received is not None
    return (
        f"[{o.probe.proto}] sent {o.probe.method} {o.probe.target!r} -> upstream received "
        f"{o.received['method']} {o.received['target']!r} (decoded {decode_for_routing(o.received['target'])!r}), "
        f"allowed under [{','.join((o.decision or {}).get('rules', []))}]: {'; '.join(problems)}"
    )


def grouped(items: list[tuple[Outcome, list[str]]], per_group: int = 3) -> str:
    """Violations grouped by allowing rule and kind of problem, a few examples each."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for o, problems in items:
        kinds = sorted({p.split(" (")[0].split(" matches")[0].split(" does not")[0] for p in problems})
        groups[(",".join((o.decision or {}).get("rules", [])), "; ".join(kinds))].append(
            describe(o, problems)
        )
    lines = []
    for (rules, what), examples in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"{len(examples)} x allowed under [{rules}]: {what}")
        lines.extend(f"    {e}" for e in examples[:per_group])
    return "\n".join(lines)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize-on", "normalize-off"])
def test_the_upstream_runs_the_operation_the_sidecar_authorised(
    normalize: bool,
    pd_dir: Path,
    pd_sidecar: st.Sidecar,
    pd_recorder: Recorder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every request Envoy forwards was allowed under the rule the upstream routes it to, and no
    forwarded path holds a dot segment, `//`, `\\` or NUL after decoding."""
    name = "pd-envoy-on" if normalize else "pd-envoy-off"
    envoy = new_envoy(pd_dir, name, envoy_bootstrap(pd_sidecar, pd_recorder, normalize=normalize))
    token = st.mint(roles=("teller",), acr=st.AAL1, amr=("pwd",), scope="", ttl=900)
    todo = probes()
    started = time.monotonic()
    with st.running(envoy):
        envoy.start()
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda p: send(envoy.address, p, token, name), todo))
        outcomes = collect(name, list(zip(todo, answers, strict=True)), envoy, pd_sidecar, pd_recorder)
    elapsed = time.monotonic() - started

    allowed = [o for o in outcomes if o.kind == "allowed"]
    counts = Counter(o.kind for o in outcomes)
    bad = [(o, v) for o in allowed if (v := violations(o))]
    advised = [(o, a) for o in allowed if (a := advisories(o))]
    report = {
        "envoy": name,
        "requests": len(outcomes),
        "h2c": sum(o.probe.proto == "h2c" for o in outcomes),
        "seconds": round(elapsed, 1),
        "allowed": counts["allowed"],
        "refused_by_envoy": counts["envoy"],
        "sidecar_400": counts["sidecar_400"],
        "denied": counts["denied"],
        "allowed_never_received": counts["lost"],
        "violations": len(bad),
        "advisories": len(advised),
    }
    refusals = Counter(f"{o.kind}: {o.reason}" for o in outcomes if o.kind != "allowed")
    allowed_by = Counter(",".join((o.decision or {}).get("rules", ["?"])) for o in allowed)
    advisory_kinds = Counter(a.split(":")[0] for _, found in advised for a in found)
    (pd_dir / f"{name}.report.json").write_text(
        json.dumps(
            {
                **report,
                "refusals": refusals,
                "allowed_by": allowed_by,
                "violations": [describe(o, v) for o, v in bad],
                "advisories": [describe(o, a) for o, a in advised],
                "outcomes": [
                    {
                        "proto": o.probe.proto,
                        "method": o.probe.method,
                        "target": o.probe.target,
                        "kind": o.kind,
                        "status": o.answer.status if o.answer else None,
                        "reason": o.reason,
                        "received": o.received and o.received["target"],
                        "rules": (o.decision or {}).get("rules"),
                    }
                    for o in outcomes
                ],
            },
            indent=1,
            ensure_ascii=False,
        )
    )
    with capsys.disabled():
        print(f"\npath differential: {json.dumps(report)}")
        print(f"  refusals: {dict(sorted(refusals.items()))}")
        print(f"  allowed under: {dict(sorted(allowed_by.items()))}")
        if advised:
            print(f"  advisories (not asserted): {dict(advisory_kinds)}")
            for o, a in advised[:6]:
                print(f"    {describe(o, a)}")
        print(f"  full report: {pd_dir / f'{name}.report.json'}")

    assert all(o.answer is not None and o.answer.status == 200 for o in allowed), (
        "a forwarded request did not get the upstream's 200"
    )
    assert not counts["lost"], [o.probe for o in outcomes if o.kind == "lost"][:10]
    assert counts["allowed"] > 100 and counts["sidecar_400"] + counts["envoy"] > 100, report
    assert not bad, f"{len(bad)} of {len(allowed)} forwarded requests violate the property:\n{grouped(bad)}"
