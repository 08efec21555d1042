"""Paths are matched after one canonical normalisation; unsafe paths are refused."""

from __future__ import annotations

import pytest

from sidecar.paths import PathError, normalize_path


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/bank.v1.Accounts/GetBalance", "/bank.v1.Accounts/GetBalance"),
        ("/a//b", "/a/b"),
        ("//a///b/", "/a/b/"),
        ("/a/./b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2e/b", "/b"),
        ("/%61dmin", "/admin"),
        ("/v1/accounts?id=1", "/v1/accounts"),
        ("/v1/accounts#frag", "/v1/accounts"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a%20b", "/a%20b"),
        ("/a/b/..", "/a/"),
        ("/.", "/"),
    ],
)
def test_canonical_form(raw: str, canonical: str) -> None:
    assert normalize_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "relative",
        "/..",
        "/a/../../b",
        "/%2e%2e/admin",
        "/a%2Fb",
        "/a%2fb",
        "/a%5Cb",
        "/a%5cb",
        "/a\\b",
        "/a%00b",
        "/a\x00b",
        "/a\nb",
        "/a b",
        "/a%",
        "/a%4",
        "/a%zz",
        "/a%ff",
        "/a%c3",
        "/a%252e%252e",
        "/admin;jsessionid=1",
        "/admin%3Bjsessionid=1",
        "/public/..;/admin",
        "/caf\u00e9",
        "/" + "a" * 9000,
    ],
)
def test_unsafe_paths_are_refused(raw: str) -> None:
    with pytest.raises(PathError) as e:
        normalize_path(raw)
    assert e.value.code == "invalid_path"
