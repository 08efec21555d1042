"""Read the policy file once into frozen, compiled objects, collecting every problem with its place.

`load_policy(path)` returns a Policy or raises PolicyError whose `problems` each name the file,
the line and column, the location in the document (e.g. `permissions[2].allow.roles`) and what is
wrong. Nothing here runs per request.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonschema
import yaml

from sidecar.assurance import build_issuer_acr
from sidecar.engine import LevelSpec, Policy, UpstreamHeaders
from sidecar.identity import Authenticator, ClaimNames, IssuerConfig
from sidecar.jwks import Fetcher, KeyProvider, RemoteKeys, StaticKeys, parse_jwks, urllib_fetch
from sidecar.policy import PermissionRule, SensitivityRule, Tables, build_index
from sidecar.risk import DeviceUnknown, OutsideHours, RiskRule, SourceNotIn, day_index

DEV_ISSUER = "https://idp.example.test"

PathT = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    column: int
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.where or '(document)'}: {self.message}"


class PolicyError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def schema() -> dict[str, Any]:
    text = resources.files("sidecar").joinpath("policy.schema.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """The schema with every local `$ref` replaced by its target: same meaning, but validation
    skips reference resolution, which dominated the load time of large policies."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and len(node) == 1:
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


_SCHEMA = schema()
_VALIDATOR = jsonschema.Draft202012Validator(_inline_refs(_SCHEMA, _SCHEMA["$defs"]))


def _where(path: PathT) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Doc:
    """YAML data plus, when a problem must be located, the line/column of every node.

    The common case (a valid file) parses once with libyaml; marks are computed only when there
    is a problem to report, so large policies load fast."""

    def __init__(self, file: str, text: str | None, data: Any = None) -> None:
        """`text` is the YAML to parse; with `text=None`, `data` is an already parsed document
        (problems are then located by path only, at 1:1)."""
        self.file = file
        self.text = text
        self._marks: dict[PathT, tuple[int, int]] | None = None
        if text is None:
            self.data: Any = data
            return
        try:
            self.data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        except _DupKey:
            self.marks()  # raises _DupKey with the key's full path

    def marks(self) -> dict[PathT, tuple[int, int]]:
        if self._marks is None:
            self._marks = {}
            if self.text is None:
                return self._marks
            node = yaml.compose(self.text, Loader=_Loader)
            if node is not None:
                self._walk(node, ())
        return self._marks

    def _walk(self, node: yaml.Node, path: PathT) -> None:
        assert self._marks is not None
        self._marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for knode, vnode in node.value:
                key = knode.value if isinstance(knode, yaml.ScalarNode) else repr(knode)
                if key in seen:
                    raise _DupKey(path, key, knode.start_mark.line + 1, knode.start_mark.column + 1)
                seen.add(key)
                self._walk(vnode, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, (*path, i))

    def problem(self, path: PathT, message: str) -> Problem:
        marks = self.marks()
        p = path
        while p not in marks and p:
            p = p[:-1]
        line, col = marks.get(p, (1, 1))
        return Problem(self.file, line, col, _where(path), message)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """SafeLoader (libyaml when available) that refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for knode, _ in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else id(knode)
            if key in seen:
                raise _DupKey((), key, knode.start_mark.line + 1, knode.start_mark.column + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


class _DupKey(Exception):
    def __init__(self, path: PathT, key: Any, line: int, column: int) -> None:
        self.path = path
        self.key = key
        self.line = line
        self.column = column


def _fold_pattern(text: str) -> str:
    """A pattern's path in lower case (its method keeps its case: methods are case-sensitive)."""
    method, sep, path = text.rpartition(" ")
    return f"{method}{sep}{path.lower()}"


