"""Memory under attacker input (hardening issue, class 5): the sidecar's RSS growth after

- 3,000 Checks with distinct 100 KB methods,
- 3,000 Checks with distinct 8 KB paths,
- 100,000 Checks with distinct valid tokens (ES256, from an extra issuer of a temporary policy),

each measured from a warmed-up sidecar (`stepup-sidecar serve` in a subprocess). Target for the
first two: under 16 MiB. Prints MiB per phase.

    python bench/hostile_memory.py [--tokens 100000] [--root DIR]   # DIR: another checkout to measure
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from joserfc import jwt  # noqa: E402
from joserfc.jwk import ECKey  # noqa: E402

from examples.stack import free_port, wait_serving  # noqa: E402
from tests.helpers import check_request, example_policy_text  # noqa: E402

CHECK = "/envoy.service.auth.v3.Authorization/Check"
ISSUER = "https://bench.example.test"


def letters(i: int) -> str:
    """A distinct all-letter prefix (a method that is a plain word: the costly kind)."""
    out = ""
    for _ in range(4):
        i, r = divmod(i, 26)
        out += chr(ord("A") + r)
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def policy_with_ec_issuer(tmp: Path, key: ECKey) -> Path:
    (tmp / "ec-jwks.json").write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    text = example_policy_text(
        (
            "issuers:\n",
            "issuers:\n"
            f"  - id: bench\n    issuer: {ISSUER}\n    audiences: [bank-api]\n"
            f"    jwks_file: {tmp / 'ec-jwks.json'}\n    algorithms: [ES256]\n"
            "    acr:\n      aal1: {accept: [\"urn:okta:loa:1fa:any\"]}\n"
            "      aal2: {accept: [\"urn:okta:loa:2fa:any\"]}\n"
            "      aal2_phr: {accept: [phr]}\n      aal3: {accept: [phrh]}\n",
        ),
        # With two issuers, roles and scopes must say whose (policy validation).
        ("allow: {roles: [teller, customer]}", "allow: {issuers: [bench, dev], roles: [teller, customer]}"),
        ("allow: {roles: [teller], scopes: [payments]}", "allow: {issuers: [bench, dev], roles: [teller], scopes: [payments]}"),
        ("allow: {roles: [admin]}", "allow: {issuers: [bench, dev], roles: [admin]}"),
    )
    p = tmp / "policy.yaml"
    p.write_text(text)
    return p


async def send(address: str, bodies: list[bytes], concurrency: int = 16) -> int:
    answered = 0
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 21)]) as ch:
        call = ch.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
        queue = iter(bodies)

        async def worker() -> None:
            nonlocal answered
            for body in queue:
                await call(body, timeout=30)
                answered += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered


def phase(name: str, pid: int, address: str, make: object, n: int, chunk: int = 2000) -> float:
    before = rss_mib(pid)
    done = 0
    while done < n:
        k = min(chunk, n - done)
        bodies = [make(done + i) for i in range(k)]  # type: ignore[operator]
        done += asyncio.run(send(address, bodies))
    time.sleep(0.5)
    after = rss_mib(pid)
    print(f"{name:<44} {n:>7} Checks  RSS {before:7.1f} -> {after:7.1f} MiB  growth {after - before:+7.1f} MiB")
    return after - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose sidecar to run")
    args = ap.parse_args()
    key = ECKey.generate_key("P-256", parameters={"kid": "bench-1"})
    with tempfile.TemporaryDirectory() as tmp:
        policy = policy_with_ec_issuer(Path(tmp), key)
        address = f"127.0.0.1:{free_port()}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--policy", str(policy), "--listen", address,
             "--decision-log", "off", "--watch-interval", "0", "--log-level", "error"],
            cwd=args.root,
            env={**os.environ, "PYTHONPATH": str(args.root)},
        )
        try:
            wait_serving(address, timeout=60)
            now = int(time.time())

            def token(i: int) -> str:
                claims = {"iss": ISSUER, "aud": "bank-api", "sub": f"user-{i}", "iat": now, "exp": now + 3600,
                          "auth_time": now, "roles": ["teller"], "acr": "urn:okta:loa:1fa:any"}
                return jwt.encode({"alg": "ES256", "kid": "bench-1"}, claims, key)

            warm = [check_request("/bank.v1.Accounts/GetBalance", token=token(-i)).SerializeToString() for i in range(1, 2001)]
            asyncio.run(send(address, warm))
            print(f"sidecar from {args.root}; warmed up with 2,000 Checks")
            phase("distinct 100 KB methods", proc.pid, address,
                  lambda i: check_request("/healthz", method=letters(i) + "X" * 100_000, grpc=False).SerializeToString(), 3000, 500)
            phase("distinct 8 KB paths", proc.pid, address,
                  lambda i: check_request(f"/v1/accounts/{i:06d}" + "a" * 8150, method="GET", grpc=False).SerializeToString(), 3000)
            phase("distinct valid tokens", proc.pid, address,
                  lambda i: check_request("/bank.v1.Accounts/GetBalance", token=token(i)).SerializeToString(), args.tokens)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
