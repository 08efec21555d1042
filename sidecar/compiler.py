"""A validated policy document -> a compiled, immutable Policy (tables, levels, issuers bound to
their keys), collecting every problem with its place. Nothing here runs per request.

Key sources come from the process-wide `keys.KeyStore`: compiling reads JWKS files through it and
asks it for URL providers, but fetches nothing; `KeyStore.prime` does, before a policy serves.
`load_policy` is the one-call form (parse, compile, prime) for start-up, tools and tests.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sidecar.assurance import AMR_WORDS, build_issuer_acr
from sidecar.identity import ClaimNames, IdentityMapper, IssuerConfig
from sidecar.keys import Fetcher, KeyFileError, KeyProvider, KeyStore, urllib_fetch
from sidecar.policy import (
    ANY_METHOD,
    LevelSpec,
    PermissionRule,
    Policy,
    SensitivityRule,
    Shadow,
    Tables,
    UpstreamHeaders,
    VariantTables,
    build_index,
    parse_pattern,
)
from sidecar.policyfile import (
    Document,
    PathT,
    PolicyError,
    Problem,
    content_digest,
    parse_duration,
    parse_text,
)
from sidecar.risk import DeviceUnknown, OutsideHours, RiskRule, SourceNotIn, day_index

__all__ = [
    "PolicyError",
    "Problem",
    "compile_document",
    "load_policy",
    "load_policy_data",
    "load_policy_text",
    "prime",
]

DEV_ISSUER = "https://idp.example.test"
_EMPTY: frozenset[str] = frozenset()
_USER_KINDS = frozenset({"authenticated", "issuers", "users", "roles", "groups", "scopes"})


def _set(allow: dict[str, Any], kind: str) -> frozenset[str]:
    v = allow.get(kind)
    return frozenset(v) if v else _EMPTY


def _fold_pattern(text: str) -> str:
    """A pattern's path in lower case (its method keeps its case: methods are case-sensitive)."""
    method, sep, path = text.rpartition(" ")
    return f"{method}{sep}{path.lower()}"


def load_policy(
    path: str | Path,
    *,
    fetch: Fetcher = urllib_fetch,
    allow_insecure_jwks_http: bool = False,
    keys: KeyStore | None = None,
) -> Policy:
    """Read, validate, compile and prime a policy file. Raises PolicyError listing every problem."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or a NUL in the path
        raise PolicyError([Problem(file, 1, 1, "", f"cannot read the file: {e}")]) from None
    return load_policy_text(
        text, file=file, base_dir=path.parent, fetch=fetch, allow_insecure_jwks_http=allow_insecure_jwks_http,
        keys=keys,
    )


def load_policy_text(
    text: str,
    *,
    file: str = "<policy>",
    base_dir: Path | None = None,
    fetch: Fetcher = urllib_fetch,
    allow_insecure_jwks_http: bool = False,
    keys: KeyStore | None = None,
) -> Policy:
    keys = keys or KeyStore(fetch)
    doc = parse_text(text, file)
    policy = compile_document(
        doc, base_dir=base_dir or Path.cwd(), digest=content_digest(text), keys=keys,
        allow_insecure_jwks_http=allow_insecure_jwks_http,
    )
    return prime(policy, keys)


def load_policy_data(
    data: dict[str, Any],
    *,
    file: str,
    base_dir: Path,
    digest: str,
    keys: KeyStore,
    allow_insecure_jwks_http: bool = False,
) -> Policy:
    """Compile a document that already passed validation elsewhere (the isolated reload parses and
    validates in a child process and hands over the data). The schema is not checked again; the
    compiler's own checks are (their problems are located by path). Not primed."""
    return compile_document(
        Document(file, None, data), base_dir=base_dir, digest=digest, keys=keys,
        allow_insecure_jwks_http=allow_insecure_jwks_http,
    )


def prime(policy: Policy, keys: KeyStore, *, refetch: bool = False) -> Policy:
    """Fetch the policy's remote keys that never loaded (with `refetch`, on a reload: all of them);
    their failures become policy warnings."""
    warnings = keys.prime([(i.id, i.keys) for i in policy.issuers if i.keys is not None], refetch=refetch)
    return replace(policy, warnings=(*policy.warnings, *warnings)) if warnings else policy


