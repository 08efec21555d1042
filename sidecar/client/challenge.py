"""`WWW-Authenticate` text -> `Challenge`s (RFC 9110 §11, RFC 6750 §3, RFC 9470 §3). No I/O.

The grammar (RFC 9110 §11.2, §5.6)::

    WWW-Authenticate = #challenge
    challenge        = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
    auth-param       = token BWS "=" BWS ( token / quoted-string )

Defined behaviour where the RFCs leave room:

- Scheme and parameter names compare case-insensitively: `params` keys are lower case, `scheme`
  keeps the server's spelling (compare it with `.lower()`).
- Empty list elements (`, ,`) are ignored, as RFC 9110 §5.6.1 asks of recipients.
- A parameter named twice in one challenge (in any case) makes the header value malformed: the
  RFC forbids it, and an answer that says both `error="invalid_token"` and
  `error="insufficient_user_authentication"` must not be read either way.
- `Bearer abc=` is a token68 challenge (`abc=`), not a parameter with an empty value: a bare
  value must be a non-empty token.
- `max_age` that is not a non-negative decimal integer (ASCII digits, at most 18 of them) is
  treated as absent; its text stays in `params`.
- Non-ASCII characters are accepted inside quoted strings (as obs-text); control characters other
  than HTAB are not.
- Malformed input raises `ChallengeParseError` (a `ValueError`) and nothing else.
  `bearer_step_up` never raises: it skips a header value that does not parse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

STEP_UP_ERROR = "insufficient_user_authentication"  # RFC 9470 §3

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_QUOTED = re.compile(r'"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\t \x21-\x7e\x80-\U0010ffff])*)"')
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_MAX_AGE = re.compile(r"[0-9]{1,18}")


class ChallengeParseError(ValueError):
    """A `WWW-Authenticate` value that does not follow RFC 9110 §11; `position` is where in
    `value` the parser gave up."""

    def __init__(self, message: str, value: str, position: int) -> None:
        super().__init__(f"{message} at position {position} of {value!r}")
        self.value = value
        self.position = position


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge: its scheme, its auth-params as received (`params`, names in lower case) or
    `token68`, and the RFC 6750 / RFC 9470 parameters as typed fields (empty or None when absent).

    `acr_values`, `scope` and `required_amr` are the space-separated lists split. `required_amr`
    (authentication methods, RFC 8176) is in no RFC: the sidecar's `google.rpc.ErrorInfo` may
    carry it, and the gRPC interceptors fill it (and any other hint the header lacks) from there."""

    scheme: str
    error: str | None = None
    error_description: str | None = None
    acr_values: tuple[str, ...] = ()
    max_age: int | None = None
    scope: tuple[str, ...] = ()
    realm: str | None = None
    required_amr: tuple[str, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict, hash=False)
    token68: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __reduce__(self) -> tuple[Any, ...]:  # a mappingproxy does not pickle; its dict does
        values = (getattr(self, f.name) for f in fields(self))
        return (type(self), tuple(dict(v) if isinstance(v, Mapping) else v for v in values))

    @classmethod
    def from_params(cls, scheme: str, params: Mapping[str, str], token68: str | None = None) -> Challenge:
        """A challenge whose typed fields are read from `params` (names matched case-insensitively)."""
        p = {k.lower(): v for k, v in params.items()}
        return cls(
            scheme=scheme,
            error=p.get("error"),
            error_description=p.get("error_description"),
            acr_values=tuple(p.get("acr_values", "").split()),
            max_age=_max_age(p.get("max_age")),
            scope=tuple(p.get("scope", "").split()),
            realm=p.get("realm"),
            required_amr=tuple(p.get("required_amr", "").split()),
            params=p,
            token68=token68,
        )

    @property
    def is_step_up(self) -> bool:
        """A Bearer challenge with error="insufficient_user_authentication" (RFC 9470)."""
        return self.scheme.lower() == "bearer" and self.error == STEP_UP_ERROR


def _max_age(text: str | None) -> int | None:
    return int(text) if text is not None and _MAX_AGE.fullmatch(text) else None


def parse_www_authenticate(values: str | Iterable[str]) -> list[Challenge]:
    """Every challenge in one `WWW-Authenticate` value or in several (one per header field), in
    order. Raises `ChallengeParseError` if any value is malformed."""
    out: list[Challenge] = []
    for value in (values,) if isinstance(values, str) else values:
        out.extend(_Parser(value).challenges())
    return out


