"""JWKS hardening against real loopback servers: a fetch follows no redirect, ends within a total
deadline and refuses a body over the size limit; keys too weak for their issuer, or unusable by it,
are a load error in a jwks_file and are dropped (the good ones kept) from a jwks_uri."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from joserfc.jwk import ECKey, OKPKey, RSAKey

from sidecar.attributes import from_check_request
from sidecar.compiler import PolicyError, load_policy_text
from sidecar.engine import Engine
from sidecar.keys import MAX_JWKS_BYTES, RemoteKeys, urllib_fetch
from tests.helpers import EXAMPLE_POLICY, NOW, PRIVATE_JWK, check_request, example_policy_text, make_token

BALANCE = "/bank.v1.Accounts/GetBalance"
DEV_PUBLIC = {k: v for k, v in PRIVATE_JWK.items() if k in ("kty", "n", "e", "kid", "alg", "use")}
DEV_JWKS_LINE = f"jwks_file: {EXAMPLE_POLICY.parent}/keys/dev-jwks.json"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# A 1024-bit RSA key, built with cryptography: joserfc warns on importing one (an error here).
WEAK_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)
_weak_numbers = WEAK_RSA.public_key().public_numbers()
WEAK_PUBLIC = {
    "kty": "RSA",
    "kid": "weak",
    "n": _b64(_weak_numbers.n.to_bytes(128, "big")),
    "e": _b64(_weak_numbers.e.to_bytes(3, "big")),
}
P256 = ECKey.generate_key("P-256", parameters={"kid": "ec"})
P384 = ECKey.generate_key("P-384", parameters={"kid": "p384"})
RSA2048 = RSAKey.generate_key(2048, parameters={"kid": "rsa"})


def _public(key: Any, **members: str) -> dict[str, Any]:
    return {**key.as_dict(private=False), **members}


def _weak_token() -> str:
    """An RS256 token from the example issuer signed with the 1024-bit key."""
    header = {"alg": "RS256", "kid": "weak", "typ": "JWT"}
    payload = {"iss": "https://idp.example.test", "aud": "bank-api", "sub": "mallory", "exp": NOW + 600}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    sig = WEAK_RSA.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(sig)}"


def _decide(engine: Engine, token: str) -> str:
    return engine.decide(from_check_request(check_request(BALANCE, token=token)), NOW).reason


# --- a loopback HTTP server --------------------------------------------------------------------
Route = tuple[int, dict[str, str], bytes | list[bytes]]
"""status, headers, body (a list: sent chunked)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        status, headers, body = self.server.routes.get(self.path, (404, {}, b"not found"))
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Connection", "close")
            if isinstance(body, list):
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in body:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.end_headers()
                self.wfile.write(body)
        except OSError:
            pass  # the client gave up, as it should for an oversize answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.routes = {}
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _url(srv: _Server, path: str) -> str:
    scheme = "https" if isinstance(srv.socket, ssl.SSLSocket) else "http"
    return f"{scheme}://127.0.0.1:{srv.server_address[1]}{path}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for a self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    client_ctx = ssl.create_default_context(cafile=str(d / "cert.pem"))
    return server_ctx, client_ctx


