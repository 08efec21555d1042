"""k8s/ renders, validates and holds together, checked offline with the real tools.

kubectl kustomize renders each overlay; kubernetes-validate checks every core object against the
Kubernetes OpenAPI schemas; Envoy validates the config its ConfigMap carries; stepup-sidecar
validates the policy its ConfigMap carries; the Istio resources are checked field by field
against the mesh config, the policy and the pod. Every tool comes from this venv: a missing one
fails the test, it never skips it.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from examples.stack import free_port, health_status

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BIN = Path(sys.prefix) / "bin"
OVERLAYS = ["envoy", "istio"]
# Oldest Kubernetes minor we claim to support and the newest the schemas ship.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version() + ".0"]
ISTIO_KINDS = {
    ("networking.istio.io/v1", "ServiceEntry"),
    ("security.istio.io/v1", "RequestAuthentication"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"),
}
AUTH_SERVICE = "envoy.service.auth.v3.Authorization"
# Fields of Istio's MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider.
ISTIO_GRPC_PROVIDER_FIELDS = {
    "service",
    "port",
    "timeout",
    "failOpen",
    "statusOnError",
    "includeRequestBodyInCheck",
}


def tool(name: str) -> Path:
    path = BIN / name
    assert path.is_file() and os.access(path, os.X_OK), f"{name} missing from {BIN}: pip install -e '.[test]'"
    return path


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    path = K8S / target
    out = subprocess.run([tool("kubectl"), "kustomize", path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def docs(target: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(render(target)))


def one(target: str, kind: str, name_prefix: str = "") -> dict[str, Any]:
    found = [d for d in docs(target) if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"{target}: expected one {kind} {name_prefix!r}, got {len(found)}"
    return found[0]


def pod(target: str) -> dict[str, Any]:
    return one(target, "Deployment", "bank")["spec"]["template"]


def container(target: str, name: str) -> dict[str, Any]:
    found = [c for c in pod(target)["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"{target}: no container {name}"
    return found[0]


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def configmap_files(target: str, name_prefix: str) -> dict[str, str]:
    return one(target, "ConfigMap", name_prefix)["data"]


def sidecar_port(target: str) -> int:
    return int(env(container(target, "stepup-sidecar"))["STEPUP_LISTEN"].rpartition(":")[2])


def policy_doc(target: str) -> dict[str, Any]:
    return yaml.safe_load(configmap_files(target, "stepup-policy")["policy.yaml"])


def mesh_config() -> dict[str, Any]:
    return yaml.safe_load((K8S / "overlays/istio/mesh-config.yaml").read_text())


def istio_provider() -> dict[str, Any]:
    providers = mesh_config()["meshConfig"]["extensionProviders"]
    assert len(providers) == 1
    return providers[0]


# --- rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("target", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_each_kustomization_renders(target: str) -> None:
    """`kubectl kustomize` renders base and both overlays without error."""
    kinds = {d["kind"] for d in render(target)}
    assert {"Deployment", "ConfigMap", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_put_everything_in_the_bank_namespace(overlay: str) -> None:
    """Every namespaced object of an overlay lands in `bank`, and the overlay creates it."""
    target = f"overlays/{overlay}"
    assert one(target, "Namespace")["metadata"]["name"] == "bank"
    for d in docs(target):
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "bank", d["metadata"]["name"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_core_objects_validate_against_kubernetes_schemas(overlay: str, version: str) -> None:
    """Every core object validates (strict: unknown fields are errors); the rest are known Istio kinds."""
    validated = 0
    for d in docs(f"overlays/{overlay}"):
        if (d["apiVersion"], d["kind"]) in ISTIO_KINDS:
            continue
        kubernetes_validate.validate(d, version, strict=True)
        validated += 1
    assert validated >= 5


def test_schema_validation_has_teeth() -> None:
    """A misspelt securityContext field fails the strict validation used above."""
    d = one("overlays/envoy", "Deployment")
    sc = d["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    sc["readOnlyRootFileSystem"] = sc.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(d, K8S_VERSIONS[0], strict=True)


# --- the policy ConfigMap --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_from_configmap_passes_stepup_validate(overlay: str, tmp_path: Path) -> None:
    """The ConfigMap's files, written out as the pod sees them, pass `stepup-sidecar validate`."""
    for name, text in configmap_files(f"overlays/{overlay}", "stepup-policy").items():
        (tmp_path / name).write_text(text)
    out = subprocess.run(
        [tool("stepup-sidecar"), "validate", tmp_path / "policy.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_k8s_policy_is_the_example_policy_with_its_jwks_beside_it() -> None:
    """k8s/base/policy/ is examples/policy.yaml (only jwks_file differs) and the example JWKS."""
    example = yaml.safe_load((ROOT / "examples/policy.yaml").read_text())
    k8s = yaml.safe_load((K8S / "base/policy/policy.yaml").read_text())
    assert example["issuers"][0].pop("jwks_file") == "keys/dev-jwks.json"
    assert k8s["issuers"][0].pop("jwks_file") == "dev-jwks.json"
    assert k8s == example
    assert json.loads((K8S / "base/policy/dev-jwks.json").read_text()) == json.loads(
        (ROOT / "examples/keys/dev-jwks.json").read_text()
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_configmap_is_mounted_whole_and_read_only(overlay: str) -> None:
    """STEPUP_POLICY points into a read-only, whole-directory mount of the policy ConfigMap.

    No subPath: only a directory mount receives ConfigMap updates (the `..data` swap)."""
    target = f"overlays/{overlay}"
    sidecar = container(target, "stepup-sidecar")
    cm_name = one(target, "ConfigMap", "stepup-policy")["metadata"]["name"]
    volume = next(v for v in pod(target)["spec"]["volumes"] if v.get("configMap", {}).get("name") == cm_name)
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == volume["name"])
    assert mount.get("readOnly") is True and "subPath" not in mount
    assert env(sidecar)["STEPUP_POLICY"] == mount["mountPath"] + "/policy.yaml"
    policy = policy_doc(target)
    files = configmap_files(target, "stepup-policy")
    assert all(i["jwks_file"] in files for i in policy["issuers"] if "jwks_file" in i)


# --- the sidecar container -------------------------------------------------------------------


def _hardened(c: dict[str, Any]) -> None:
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] > 0 and sc["runAsGroup"] > 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']}: {kind}"


@pytest.mark.parametrize(
    ("overlay", "name"),
    [
        ("envoy", "stepup-sidecar"),
        ("envoy", "envoy"),
        ("envoy", "bank"),
        ("istio", "stepup-sidecar"),
        ("istio", "bank"),
    ],
)
def test_containers_are_hardened(overlay: str, name: str) -> None:
    """Non-root, read-only root, no privilege escalation, no capabilities, RuntimeDefault seccomp,
    requests and limits."""
    _hardened(container(f"overlays/{overlay}", name))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_hardened(overlay: str) -> None:
    """The pod runs non-root with RuntimeDefault seccomp and no service account token."""
    spec = pod(f"overlays/{overlay}")["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    e = env(container(f"overlays/{overlay}", "stepup-sidecar"))
    # SIGTERM: keep answering for the drain delay, then up to the grace for in-flight calls
    assert spec["terminationGracePeriodSeconds"] > float(e["STEPUP_DRAIN_DELAY"]) + float(
        e["STEPUP_SHUTDOWN_GRACE"]
    )


def test_sidecar_runs_as_the_image_user() -> None:
    """runAsUser is the Dockerfile's numeric USER, so the kubelet can enforce runAsNonRoot."""
    user = next(
        line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("USER ")
    )
    uid, _, gid = user.partition(":")
    sc = container("base", "stepup-sidecar")["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (int(uid), int(gid))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sidecar_listens_on_loopback_and_exports_traces_over_otlp(overlay: str) -> None:
    """Check is reachable only inside the pod; Explain is off; OTLP tracing is set up by OTEL_*."""
    e = env(container(f"overlays/{overlay}", "stepup-sidecar"))
    assert e["STEPUP_LISTEN"].rpartition(":")[0] == "127.0.0.1"
    assert e["STEPUP_EXPLAIN"] == "false"
    assert e["OTEL_TRACES_EXPORTER"] == "otlp"
    assert e["OTEL_EXPORTER_OTLP_PROTOCOL"] in ("grpc", "http/protobuf")
    assert e["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
    assert e["OTEL_SERVICE_NAME"] == "stepup-sidecar"


def _grpc_probe(target: str, probe: str) -> dict[str, Any]:
    p = container(target, "stepup-sidecar")[probe]
    assert set(p) & {"exec", "grpc", "httpGet", "tcpSocket"} == {"grpc"}, probe
    return dict(p["grpc"])


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_sidecar_probes_are_grpc_health_on_the_health_only_port(probe: str) -> None:
    """The kubelet's gRPC probes dial the pod IP: they target STEPUP_HEALTH_LISTEN's port (declared
    as a container port), asking for the Authorization service, while Check stays on loopback."""
    c = container("base", "stepup-sidecar")
    g = _grpc_probe("base", probe)
    health_host, _, health_port = env(c)["STEPUP_HEALTH_LISTEN"].rpartition(":")
    assert health_host == "0.0.0.0" and g["port"] == int(health_port)
    assert g["service"] == AUTH_SERVICE
    assert int(health_port) in {p["containerPort"] for p in c["ports"]}
    assert env(c)["STEPUP_LISTEN"].rpartition(":")[0] == "127.0.0.1"


def test_probe_passes_only_while_the_sidecar_serves(tmp_path: Path) -> None:
    """The readiness probe's request fails with no sidecar and reports SERVING once it serves the
    policy from the ConfigMap, on the health-only address."""
    g = _grpc_probe("base", "readinessProbe")
    for name, text in configmap_files("base", "stepup-policy").items():
        (tmp_path / name).write_text(text)
    health = f"127.0.0.1:{free_port()}"
    assert health_status(health, g["service"], timeout=2) == -1

    server_env = {
        **os.environ,
        "STEPUP_LISTEN": f"127.0.0.1:{free_port()}",
        "STEPUP_HEALTH_LISTEN": health,
        "STEPUP_METRICS_LISTEN": "",
        "STEPUP_DECISION_LOG": "off",
        "STEPUP_WATCH_INTERVAL": "0",
        "OTEL_TRACES_EXPORTER": "none",
    }
    server = subprocess.Popen(
        [tool("stepup-sidecar"), "serve", "--policy", tmp_path / "policy.yaml"],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        status = -1
        while time.monotonic() < deadline and server.poll() is None:
            status = health_status(health, g["service"], timeout=2)
            if status == 1:
                break
            time.sleep(0.2)
        assert status == 1  # SERVING
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
            raise
    assert server.returncode == 0, err


# --- Envoy overlay ---------------------------------------------------------------------------


def _envoy_config() -> dict[str, Any]:
    return yaml.safe_load(configmap_files("overlays/envoy", "envoy-config")["envoy.yaml"])


def _addr(socket_address: dict[str, Any]) -> tuple[str, int]:
    return socket_address["address"], int(socket_address["port_value"])


def _cluster_addr(cfg: dict[str, Any], name: str) -> tuple[str, int]:
    c = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == name)
    return _addr(
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    )


def _listener_addr(cfg: dict[str, Any], name: str) -> tuple[str, int]:
    lst = next(x for x in cfg["static_resources"]["listeners"] if x["name"] == name)
    return _addr(lst["address"]["socket_address"])


def test_envoy_config_from_configmap_passes_envoy_validate(tmp_path: Path) -> None:
    """`envoy --mode validate`, with the container's own flags, accepts the ConfigMap's envoy.yaml."""
    target = "overlays/envoy"
    envoy = container(target, "envoy")
    cm_name = one(target, "ConfigMap", "envoy-config")["metadata"]["name"]
    volume = next(v for v in pod(target)["spec"]["volumes"] if v.get("configMap", {}).get("name") == cm_name)
    mount = next(m for m in envoy["volumeMounts"] if m["name"] == volume["name"])
    argv = [*envoy["command"], *envoy["args"]]
    config_path = argv[argv.index("--config-path") + 1]
    assert config_path == mount["mountPath"] + "/envoy.yaml"

    (tmp_path / "envoy.yaml").write_text(configmap_files(target, "envoy-config")["envoy.yaml"])
    argv[argv.index("--config-path") + 1] = str(tmp_path / "envoy.yaml")
    out = subprocess.run(
        [tool("envoy"), "--mode", "validate", *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_envoy_config_wires_the_pod_together() -> None:
    """ext_authz goes to the sidecar's loopback port, fails closed; upstreams and admin stay on
    loopback; the Service and the probes reach Envoy's listeners."""
    cfg = _envoy_config()
    target = "overlays/envoy"
    assert _cluster_addr(cfg, "ext_authz") == ("127.0.0.1", sidecar_port(target))
    assert _cluster_addr(cfg, "bank_upstream")[0] == "127.0.0.1"
    assert _cluster_addr(cfg, "http_upstream")[0] == "127.0.0.1"
    assert _addr(cfg["admin"]["address"]["socket_address"])[0] == "127.0.0.1"
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    authz = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")[
        "typed_config"
    ]
    assert authz["failure_mode_allow"] is False
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == "ext_authz"

    ports = {p["name"]: p["containerPort"] for p in container(target, "envoy")["ports"]}
    assert _listener_addr(cfg, "ingress") == ("0.0.0.0", ports["envoy"])
    assert _listener_addr(cfg, "probes") == ("0.0.0.0", ports["envoy-ready"])
    readiness = container(target, "envoy")["readinessProbe"]["httpGet"]
    assert ports[readiness["port"]] == ports["envoy-ready"] and readiness["path"] == "/ready"
    service = one(target, "Service", "bank")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["envoy"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pod_and_target_its_ports(overlay: str) -> None:
    """Each Service selects the bank pod and each targetPort names a port of one of its containers."""
    target = f"overlays/{overlay}"
    template = pod(target)
    named = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    for svc in (d for d in docs(target) if d["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in named


# --- Istio overlay ---------------------------------------------------------------------------


def _istio_path_matches(pattern: str, path: str) -> bool:
    """Istio's string match for `paths`: exact, `prefix*`, `*suffix` or `*`."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return path == pattern


def _sample_paths(policy: dict[str, Any]) -> list[str]:
    """One concrete request path for every pattern in the policy's tables."""
    paths = []
    for rule in [*policy["sensitivity"]["rules"], *policy["permissions"]]:
        for m in rule["match"]:
            p = m.split()[-1]
            paths.append(re.sub(r"\*\*?", "x", p))
    return paths


def test_mesh_config_declares_the_grpc_provider() -> None:
    """The provider is envoyExtAuthzGrpc with only fields Istio knows, fails closed, and times out
    well above our latency (and below Istio's 600s default)."""
    provider = istio_provider()
    assert set(provider) == {"name", "envoyExtAuthzGrpc"}
    grpc = provider["envoyExtAuthzGrpc"]
    assert set(grpc) <= ISTIO_GRPC_PROVIDER_FIELDS
    assert {"service", "port", "timeout"} <= set(grpc)
    assert grpc["failOpen"] is False
    seconds = float(re.fullmatch(r"(\d+(?:\.\d+)?)s", grpc["timeout"]).group(1))  # type: ignore[union-attr]
    assert 0.1 <= seconds <= 5
    assert grpc["statusOnError"] == "503"


def test_mesh_config_service_is_the_service_entry_for_the_sidecar() -> None:
    """The provider's `namespace/host:port` is the ServiceEntry that resolves to the sidecar's
    loopback address and port."""
    target = "overlays/istio"
    grpc = istio_provider()["envoyExtAuthzGrpc"]
    namespace, _, host = grpc["service"].rpartition("/")
    se = one(target, "ServiceEntry")
    assert se["apiVersion"] == "networking.istio.io/v1"
    assert namespace == se["metadata"]["namespace"]
    assert se["spec"]["hosts"] == [host]
    assert se["spec"]["resolution"] == "STATIC"
    assert se["spec"].get("location", "MESH_EXTERNAL") == "MESH_EXTERNAL"
    assert [(p["number"], p["protocol"]) for p in se["spec"]["ports"]] == [(grpc["port"], "GRPC")]
    assert grpc["port"] == sidecar_port(target)
    # One loopback endpoint per worker: the --listen port + i.
    workers = int(env_of(target, "STEPUP_WORKERS"))
    assert [(e["address"], e["ports"]["grpc"]) for e in se["spec"]["endpoints"]] == [
        ("127.0.0.1", grpc["port"] + i) for i in range(workers)
    ]


def test_authorization_policy_sends_every_request_to_the_sidecar() -> None:
    """CUSTOM action, the mesh's provider name, the app's labels, and rules that select every path
    of the policy's tables, and also paths they do not name (so the sidecar's default deny holds)."""
    target = "overlays/istio"
    ap = one(target, "AuthorizationPolicy")
    spec = ap["spec"]
    assert ap["apiVersion"] == "security.istio.io/v1"
    assert spec["action"] == "CUSTOM"
    assert spec["provider"]["name"] == istio_provider()["name"]
    assert spec["selector"]["matchLabels"].items() <= pod(target)["metadata"]["labels"].items()
    assert spec["rules"]
    patterns = [p for rule in spec["rules"] for to in rule["to"] for p in to["operation"]["paths"]]
    for path in [*_sample_paths(policy_doc(target)), "/not/in/the/policy", "/grpc.health.v1.Health/Check"]:
        assert any(_istio_path_matches(p, path) for p in patterns), path


def test_request_authentication_matches_the_policy_issuer() -> None:
    """Issuer, audiences and keys are the policy's; the token stays in `authorization` for the
    sidecar (forwardOriginalToken) and is read from that header only."""
    target = "overlays/istio"
    ra = one(target, "RequestAuthentication")
    assert ra["apiVersion"] == "security.istio.io/v1"
    assert ra["spec"]["selector"]["matchLabels"].items() <= pod(target)["metadata"]["labels"].items()
    issuer = policy_doc(target)["issuers"][0]
    (rule,) = ra["spec"]["jwtRules"]
    assert rule["issuer"] == issuer["issuer"]
    assert rule["audiences"] == issuer["audiences"]
    assert rule["forwardOriginalToken"] is True
    assert rule["fromHeaders"] == [{"name": "authorization", "prefix": "Bearer "}]
    assert "fromParams" not in rule
    jwks = configmap_files(target, "stepup-policy")[issuer["jwks_file"]]
    assert json.loads(rule["jwks"]) == json.loads(jwks)


def test_istio_namespace_has_injection_and_the_pod_has_no_envoy_of_its_own() -> None:
    """Istio injects its proxy into the bank pod; the overlay adds only the app next to the sidecar."""
    target = "overlays/istio"
    assert one(target, "Namespace")["metadata"]["labels"]["istio-injection"] == "enabled"
    names = sorted(c["name"] for c in pod(target)["spec"]["containers"])
    assert names == ["bank", "stepup-sidecar"]
    assert not any(fnmatch.fnmatch(d["metadata"]["name"], "envoy-config*") for d in docs(target))


def test_deploy_docs_show_the_mesh_config_that_ships() -> None:
    """The "Deploy with Istio" section's mesh config block is mesh-config.yaml's, value for value."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deploy with Istio") :]
    block = re.search(r"```yaml\n( *meshConfig:.*?)\n *```", section, re.S)
    assert block, "no meshConfig yaml block in the Istio section"
    assert yaml.safe_load(textwrap.dedent(block.group(1))) == mesh_config()


def test_istio_proxy_rejects_header_names_with_underscores() -> None:
    """`x_auth_subject` cannot stand in for `x-auth-subject` (CGI-style upstreams fold '_' into '-'):
    an EnvoyFilter on the bank's inbound listener sets REJECT_REQUEST, and its patch is a valid
    HttpConnectionManager fragment for the real Envoy API (parsed with xds-protos)."""
    target = "overlays/istio"
    ef = one(target, "EnvoyFilter")
    assert ef["metadata"]["namespace"] == "bank"
    assert ef["spec"]["workloadSelector"]["labels"].items() <= pod(target)["metadata"]["labels"].items()
    (patch,) = ef["spec"]["configPatches"]
    assert patch["applyTo"] == "NETWORK_FILTER"
    assert patch["match"]["context"] == "SIDECAR_INBOUND"
    assert patch["match"]["listener"]["filterChain"]["filter"]["name"] == "envoy.filters.network.http_connection_manager"
    assert patch["patch"]["operation"] == "MERGE"
    typed = dict(patch["patch"]["value"]["typed_config"])
    assert typed.pop("@type").endswith("http_connection_manager.v3.HttpConnectionManager")
    # xds-protos' full Envoy API, in a process of its own (this one has the sidecar's own copy of
    # the ext_authz closure in its descriptor pool).
    script = (
        "import json, sys\n"
        "from google.protobuf import json_format\n"
        "from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as m\n"
        "hcm = json_format.ParseDict(json.loads(sys.argv[1]), m.HttpConnectionManager())\n"
        "o = hcm.common_http_protocol_options\n"
        "print(o.headers_with_underscores_action == o.REJECT_REQUEST)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, json.dumps(typed)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("config", ["examples/envoy/envoy.yaml", "examples/envoy/envoy-jwt-authn.yaml", "k8s/overlays/envoy/envoy.yaml"])
def test_every_envoy_config_rejects_header_names_with_underscores(config: str) -> None:
    doc = yaml.safe_load((ROOT / config).read_text())
    found = []
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                tc = f.get("typed_config", {})
                if "http_connection_manager" in tc.get("@type", "") and tc.get("http_filters") and any(
                    h["name"] == "envoy.filters.http.ext_authz" for h in tc["http_filters"]
                ):
                    found.append(tc["common_http_protocol_options"]["headers_with_underscores_action"])
    assert found and set(found) == {"REJECT_REQUEST"}


def env_of(target: str, name: str) -> str:
    (value,) = [e["value"] for e in container(target, "stepup-sidecar")["env"] if e["name"] == name]
    return str(value)


def test_the_envoy_overlay_lists_one_ext_authz_endpoint_per_worker() -> None:
    target = "overlays/envoy"
    workers = int(env_of(target, "STEPUP_WORKERS"))
    (cm,) = [d for d in docs(target) if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("envoy-config")]
    envoy = yaml.safe_load(next(iter(cm["data"].values())))
    (cluster,) = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "ext_authz"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"] for g in cluster["load_assignment"]["endpoints"] for e in g["lb_endpoints"]]
    assert ports == [sidecar_port(target) + i for i in range(workers)]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == "envoy.service.auth.v3.Authorization"