def bearer_step_up(values: str | Iterable[str]) -> Challenge | None:
    """The first Bearer challenge with error="insufficient_user_authentication", or None.

    Lenient where `parse_www_authenticate` is strict: a header value that does not parse is
    skipped (the others still count), and non-str values are ignored; it never raises."""
    for value in (values,) if isinstance(values, str) else values:
        if not isinstance(value, str):
            continue
        try:
            challenges = _Parser(value).challenges()
        except ChallengeParseError:
            continue
        for c in challenges:
            if c.is_step_up:
                return c
    return None


def _skip_ows(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t":
        i += 1
    return i


class _Parser:
    """A cursor over one header value; each method consumes what it parsed."""

    def __init__(self, value: str) -> None:
        self.s = value
        self.pos = 0

    def error(self, message: str) -> ChallengeParseError:
        return ChallengeParseError(message, self.s, self.pos)

    def ows(self) -> None:
        self.pos = _skip_ows(self.s, self.pos)

    def at_end(self) -> bool:
        return self.pos == len(self.s)

    def separators(self) -> None:
        """Skip OWS and the commas of empty list elements."""
        self.ows()
        while not self.at_end() and self.s[self.pos] == ",":
            self.pos += 1
            self.ows()

    def match(self, pattern: re.Pattern[str]) -> str | None:
        m = pattern.match(self.s, self.pos)
        if m is None:
            return None
        self.pos = m.end()
        return m.group()

    def at_param(self) -> bool:
        """Whether an auth-param (token BWS "=") starts here, rather than the next challenge."""
        m = _TOKEN.match(self.s, self.pos)
        if m is None:
            return False
        after = _skip_ows(self.s, m.end())
        return after < len(self.s) and self.s[after] == "="

    def element_ends(self, at: int) -> bool:
        """Whether only OWS lies between `at` and the end of the value or the next comma."""
        after = _skip_ows(self.s, at)
        return after == len(self.s) or self.s[after] == ","

    def challenges(self) -> list[Challenge]:
        out: list[Challenge] = []
        self.separators()
        while not self.at_end():
            out.append(self.challenge())
            self.separators()
        return out

    def challenge(self) -> Challenge:
        scheme = self.match(_TOKEN)
        if scheme is None:
            raise self.error("expected an auth-scheme")
        start = self.pos
        self.ows()
        if self.at_end() or self.s[self.pos] == ",":
            self.separators()
            if not self.at_end() and self.at_param():  # "Bearer , realm=x": empty first element
                return Challenge.from_params(scheme, self.params())
            return Challenge.from_params(scheme, {})
        if self.pos == start:
            raise self.error("expected a space after the auth-scheme")
        t68 = _TOKEN68.match(self.s, self.pos)
        if t68 is not None and self.element_ends(t68.end()):
            self.pos = t68.end()
            self.separators()
            if not self.at_end() and self.at_param():
                raise self.error("a token68 challenge has no parameters")
            return Challenge.from_params(scheme, {}, token68=t68.group())
        return Challenge.from_params(scheme, self.params())

    def params(self) -> dict[str, str]:
        """auth-params up to the end of the value or the start of the next challenge."""
        params: dict[str, str] = {}
        while True:
            at = self.pos
            name = self.match(_TOKEN)
            if name is None:
                raise self.error("expected a parameter name")
            self.ows()
            if self.at_end() or self.s[self.pos] != "=":
                raise self.error("expected '='")
            self.pos += 1
            self.ows()
            key = name.lower()
            if key in params:
                self.pos = at
                raise self.error(f"parameter {key!r} repeated")
            params[key] = self.value()
            self.ows()
            if self.at_end():
                return params
            if self.s[self.pos] != ",":
                raise self.error("expected ',' after a parameter")
            self.separators()
            if self.at_end() or not self.at_param():
                return params

    def value(self) -> str:
        if not self.at_end() and self.s[self.pos] == '"':
            m = _QUOTED.match(self.s, self.pos)
            if m is None:
                raise self.error("unterminated or invalid quoted-string")
            self.pos = m.end()
            return _QUOTED_PAIR.sub(lambda pair: pair.group(1), m.group(1))
        token = self.match(_TOKEN)
        if token is None:
            raise self.error("expected a token or a quoted-string")
        return token
