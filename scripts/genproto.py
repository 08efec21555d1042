"""Generate sidecar/_proto from proto/ with grpcio-tools.

Envoy's .proto sources are not copied into this repository: the descriptors that our protos import
are taken from the installed `xds-protos` package and handed to protoc as a descriptor set.
Usage: python scripts/genproto.py [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "sidecar" / "_proto"


def _descriptor_set() -> bytes:
    from envoy.service.auth.v3 import external_auth_pb2

    seen: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def visit(fd) -> None:  # type: ignore[no-untyped-def]
        if fd.name in seen:
            return
        for dep in fd.dependencies:
            visit(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        seen[fd.name] = proto

    visit(external_auth_pb2.DESCRIPTOR)
    return descriptor_pb2.FileDescriptorSet(file=list(seen.values())).SerializeToString()


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        dset = Path(tmp) / "deps.pb"
        dset.write_bytes(_descriptor_set())
        out.mkdir(parents=True, exist_ok=True)
        args = [
            "protoc",
            f"--proto_path={PROTO_DIR}",
            f"--descriptor_set_in={dset}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    # protoc writes absolute-style imports ("from stepup.v1 import ..."); make them package-relative.
    for py in out.rglob("*.py"):
        text = py.read_text()
        text = text.replace("from stepup.v1 import", "from sidecar._proto.stepup.v1 import")
        text = text.replace("from bank.v1 import", "from sidecar._proto.bank.v1 import")
        py.write_text(text)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if sidecar/_proto is stale")
    args = parser.parse_args()
    if not args.check:
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        generate(fresh)
        stale = _diff(fresh, OUT_DIR)
        if stale:
            print("generated code is stale; run `make proto`:", *stale, sep="\n  ", file=sys.stderr)
            return 1
    print("generated code is up to date")
    return 0


def _diff(a: Path, b: Path) -> list[str]:
    names = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    names |= {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    out = []
    for n in sorted(names):
        pa, pb = a / n, b / n
        if not (pa.exists() and pb.exists() and filecmp.cmp(pa, pb, shallow=False)):
            out.append(str(n))
    return out


if __name__ == "__main__":
    sys.exit(main())
