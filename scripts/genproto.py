"""Generate sidecar/_proto from proto/ with grpcio-tools, and the Envoy API classes the sidecar
uses (envoy.service.auth.v3 and what it imports) from the descriptors of `xds-protos`.

Envoy's .proto sources are not copied into this repository: the descriptors are taken from the
installed `xds-protos` package (a build and test dependency only) and handed to protoc as a
descriptor set, and protoc generates Python for them under sidecar/_proto/ (imports rewritten to
the package). So the installed sidecar does not depend on xds-protos at run time, whose copy of
`opentelemetry/proto` would otherwise overwrite opentelemetry-proto's and break the OTLP exporter.
Usage: python scripts/genproto.py [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "sidecar" / "_proto"


# Top-level packages of the generated Envoy closure: imported as sidecar._proto.<package>.
VENDORED_PACKAGES = ("envoy", "udpa", "validate", "xds")


def _envoy_files() -> list[str]:
    """The proto files of external_auth.proto's closure that are not google's own."""
    return [
        name
        for name in _closure()
        if name.split("/")[0] in VENDORED_PACKAGES
    ]


def _closure() -> dict[str, descriptor_pb2.FileDescriptorProto]:
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
    return seen


def _descriptor_set() -> bytes:
    return descriptor_pb2.FileDescriptorSet(file=list(_closure().values())).SerializeToString()


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
            *_envoy_files(),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    # protoc writes absolute-style imports ("from stepup.v1 import ..."); make them package-relative.
    packages = ("stepup", "bank", *VENDORED_PACKAGES)
    for py in [*out.rglob("*.py"), *out.rglob("*.pyi")]:
        text = py.read_text()
        for pkg in packages:
            text = re.sub(rf"^from {pkg}(\.| import)", rf"from sidecar._proto.{pkg}\1", text, flags=re.M)
            text = re.sub(rf"^import {pkg}\.", f"import sidecar._proto.{pkg}.", text, flags=re.M)
        py.write_text(text)
    # Only external_auth.proto defines a service the sidecar serves; the other *_pb2_grpc files
    # of the Envoy closure are empty.
    for grpc_py in out.rglob("*_pb2_grpc.py"):
        rel = grpc_py.relative_to(out).parts
        if rel[0] in VENDORED_PACKAGES and grpc_py.name != "external_auth_pb2_grpc.py":
            grpc_py.unlink()
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