def parse_duration(v: int | str) -> int:
    if isinstance(v, int):
        return v
    n, unit = int(v[:-1]), v[-1]
    return n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def load_policy(
    path: str | Path,
    *,
    fetch: Fetcher = urllib_fetch,
    allow_insecure_jwks_http: bool = False,
) -> Policy:
    """Load, validate and compile a policy file. Raises PolicyError listing every problem."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError([Problem(file, 1, 1, "", f"cannot read the file: {e}")]) from None
    return load_policy_text(
        text,
        file=file,
        base_dir=path.parent,
        fetch=fetch,
        allow_insecure_jwks_http=allow_insecure_jwks_http,
    )


def load_policy_text(
    text: str,
    *,
    file: str = "<policy>",
    base_dir: Path | None = None,
    fetch: Fetcher = urllib_fetch,
    allow_insecure_jwks_http: bool = False,
) -> Policy:
    base_dir = base_dir or Path.cwd()
    doc = _parsed(text, file)
    return _build(doc, base_dir, content_digest(text), fetch, allow_insecure_jwks_http)


def _parsed(text: str, file: str) -> _Doc:
    """The YAML parsed and checked against the schema (every problem, located)."""
    try:
        doc = _Doc(file, text)
    except _DupKey as e:
        raise PolicyError(
            [Problem(file, e.line, e.column, _where((*e.path, e.key)), "duplicate key")]
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PolicyError([Problem(file, line, col, "", f"invalid YAML: {e.problem}")]) from None
    except yaml.YAMLError as e:
        raise PolicyError([Problem(file, 1, 1, "", f"invalid YAML: {e}")]) from None
    data = doc.data
    problems: list[Problem] = []
    for err in sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        problems.append(doc.problem(tuple(err.absolute_path), _schema_message(err)))
    if problems:
        raise PolicyError(problems)
    assert isinstance(data, dict)
    return doc


def validated_data(
    text: str,
    *,
    file: str,
    base_dir: Path,
    fetch: Fetcher = urllib_fetch,
    allow_insecure_jwks_http: bool = False,
) -> dict[str, Any]:
    """Everything `load_policy_text` checks; returns the parsed document instead of the policy."""
    doc = _parsed(text, file)
    _build(doc, base_dir, content_digest(text), fetch, allow_insecure_jwks_http)
    data: dict[str, Any] = doc.data
    return data


def load_policy_data(
    data: dict[str, Any],
    *,
    file: str,
    base_dir: Path,
    digest: str,
    fetch: Fetcher = urllib_fetch,
    allow_insecure_jwks_http: bool = False,
) -> Policy:
    """Compile a document that already passed `load_policy` (schema and all) elsewhere: the
    isolated reload parses and validates in a child process and hands over the data. The schema
    is not checked again; the compile's own checks are (their problems are located by path)."""
    return _build(_Doc(file, None, data), base_dir, digest, fetch, allow_insecure_jwks_http)