def compile_document(
    doc: Document, *, base_dir: Path, digest: str, keys: KeyStore, allow_insecure_jwks_http: bool = False
) -> Policy:
    builder = _Builder(doc, doc.data, base_dir, keys, allow_insecure_jwks_http)
    policy = builder.build(digest)
    if builder.problems:
        raise PolicyError(builder.problems)
    assert policy is not None
    return policy


class _Builder:
    def __init__(
        self,
        doc: Document,
        data: dict[str, Any],
        base_dir: Path,
        keys: KeyStore,
        allow_insecure_http: bool,
    ) -> None:
        self.doc = doc
        self.data = data
        self.base_dir = base_dir
        self.keys = keys
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
        risk_shadow: set[str] = set()
        for i, raw in enumerate(d.get("risk", [])):
            cond = self._condition(("risk", i, "when"), raw["when"])
            if cond is not None:
                max_age = parse_duration(raw["max_age"]) if "max_age" in raw else None
                risks.append(RiskRule(raw["id"], cond, raw.get("raise", 1), max_age))
                if raw.get("mode") == "shadow":
                    risk_shadow.add(raw["id"])
        self._unique_ids("risk", d.get("risk", []))

        # Tables. With case-insensitive paths, patterns are folded here and request paths in the
        # engine; two patterns that differ only in case then tie (a load error). Shadow rules stay
        # out of the enforced tables; with any, a second index of every rule serves their
        # evaluation (a shadow sensitivity rule may share a pattern with an enforced one: in its
        # evaluation it takes that pattern's place, as it would if it replaced the rule).
        case_sensitive = d.get("paths", {}).get("case_sensitive", True)
        fold = (lambda t: t) if case_sensitive else _fold_pattern
        sens_entries: list[tuple[str, SensitivityRule]] = []
        sens_pos: list[tuple[int, int]] = []
        shadow_sens: list[tuple[str, SensitivityRule]] = []
        shadow_sens_pos: list[tuple[int, int]] = []
        for i, r in enumerate(d["sensitivity"]["rules"]):
            if r["level"] not in specs:
                self.err(("sensitivity", "rules", i, "level"), f"unknown sensitivity level {r['level']!r}")
                continue
            srule = SensitivityRule(r["id"], r["level"])
            shadow = r.get("mode") == "shadow"
            for j, pat in enumerate(r["match"]):
                (shadow_sens if shadow else sens_entries).append((fold(pat), srule))
                (shadow_sens_pos if shadow else sens_pos).append((i, j))
        self._unique_ids("sensitivity.rules", d["sensitivity"]["rules"], ("sensitivity", "rules"))

        def sens_error(positions: list[tuple[int, int]]) -> Any:
            return lambda pos, m: self.err(
                ("sensitivity", "rules", positions[pos][0], "match", positions[pos][1]), m
            )

        sens_index = build_index(sens_entries, sens_error(sens_pos), unique=lambda r: r.id)

        perm_entries: list[tuple[str, PermissionRule]] = []
        perm_pos: list[tuple[int, int]] = []
        all_perms: list[tuple[str, PermissionRule]] = []
        perm_shadow: set[str] = set()
        issuer_ids = {c.id for c in issuers}
        for i, r in enumerate(d["permissions"]):
            rule = self._permission(i, r, issuer_ids)
            shadow = r.get("mode") == "shadow"
            if shadow:
                perm_shadow.add(rule.id)
            for j, pat in enumerate(r["match"]):
                all_perms.append((fold(pat), rule))
                if not shadow:
                    perm_entries.append((fold(pat), rule))
                    perm_pos.append((i, j))
        self._unique_ids("permissions", d["permissions"])
        perm_index = build_index(
            perm_entries,
            lambda pos, m: self.err(("permissions", perm_pos[pos][0], "match", perm_pos[pos][1]), m),
        )
        shadow_tables: tuple[Any, ...] | None = None
        if shadow_sens or perm_shadow:
            # Two shadow rules on one pattern tie as enforced ones would; the index of every rule
            # holds the shadow entries first, so each wins its pattern in its own evaluation.
            build_index(shadow_sens, sens_error(shadow_sens_pos), unique=lambda r: r.id)
            noop = lambda pos, m: None  # noqa: E731 (problems were reported by the builds above)
            shadow_tables = (
                build_index([*shadow_sens, *sens_entries], noop),
                build_index(all_perms, noop),
                {r.id for _, r in shadow_sens},
                perm_shadow,
                sens_index.methods | perm_index.methods,
            )

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
        identities = IdentityMapper(
            tuple(issuers),
            n_levels=len(levels),
            amr_derivation=assurance.get("amr_derivation", True),
            skew=skew,
        )
        enforced_risks = tuple(r for r in risks if r.id not in risk_shadow)
        describe = assurance.get("describe", {})
        for lname in describe:
            if lname not in index:
                self.err(
                    ("assurance", "describe", lname),
                    f"unknown assurance level {lname!r} (known: {', '.join(levels)})",
                )
        if self.problems:
            return None
        policy = Policy(
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
            risk_rules=enforced_risks,
            issuers=tuple(issuers),
            identities=identities,
            upstream_headers=headers,
            warnings=tuple(self.warnings),
            files=tuple(self.files),
            describe=tuple(describe.get(n, "") for n in levels),
            describe_amr={**AMR_WORDS, **assurance.get("describe_amr", {})},
            rule_ids={
                table: tuple(r["id"] for r in rules if r.get("mode") != "shadow")
                for table, rules in (
                    ("sensitivity", d["sensitivity"]["rules"]),
                    ("permissions", d["permissions"]),
                    ("risk", d.get("risk", [])),
                )
            },
        )
        return self._with_shadows(policy, d, risks, risk_shadow, shadow_tables)

    @staticmethod
    def _with_shadows(
        policy: Policy,
        d: dict[str, Any],
        risks: list[RiskRule],
        risk_shadow: set[str],
        shadow_tables: tuple[Any, ...] | None,
    ) -> Policy:
        """The policy with one variant per shadow rule, in file order: the policy as if that one
        rule were enforced (the other shadow rules still are not)."""
        shadows: list[Shadow] = []
        for table, rules in (
            ("sensitivity", d["sensitivity"]["rules"]),
            ("permissions", d["permissions"]),
            ("risk", d.get("risk", [])),
        ):
            for r in rules:
                if r.get("mode") != "shadow":
                    continue
                rid = r["id"]
                if table == "risk":
                    variant = replace(
                        policy,
                        risk_rules=tuple(x for x in risks if x.id not in risk_shadow or x.id == rid),
                        shadows=(),
                    )
                else:
                    assert shadow_tables is not None
                    s_all, p_all, s_ids, p_ids, methods = shadow_tables
                    own = frozenset(parse_pattern(t).method for t in r["match"]) - {ANY_METHOD}
                    tables = VariantTables(
                        s_all,
                        p_all,
                        frozenset(s_ids - {rid}) if table == "sensitivity" else frozenset(s_ids),
                        frozenset(p_ids - {rid}) if table == "permissions" else frozenset(p_ids),
                        frozenset(methods | own),
                    )
                    variant = replace(policy, tables=tables, shadows=())
                shadows.append(Shadow(rid, table, variant))
        return replace(policy, shadows=tuple(shadows)) if shadows else policy

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
                keys = self.keys.file(str(p), algorithms)
            except KeyFileError as e:
                for problem in e.problems:
                    self.err((*where, "jwks_file"), problem)
        elif "jwks_uri" in raw:
            url = urlparse(raw["jwks_uri"])
            loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
            if url.scheme != "https" and not (loopback or self.allow_insecure_http):
                self.err(
                    (*where, "jwks_uri"), "a JWKS URL must use https (http is accepted only on loopback)"
                )
            else:
                # Not fetched here: `prime` does, before the policy serves.
                keys = self.keys.remote(
                    raw["jwks_uri"], algorithms, parse_duration(raw.get("jwks_refresh", 600))
                )
        elif "jwt_authn_payload" not in raw:
            self.err(where, "an issuer needs jwks_file, jwks_uri or jwt_authn_payload")
        if keys is not None and not raw.get("audiences"):
            self.err(where, "an issuer whose tokens the sidecar verifies needs 'audiences'")
        if raw["issuer"] == DEV_ISSUER:
            self.warnings.append(
                f"issuer {raw['id']!r} is the development issuer {DEV_ISSUER}: its private key is public"
            )
        table: dict[str, tuple[list[str], list[str]]] = {}
        implies: dict[str, frozenset[str]] = {}
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
            for v, methods in entry.get("implies_amr", {}).items():
                if v not in entry["accept"]:
                    self.err(
                        (*where, "acr", lname, "implies_amr", v),
                        f"acr {v!r} is not one this level accepts ({', '.join(entry['accept'])}):"
                        " only a value that proves the level can guarantee methods",
                    )
                implies[v] = frozenset(methods)
        claims = ClaimNames(**raw.get("claims", {}))
        return IssuerConfig(
            id=raw["id"],
            issuer=raw["issuer"],
            audiences=frozenset(raw.get("audiences", ())),
            algorithms=algorithms,
            keys=keys,
            jwt_authn_payload=raw.get("jwt_authn_payload"),
            claims=claims,
            acr=build_issuer_acr(levels, table, implies),
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
        return PermissionRule(
            r["id"],
            bool(a.get("anyone")),
            _set(a, "issuers"),
            _set(a, "users"),
            _set(a, "roles"),
            _set(a, "groups"),
            _set(a, "scopes"),
            frozenset(exact) if exact else _EMPTY,
            tuple(prefix),
            bool(a.get("principals")) and _USER_KINDS.isdisjoint(a),
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
        self._check_methods_askable(levels, specs, risks, issuers)

    def _check_methods_askable(
        self,
        levels: tuple[str, ...],
        specs: dict[str, LevelSpec],
        risks: list[RiskRule],
        issuers: list[IssuerConfig],
    ) -> None:
        """A required method can only be asked for through an acr value that implies it (RFC 9470
        has no parameter for methods): every level with `required_amr`, at every minimum it can
        have (its own, raised by risk rules, combined with another level by a route's context
        extension), must have such a value among those an issuer can be asked for."""
        top = len(levels) - 1
        bumps = sorted({0, *(r.raise_by for r in risks if r.raise_by)})
        with_amr = [sp for sp in specs.values() if sp.required_amr and not sp.public]
        for spec in with_amr:
            mins: set[int] = set()
            for other in (o for o in specs.values() if not o.public):
                combined = [x for x in (spec.min_level, other.min_level) if x is not None]
                base = max(combined) if combined else None
                for bump in bumps:
                    lvl = min((base if base is not None else -1) + bump, top) if bump else base
                    lvl = 0 if lvl is None or lvl < 0 else lvl
                    mins.add(lvl)
            methods = spec.required_amr
            for i, cfg in enumerate(issuers):
                for lvl in sorted(mins):
                    if cfg.acr.request[lvl] and not cfg.acr.askable(lvl, methods):
                        need = ", ".join(sorted(methods))
                        candidates = cfg.acr.request[lvl]
                        self.err(
                            ("sensitivity", "levels", spec.name, "required_amr"),
                            f"requires {need} at {levels[lvl]!r} or above, but no acr value issuer"
                            f" {cfg.id!r} can be asked for ({', '.join(candidates)}) implies"
                            f" {'them' if len(methods) > 1 else 'it'}: the step-up challenge could not"
                            f" be satisfied. Under issuers[{i}].acr, add e.g. `implies_amr:"
                            f" {{{candidates[-1]}: [{need}]}}` to the level that accepts"
                            f" {candidates[-1]!r} (if a login at that value always uses {need}),"
                            " or drop required_amr",
                        )
                        break