@pytest.fixture
def https_server(server: _Server, tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> _Server:
    server.socket = tls[0].wrap_socket(server.socket, server_side=True)
    return server


def test_an_https_jwks_is_fetched_only_from_a_server_with_a_trusted_certificate(
    https_server: _Server, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    _serve_jwks(https_server, "/jwks", DEV_PUBLIC)
    url = _url(https_server, "/jwks")
    assert json.loads(urllib_fetch(url, 2.0, ssl_context=tls[1])) == {"keys": [DEV_PUBLIC]}
    with pytest.raises(ssl.SSLCertVerificationError):
        urllib_fetch(url, 2.0)  # the system's trust store does not know the test certificate


def _jwks(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def _serve_jwks(srv: _Server, path: str, *keys: dict[str, Any]) -> None:
    body = _jwks(*keys)
    srv.routes[path] = (200, {"Content-Type": "application/json", "Content-Length": str(len(body))}, body)


# --- redirects ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "location"),
    [
        (302, "http://localhost:{port}/jwks"),  # another host (the same server, by another name)
        (301, "http://127.0.0.1:{port}/jwks"),  # http
        (307, "https://127.0.0.1:{port}/jwks"),  # https on the same host: not followed either
        (308, "//idp.evil.test/jwks"),
        (302, "file:///etc/passwd"),
    ],
    ids=["another-host", "http", "https-same-host", "scheme-relative", "file"],
)
def test_a_redirect_is_a_fetch_failure_naming_where_it_points(
    server: _Server, status: int, location: str
) -> None:
    """A JWKS URL is configured, not discovered: no redirect is followed, whatever its target."""
    target = location.format(port=server.server_address[1])
    _serve_jwks(server, "/jwks", DEV_PUBLIC)
    server.routes["/moved"] = (status, {"Location": target, "Content-Length": "0"}, b"")
    with pytest.raises(ValueError, match="redirects are not followed") as e:
        urllib_fetch(_url(server, "/moved"), 2.0)
    assert f"answered {status} redirecting to {target!r}" in str(e.value)


def test_a_redirecting_jwks_uri_loads_with_a_warning_and_verifies_nothing(server: _Server) -> None:
    _serve_jwks(server, "/jwks", DEV_PUBLIC)
    server.routes["/moved"] = (302, {"Location": _url(server, "/jwks"), "Content-Length": "0"}, b"")
    policy = load_policy_text(example_policy_text((DEV_JWKS_LINE, f"jwks_uri: {_url(server, '/moved')}")))
    assert any("could not be fetched" in w and "redirects are not followed" in w for w in policy.warnings)
    assert _decide(Engine(policy), make_token()) == "unknown_key"


# --- a total deadline --------------------------------------------------------------------------
class _DripServer:
    """Accepts connections, reads the request, sends `prefix`, then one byte of `drip` every
    `interval` seconds (for at most len(drip) * interval seconds)."""

    def __init__(
        self, prefix: bytes, drip: bytes, interval: float = 0.1, tls: ssl.SSLContext | None = None
    ) -> None:
        self.prefix, self.drip, self.interval, self.tls = prefix, drip, interval, tls
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}/jwks"

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                if self.tls:
                    conn.settimeout(2)
                    conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                continue
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(self.prefix)
                    for b in self.drip:
                        if self.stop.wait(self.interval):
                            break
                        conn.sendall(bytes([b]))
                except OSError:
                    pass  # the client hung up: what the deadline is for

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize(
    ("prefix", "drip"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n", b"X-Pad: " + b"a" * 40, id="drips-headers"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n", b" " * 40, id="drips-body"),
    ],
)
def test_a_dripping_server_is_cut_off_at_the_total_deadline(
    prefix: bytes, drip: bytes, scheme: str, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """A byte every 0.1 s never trips a per-read timeout; the 0.5 s budget covers the whole fetch."""
    drip_server = _DripServer(prefix, drip, tls=tls[0] if scheme == "https" else None)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no complete answer within 0\.5 s"):
            urllib_fetch(drip_server.url, 0.5, ssl_context=tls[1])
        elapsed = time.monotonic() - t0
    finally:
        drip_server.close()
    assert 0.45 <= elapsed < 1.5


# --- the size limit ----------------------------------------------------------------------------
def _padded_jwks() -> bytes:
    """A valid JWKS padded with whitespace past the limit: cut at the limit it would still parse."""
    doc = _jwks(DEV_PUBLIC)
    return doc + b" " * (MAX_JWKS_BYTES + 1 - len(doc))


@pytest.mark.parametrize("framing", ["content-length", "until-close", "chunked"])
def test_an_answer_over_the_size_limit_is_refused_not_truncated(server: _Server, framing: str) -> None:
    body = _padded_jwks()
    if framing == "content-length":
        server.routes["/jwks"] = (200, {"Content-Length": str(len(body))}, body)
    elif framing == "until-close":
        server.routes["/jwks"] = (200, {}, body)
    else:
        server.routes["/jwks"] = (200, {}, [body[i : i + 100_000] for i in range(0, len(body), 100_000)])
    with pytest.raises(ValueError, match=f"larger than the {MAX_JWKS_BYTES}-byte limit"):
        urllib_fetch(_url(server, "/jwks"), 2.0)


# --- key strength, jwks_file -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "algorithms", "problem"),
    [
        (WEAK_PUBLIC, "RS256", "keys[0] (kid 'weak'): RSA key of 1024 bits; at least 2048 are required"),
        (
            _public(P256, kid="p256"),
            "ES384",
            "keys[0] (kid 'p256'): an EC key on curve P-256 needs ES256, which the issuer does not allow"
            " (algorithms: ES384)",
        ),
        (
            _public(RSA2048),
            "ES256",
            "keys[0] (kid 'rsa'): an RSA key needs an RS* or PS* algorithm, which the issuer does not"
            " allow (algorithms: ES256)",
        ),
        (
            {k: v for k, v in _public(P256).items() if k != "kid"},
            "RS256",
            "keys[0] (no kid): an EC key on curve P-256 needs ES256, which the issuer does not allow"
            " (algorithms: RS256)",
        ),
        (
            _public(OKPKey.generate_key("Ed25519"), kid="ed"),
            "RS256, ES256",
            "keys[0] (kid 'ed'): an OKP key on curve Ed25519 needs EdDSA, which the issuer does not allow"
            " (algorithms: ES256, RS256)",
        ),
        (
            _public(OKPKey.generate_key("X25519"), kid="x"),
            "EdDSA",
            "keys[0] (kid 'x'): an OKP key on curve X25519 cannot verify any supported signature algorithm",
        ),
        (
            _public(RSA2048, alg="RS512"),
            "RS256",
            "keys[0] (kid 'rsa'): its alg 'RS512' is not among the issuer's algorithms (RS256)",
        ),
        (
            _public(P256, alg="ES384"),
            "ES256, ES384",
            "keys[0] (kid 'ec'): its alg 'ES384' does not fit an EC key on curve P-256",
        ),
    ],
    ids=[
        "rsa-1024",
        "p256-for-es384",
        "rsa-for-es256",
        "no-kid",
        "ed25519-without-eddsa",
        "x25519",
        "alg-member-not-allowed",
        "alg-member-misfit",
    ],
)
def test_a_jwks_file_key_the_issuer_cannot_use_is_a_load_error(
    tmp_path: Path, key: dict[str, Any], algorithms: str, problem: str
) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(_jwks(key))
    text = example_policy_text(
        (DEV_JWKS_LINE, f"jwks_file: {path}"), ("algorithms: [RS256]", f"algorithms: [{algorithms}]")
    )
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, file="p.yaml")
    assert [p.where for p in e.value.problems] == ["issuers[0].jwks_file"]
    assert e.value.problems[0].message == f"bad JWKS in {str(path)!r}: {problem}"