def content_digest(text: str) -> str:
    """The content hash in a policy's version (`name@digest`)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _build(doc: _Doc, base_dir: Path, digest: str, fetch: Fetcher, allow_insecure_http: bool) -> Policy:
    builder = _Builder(doc, doc.data, base_dir, fetch, allow_insecure_http)
    policy = builder.build(digest)
    if builder.problems:
        raise PolicyError(builder.problems)
    assert policy is not None
    return policy


def _schema_message(err: jsonschema.ValidationError) -> str:
    if err.validator == "additionalProperties":
        return err.message.replace("Additional properties are not allowed", "unknown key(s)")
    if err.validator == "pattern":
        return f"{err.instance!r} does not have the expected form"
    desc = err.schema.get("description", "") if isinstance(err.schema, dict) else ""
    if err.validator == "oneOf" and "unit s, m, h or d" in str(desc):
        return f"{err.instance!r} is not a duration (seconds, or e.g. 30s, 15m, 12h, 1d)"
    return err.message


class _Builder:
    def __init__(
        self,
        doc: _Doc,
        data: dict[str, Any],
        base_dir: Path,
        fetch: Fetcher,
        allow_insecure_http: bool,
    ) -> None:
        self.doc = doc
        self.data = data
        self.base_dir = base_dir
        self.fetch = fetch
        self.allow_insecure_http = allow_insecure_http
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        self.files: list[str] = []

    def err(self, path: PathT, message: str) -> None:
        self.problems.append(self.doc.problem(path, message))

    def build(self, digest: str) -> Policy | None:
        d = self.data
        assurance = d["assurance"]
        levels: tuple[str, ...] = tuple(assurance["levels"])
        index = {n: i for i, n in enumerate(levels)}
        skew = parse_duration(assurance.get("clock_skew", 60))

        # Sensitivity levels.
        specs: dict[str, LevelSpec] = {}
        for name, lv in d["sensitivity"]["levels"].items():
            where: PathT = ("sensitivity", "levels", name)
            public = lv.get("authentication") == "none"
            min_name = lv.get("min_assurance")
            if public and any(k in lv for k in ("min_assurance", "max_age", "required_amr")):
                self.err(where, "a level with 'authentication: none' cannot also set requirements")
            if min_name is not None and min_name not in index:
                self.err(
                    (*where, "min_assurance"),
                    f"unknown assurance level {min_name!r} (known: {', '.join(levels)})",
                )
            specs[name] = LevelSpec(
                name=name,
                public=public,
                min_level=index.get(min_name) if min_name else None,
                max_age=parse_duration(lv["max_age"]) if "max_age" in lv else None,
                required_amr=frozenset(lv.get("required_amr", ())),
            )

        # Issuers.
        issuers: list[IssuerConfig] = []
        seen_ids: set[str] = set()
        seen_iss: set[str] = set()
        for i, raw in enumerate(d["issuers"]):
            cfg = self._issuer(i, raw, levels, index)
            if cfg is None:
                continue
            if cfg.id in seen_ids:
                self.err(("issuers", i, "id"), f"duplicate issuer id {cfg.id!r}")
            if cfg.issuer in seen_iss:
                self.err(("issuers", i, "issuer"), f"issuer {cfg.issuer!r} is configured twice")
            seen_ids.add(cfg.id)
            seen_iss.add(cfg.issuer)
            issuers.append(cfg)

        # Risk rules.
        risks: list[RiskRule] = []
        for i, raw in enumerate(d.get("risk", [])):
            cond = self._condition(("risk", i, "when"), raw["when"])
            if cond is not None:
                max_age = parse_duration(raw["max_age"]) if "max_age" in raw else None
                risks.append(RiskRule(raw["id"], cond, raw.get("raise", 1), max_age))
        self._unique_ids("risk", d.get("risk", []))

        # Tables. With case-insensitive paths, patterns are folded here and request paths in the
        # engine; two patterns that differ only in case then tie (a load error).
        case_sensitive = d.get("paths", {}).get("case_sensitive", True)
        fold = (lambda t: t) if case_sensitive else _fold_pattern
        sens_entries: list[tuple[str, SensitivityRule]] = []
        sens_pos: list[PathT] = []
        for i, r in enumerate(d["sensitivity"]["rules"]):
            if r["level"] not in specs:
                self.err(("sensitivity", "rules", i, "level"), f"unknown sensitivity level {r['level']!r}")
                continue
            for j, pat in enumerate(r["match"]):
                sens_entries.append((fold(pat), SensitivityRule(r["id"], r["level"])))
                sens_pos.append(("sensitivity", "rules", i, "match", j))
        self._unique_ids("sensitivity.rules", d["sensitivity"]["rules"], ("sensitivity", "rules"))
        sens_index = build_index(
            sens_entries, lambda pos, m: self.err(sens_pos[pos], m), unique=lambda r: r.id
        )

        perm_entries: list[tuple[str, PermissionRule]] = []
        perm_pos: list[PathT] = []
        for i, r in enumerate(d["permissions"]):
            rule = self._permission(i, r, {c.id for c in issuers})
            for j, pat in enumerate(r["match"]):
                perm_entries.append((fold(pat), rule))
                perm_pos.append(("permissions", i, "match", j))
        self._unique_ids("permissions", d["permissions"])
        perm_index = build_index(perm_entries, lambda pos, m: self.err(perm_pos[pos], m))

        self._check_satisfiable(levels, specs, risks, issuers)
        if self.problems:
            return None

        headers = UpstreamHeaders(**d.get("upstream_headers", {}))
        if len(set(headers.names())) != len(headers.names()):
            self.err(("upstream_headers",), "two upstream headers share a name")
        for name in headers.names():
            if name in ("authorization", "cookie", "host") or name.startswith(("x-envoy-", ":")):
                self.err(("upstream_headers",), f"{name!r} cannot be used as an identity header")
        if self.problems:
            return None

        name = d.get("name", "policy")
        authenticator = Authenticator(
            tuple(issuers),
            n_levels=len(levels),
            amr_derivation=assurance.get("amr_derivation", True),
            skew=skew,
        )
        return Policy(
            name=name,
            version=f"{name}@{digest}",
            realm=d.get("realm", name),
            source=self.doc.file,
            levels=levels,
            skew=skew,
            tables=Tables(sens_index, perm_index),
            sensitivity_levels=specs,
            context_extension_key=d["sensitivity"].get("context_extension", ""),
            case_sensitive_paths=case_sensitive,
            risk_rules=tuple(risks),
            issuers=tuple(issuers),
            authenticator=authenticator,
            upstream_headers=headers,
            warnings=tuple(self.warnings),
            files=tuple(self.files),
        )

    def _unique_ids(self, what: str, items: list[dict[str, Any]], base: PathT | None = None) -> None:
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item["id"] in seen:
                self.err((*(base or (what,)), i, "id"), f"duplicate rule id {item['id']!r} in {what}")
            seen.add(item["id"])

    def _issuer(
        self, i: int, raw: dict[str, Any], levels: tuple[str, ...], index: dict[str, int]
    ) -> IssuerConfig | None:
        where: PathT = ("issuers", i)
        keys: KeyProvider | None = None
        algorithms = tuple(raw.get("algorithms", ["RS256", "ES256"]))
        if "jwks_file" in raw and "jwks_uri" in raw:
            self.err(where, "set either jwks_file or jwks_uri, not both")
        elif "jwks_file" in raw:
            p = Path(raw["jwks_file"])
            p = p if p.is_absolute() else self.base_dir / p
            self.files.append(str(p))
            try:
                jwks = parse_jwks(p.read_bytes(), algorithms)
            except OSError as e:
                self.err((*where, "jwks_file"), f"cannot read JWKS file {str(p)!r}: {e.strerror}")
            except ValueError as e:
                self.err((*where, "jwks_file"), f"bad JWKS in {str(p)!r}: {e}")
            else:
                for problem in jwks.refused:
                    self.err((*where, "jwks_file"), f"bad JWKS in {str(p)!r}: {problem}")
                if not jwks.refused:
                    keys = StaticKeys(jwks.keys)
        elif "jwks_uri" in raw:
            url = urlparse(raw["jwks_uri"])
            loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
            if url.scheme != "https" and not (loopback or self.allow_insecure_http):
                self.err(
                    (*where, "jwks_uri"), "a JWKS URL must use https (http is accepted only on loopback)"
                )
            else:
                remote = RemoteKeys(
                    raw["jwks_uri"],
                    algorithms=algorithms,
                    fetch=self.fetch,
                    ttl=parse_duration(raw.get("jwks_refresh", 600)),
                )
                if not remote.refresh():
                    self.warnings.append(
                        f"issuer {raw['id']!r}: JWKS {raw['jwks_uri']} could not be fetched at load"
                        f" ({remote.last_error}); tokens will be refused until it can be"
                    )
                keys = remote
        elif "jwt_authn_payload" not in raw:
            self.err(where, "an issuer needs jwks_file, jwks_uri or jwt_authn_payload")
        if keys is not None and not raw.get("audiences"):
            self.err(where, "an issuer whose tokens the sidecar verifies needs 'audiences'")
        if raw["issuer"] == DEV_ISSUER:
            self.warnings.append(
                f"issuer {raw['id']!r} is the development issuer {DEV_ISSUER}: its private key is public"
            )
        table: dict[str, tuple[list[str], list[str]]] = {}
        seen_acr: dict[str, str] = {}
        for lname, entry in raw["acr"].items():
            if lname not in index:
                self.err(
                    (*where, "acr", lname), f"unknown assurance level {lname!r} (known: {', '.join(levels)})"
                )
                continue
            for v in entry["accept"]:
                if v in seen_acr:
                    self.err(
                        (*where, "acr", lname, "accept"), f"acr {v!r} already proves level {seen_acr[v]!r}"
                    )
                seen_acr[v] = lname
            table[lname] = (list(entry["accept"]), list(entry.get("request", [])))
        claims = ClaimNames(**raw.get("claims", {}))
        return IssuerConfig(
            id=raw["id"],
            issuer=raw["issuer"],
            audiences=frozenset(raw.get("audiences", ())),
            algorithms=algorithms,
            keys=keys,
            jwt_authn_payload=raw.get("jwt_authn_payload"),
            claims=claims,
            acr=build_issuer_acr(levels, table),
        )

    def _condition(self, where: PathT, raw: dict[str, Any]) -> Any:
        if "source_not_in" in raw:
            nets = []
            for j, cidr in enumerate(raw["source_not_in"]):
                try:
                    nets.append(ipaddress.ip_network(cidr, strict=True))
                except ValueError as e:
                    self.err((*where, "source_not_in", j), f"not a network: {e}")
            return SourceNotIn(tuple(nets))
        if "device_unknown" in raw:
            dv = raw["device_unknown"]
            return DeviceUnknown(dv["header"], frozenset(dv.get("known", ())))
        oh = raw["outside_hours"]
        try:
            zone = ZoneInfo(oh["timezone"])
        except (ZoneInfoNotFoundError, ValueError):
            self.err((*where, "outside_hours", "timezone"), f"unknown time zone {oh['timezone']!r}")
            return None
        h1, m1 = map(int, oh["from"].split(":"))
        h2, m2 = map(int, oh["to"].split(":"))
        days = frozenset(
            day_index(x) for x in oh.get("days", ["mon", "tue", "wed", "thu", "fri", "sat", "sun"])
        )
        return OutsideHours(zone, days, h1 * 60 + m1, h2 * 60 + m2)

    def _permission(self, i: int, r: dict[str, Any], issuer_ids: set[str]) -> PermissionRule:
        a = r["allow"]
        where: PathT = ("permissions", i, "allow")
        if a.get("anyone") and len(a) > 1:
            self.err(where, "'anyone' cannot be combined with other selectors")
        for j, iss in enumerate(a.get("issuers", ())):
            if iss not in issuer_ids:
                self.err((*where, "issuers", j), f"unknown issuer id {iss!r}")
        if len(issuer_ids) > 1 and "issuers" not in a:
            named = [k for k in ("users", "roles", "groups", "scopes") if k in a]
            if named:
                # Issuers do not share a namespace: a partner IdP's `admin` role (or its user
                # `alice`) is not ours.
                self.err(
                    where,
                    f"with more than one issuer, {' and '.join(named)} must say whose: add"
                    f" `issuers: [...]` (one of {', '.join(sorted(issuer_ids))})",
                )
        exact, prefix = set(), []
        for j, p in enumerate(a.get("principals", ())):
            if p.endswith("*"):
                if "*" in p[:-1]:
                    self.err((*where, "principals", j), "'*' is only allowed at the end of a principal")
                elif not p[:-1].endswith("/"):
                    self.warnings.append(
                        f"permissions[{i}] ({r['id']}): principal prefix {p!r} does not end at a '/':"
                        f" it also matches {p[:-1] + '-other/…'!r}"
                    )
                prefix.append(p[:-1])
            elif "*" in p:
                self.err((*where, "principals", j), "'*' is only allowed at the end of a principal")
            else:
                exact.add(p)
        user_kinds = {"authenticated", "issuers", "users", "roles", "groups", "scopes"}
        return PermissionRule(
            id=r["id"],
            anyone=bool(a.get("anyone")),
            issuers=frozenset(a.get("issuers", ())),
            users=frozenset(a.get("users", ())),
            roles=frozenset(a.get("roles", ())),
            groups=frozenset(a.get("groups", ())),
            scopes=frozenset(a.get("scopes", ())),
            principals_exact=frozenset(exact),
            principals_prefix=tuple(prefix),
            workload_only=bool(a.get("principals")) and not (user_kinds & a.keys()),
        )

    def _check_satisfiable(
        self,
        levels: tuple[str, ...],
        specs: dict[str, LevelSpec],
        risks: list[RiskRule],
        issuers: list[IssuerConfig],
    ) -> None:
        """Every level a sensitivity level or a risk rule can require must be askable of every issuer."""
        top = len(levels) - 1
        needed: dict[int, str] = {}
        for spec in specs.values():
            if spec.public:
                continue
            base = spec.min_level if spec.min_level is not None else -1
            if spec.min_level is not None:
                needed.setdefault(spec.min_level, f"sensitivity level {spec.name!r}")
            for r in risks:
                if r.raise_by:
                    lvl = min(base + r.raise_by, top)
                    needed.setdefault(lvl, f"sensitivity level {spec.name!r} raised by risk rule {r.id!r}")
        for i, cfg in enumerate(issuers):
            for lvl, why in sorted(needed.items()):
                if lvl >= 0 and not cfg.acr.request[lvl]:
                    self.err(
                        ("issuers", i, "acr"),
                        f"{why} can require {levels[lvl]!r}, but issuer {cfg.id!r} has no acr value for it"
                        " or any stronger level: the step-up challenge could not be satisfied",
                    )
