"""Paths are matched in one canonical form; a path that is not canonical is refused, never resolved.

The sidecar cannot change the path the upstream receives, so it decodes only what every framework
decodes before routing (escapes of characters that may stand raw in a segment) and refuses dot
segments and repeated slashes instead of resolving them.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import policy
from sidecar.paths import PathError, normalize_path, valid_method
from sidecar.policy import PatternError, parse_pattern


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/bank.v1.Accounts/GetBalance", "/bank.v1.Accounts/GetBalance"),
        ("/%61dmin", "/admin"),
        ("/v1/accounts?id=1", "/v1/accounts"),
        ("/v1/accounts#frag", "/v1/accounts"),
        ('/v1/accounts?q=[1]|{2}^`"<>\\', "/v1/accounts"),
        ("/v1/accounts?q=\u00e9", "/v1/accounts"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a%20b", "/a%20b"),
        ("/a%5Bb%5d", "/a%5Bb%5D"),
        ("/a%3Fb%23c", "/a%3Fb%23c"),
        # sub-delims, ':' and '@' are decoded: both spellings are one operation
        ("/users/me%3Aexport", "/users/me:export"),
        ("/users/me%3aexport", "/users/me:export"),
        ("/a%40b", "/a@b"),
        ("/%21%24%26%27%28%29%2A%2B%2C%3D", "/!$&'()*+,="),
        ("/.well-known/jwks", "/.well-known/jwks"),
        ("/a/...", "/a/..."),
        ("/a/.b/c.", "/a/.b/c."),
        # a trailing slash stays: the engine decides such a path under both readings
        ("/a/b/", "/a/b/"),
        ("/", "/"),
        ("/?x=1", "/"),
        ("/" + "%C3%A9" * 170, "/" + "%C3%A9" * 170),
    ],
)
def test_canonical_form(raw: str, canonical: str) -> None:
    assert normalize_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "relative",
        "*",
        # not canonical: refused, never resolved or merged
        "/..",
        "/.",
        "/a/./b",
        "/a/b/../c",
        "/a/b/..",
        "/a/b/.",
        "/a/b/./",
        "/a/%2e%2e/b",
        "/a/%2E%2e/b",
        "/a/.%2e/b",
        "/a/%2e./b",
        "/a/%2e/b",
        "/a/%2E",
        "/a//b",
        "//a",
        "//",
        "/a//",
        "/a/b//",
        # unsafe escapes and characters
        "/a%2Fb",
        "/a%2fb",
        "/a%5Cb",
        "/a%5cb",
        "/a\\b",
        "/a%00b",
        "/a\x00b",
        "/a\nb",
        "/a\n",
        "/a b",
        "/a|b",
        "/a[b]",
        "/a%",
        "/a%4",
        "/a%zz",
        "/a%ff",
        "/a%c3",
        "/a%c0%ae",
        "/a%25",
        "/a%252e%252e",
        "/admin;jsessionid=1",
        "/admin%3Bjsessionid=1",
        "/public/..;/admin",
        "/caf\u00e9",
        "/" + "a" * 9000,
        "/" + "%20" * 513,  # more than 512 escapes: bounded work per request
        # the query and fragment are ignored, but not control characters in them
        "/a?b\x00",
        "/a?b\r\nc",
        "/a?b c",
        "/a#b\x7f",
    ],
)
def test_unsafe_or_non_canonical_paths_are_refused(raw: str) -> None:
    with pytest.raises(PathError) as e:
        normalize_path(raw)
    assert e.value.code == "invalid_path"


@pytest.mark.parametrize("method", ["GET", "get", "Get", "M-SEARCH", "PROPFIND", "X_1.2~", "A" * 32])
def test_method_tokens_are_valid_and_kept_as_sent(method: str) -> None:
    assert valid_method(method)


@pytest.mark.parametrize(
    "method", ["", "*", "G T", "GET ", "GE\x00T", "G\u00c9T", "A" * 33, "GET\n", "(GET)"]
)
def test_methods_that_are_not_tokens_are_invalid(method: str) -> None:
    assert not valid_method(method)


def test_the_request_reading_remembers_paths_exactly_as_normalize_path_reads_them() -> None:
    """from_check_request memoises normalize_path (bounded): a repeated raw path, canonical or
    refused, reads as the first time, and long paths are not remembered."""
    from sidecar import attributes
    from tests.helpers import check_request

    raws = [
        "/bank.v1.Accounts/GetBalance",
        "/%61dmin",
        "/a/../b",
        "/a//b",
        "/v1/x?q=\x01",
        "/" + "a" * 300,
        "/a;b",
    ]
    for raw in raws:
        try:
            expected = (normalize_path(raw), "")
        except PathError as e:
            expected = ("", str(e))
        for _ in range(2):
            a = attributes.from_check_request(check_request(raw))
            assert (a.path, a.path_error) == expected, raw
    assert ("/" + "a" * 300) not in attributes._PATHS and "/a/../b" in attributes._PATHS
    attributes._PATHS.clear()
    for i in range(attributes._PATHS_MAX + 10):
        attributes.from_check_request(check_request(f"/p/{i}"))
    assert len(attributes._PATHS) <= attributes._PATHS_MAX


def test_valid_method_answers_the_same_once_remembered_and_after_its_memo_is_emptied() -> None:
    """valid_method remembers its answers for short methods (at most 256, emptied when full)."""
    import re

    from sidecar import paths

    token = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1," + str(paths.MAX_METHOD) + "}")
    cases = ["GET", "get", "*", "", "GE T", "PURGE", "M-SEARCH", "x" * 32, "x" * 33, "G\u00e9T", "GET\n"]
    cases += [f"M{i}" for i in range(300)] + [f"B d{i}" for i in range(300)]  # past the memo's bound
    for _ in range(3):
        for m in cases:
            assert valid_method(m) == (token.fullmatch(m) is not None and m != "*"), m
    assert len(paths._VALID_METHODS) <= 256


pattern_texts = st.one_of(
    st.text(alphabet="/*.a-~_%Z9 ", max_size=14),
    st.lists(
        st.sampled_from(["a", "*", "**", ".", "..", "", "b.c", "-x", "~", "%41", "A9_"]), max_size=5
    ).map(lambda segs: "/" + "/".join(segs)),
    st.builds(
        lambda m, p: f"{m} {p}",
        st.sampled_from(["GET", "get", "*", "", " POST"]),
        st.text("/a*.", max_size=6),
    ),
)


def _pattern_outcome(parse: Any, text: str) -> Any:
    try:
        return parse(text)
    except PatternError as e:
        return ("error", str(e))


@settings(max_examples=3000, deadline=None)
@given(text=pattern_texts)
def test_the_pattern_fast_path_parses_as_the_general_one(text: str) -> None:
    """parse_pattern's shortcut for plain patterns gives what the general parse gives, errors included."""
    assert _pattern_outcome(parse_pattern, text) == _pattern_outcome(policy._parse_pattern, text), text


@pytest.mark.parametrize("text", ["/a/b", "/a/*", "/a/**", "/*", "/**", "/a.b/c-d_e~f"])
def test_plain_patterns_take_the_fast_path(text: str) -> None:
    assert policy._SIMPLE.fullmatch(text)
    assert parse_pattern(text) == policy._parse_pattern(text)


@pytest.mark.parametrize(
    "text", ["", "/", "/a/", "/a//b", "/./a", "/a/..", "/a/*/b", "/a/**/b", "/a*", "GET /a", "/%41"]
)
def test_other_patterns_take_the_general_path(text: str) -> None:
    assert not policy._SIMPLE.fullmatch(text)