def test_every_unusable_key_of_a_jwks_file_is_reported_and_the_good_ones_are_not(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(_jwks(WEAK_PUBLIC, DEV_PUBLIC, _public(P384)))
    text = example_policy_text((DEV_JWKS_LINE, f"jwks_file: {path}"))
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, file="p.yaml")
    messages = [p.message for p in e.value.problems]
    assert len(messages) == 2
    assert "keys[0] (kid 'weak'): RSA key of 1024 bits" in messages[0]
    assert "keys[2] (kid 'p384'): an EC key on curve P-384 needs ES384" in messages[1]


# --- key strength, jwks_uri --------------------------------------------------------------------
def test_unusable_remote_keys_are_dropped_with_a_warning_and_the_good_ones_verify(
    server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    _serve_jwks(server, "/jwks", WEAK_PUBLIC, _public(P384), DEV_PUBLIC, _public(P256))
    text = example_policy_text(
        (DEV_JWKS_LINE, f"jwks_uri: {_url(server, '/jwks')}"),
        ("algorithms: [RS256]", "algorithms: [RS256, ES256]"),
    )
    with caplog.at_level(logging.WARNING, logger="stepup.jwks"):
        policy = load_policy_text(text)
    assert not any("could not be fetched" in w for w in policy.warnings)
    dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("jwks key dropped")]
    assert len(dropped) == 2
    assert "keys[0] (kid 'weak'): RSA key of 1024 bits; at least 2048 are required" in dropped[0]
    assert "keys[1] (kid 'p384'): an EC key on curve P-384 needs ES384" in dropped[1]
    engine = Engine(policy)
    assert _decide(engine, make_token()) == "allowed"
    assert _decide(engine, make_token(header={"alg": "ES256", "kid": "ec"}, key=P256)) == "allowed"
    assert _decide(engine, _weak_token()) == "unknown_key"


def test_a_fetched_set_with_no_usable_key_is_a_failed_fetch_and_the_last_good_keys_serve(
    server: _Server,
) -> None:
    _serve_jwks(server, "/jwks", DEV_PUBLIC)
    remote = RemoteKeys(_url(server, "/jwks"), algorithms=("RS256",))
    assert remote.refresh() is True
    good = remote.keyset()
    _serve_jwks(server, "/jwks", WEAK_PUBLIC, _public(P256))
    remote._last_attempt = float("-inf")
    assert remote.refresh() is False
    assert remote.fetch_failures == 1 and "none of its 2 signing key(s) is usable" in remote.last_error
    assert remote.keyset() is good
