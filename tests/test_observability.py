"""The operator's view holds together: every PromQL expression of the Grafana dashboard and of the
PrometheusRule parses (promql-parser, Prometheus's grammar), and every metric and label it names is
one a real sidecar exports (scraped over HTTP from a running `serve`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from examples.stack import free_port, wait_serving
from sidecar.telemetry import Metrics
from tests.helpers import EXAMPLE_POLICY

ROOT = Path(__file__).resolve().parents[1]
OBS = ROOT / "k8s" / "observability"
DASHBOARD = json.loads((OBS / "grafana-dashboard.json").read_text())
RULES = yaml.safe_load((OBS / "prometheusrule.yaml").read_text())
# Grafana's built-in variables, as Grafana substitutes them before Prometheus sees the query.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container"}  # added by the scrape


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for p in DASHBOARD["panels"]:
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r}", t["expr"]))
    for v in DASHBOARD["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
            assert m, v["query"]
            out.append((f"variable {v['name']}", m.group(1)))  # its series selector is PromQL
    return out


def rule_exprs() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for g in RULES["spec"]["groups"] for r in g["rules"]]


def _grafana(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    return expr


def names_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """Metric names selected, and every label name the expression uses."""
    tree = promql_parser.parse(_grafana(expr))
    names: set[str] = set()
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            labels.update(m.name for m in node.matchers.matchers if m.name != "__name__")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = getattr(node.modifier, "matching", None)
            if matching is not None:
                labels.update(matching.labels)

    promql_parser.walk(tree, visit)
    return names, labels


def declared_labels() -> dict[str, set[str]]:
    """Each exported sample name's label names, from the sidecar's own metric definitions."""
    out: dict[str, set[str]] = {}
    for collector in Metrics().registry._collector_to_names:
        own = set(getattr(collector, "_labelnames", ()))
        for metric in collector.describe():
            for suffix, extra in (("_total", set()), ("_bucket", {"le"}), ("_sum", set()), ("_count", set()), ("", set())):
                out[metric.name + suffix] = own | extra
    return out


def problems(exprs: list[tuple[str, str]], exported: set[str]) -> list[str]:
    labels_of = declared_labels()
    found = []
    for where, expr in exprs:
        names, labels = names_and_labels(expr)
        if not names:
            found.append(f"{where}: selects no metric")
        for n in sorted(names - exported):
            found.append(f"{where}: {n} is not exported by the sidecar")
        allowed = set(TARGET_LABELS)
        for n in names:
            allowed |= labels_of.get(n, set())
        for label in sorted(labels - allowed):
            found.append(f"{where}: label {label!r} is on none of {sorted(names)}")
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The sample names a real `serve` exports (every family, including those without samples
    yet: a counter family named x is scraped as x_total)."""
    listen, ops = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--policy", str(EXAMPLE_POLICY), "--listen", listen,
         "--metrics-listen", ops, "--watch-interval", "0", "--drain-delay", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_serving(listen)
        time.sleep(0.7)
        with urllib.request.urlopen(f"http://{ops}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        proc.terminate()
        proc.wait(20)
    names: set[str] = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""], "info": ["_info"]}
    for fam in text_string_to_metric_families(text):
        names.update(fam.name + s for s in suffixes.get(fam.type, [""]))
        names.update(s.name for s in fam.samples)
    yield names


def test_every_expression_parses() -> None:
    exprs = dashboard_exprs() + rule_exprs()
    assert len(exprs) >= 20
    for where, expr in exprs:
        try:
            promql_parser.parse(_grafana(expr))
        except Exception as e:  # the parser's error names the place
            pytest.fail(f"{where}: {expr!r} does not parse: {e}")


def test_the_dashboard_and_alerts_use_only_metrics_and_labels_the_sidecar_exports(exported: set[str]) -> None:
    assert "stepup_decisions_total" in exported and "stepup_policy_info" in exported
    assert problems(dashboard_exprs() + rule_exprs(), exported) == []


def test_the_check_has_teeth(exported: set[str]) -> None:
    bad = [
        ("typo", 'sum(rate(stepup_decision_total{namespace=~"$namespace"}[$__rate_interval]))'),
        ("label", "sum by (subject) (rate(stepup_decisions_total[5m]))"),
        ("nothing", "vector(1)"),
    ]
    assert problems(bad, exported) == [
        "typo: stepup_decision_total is not exported by the sidecar",
        "label: label 'subject' is on none of ['stepup_decisions_total']",
        "nothing: selects no metric",
    ]
    with pytest.raises(Exception):  # noqa: B017 (the parser raises its own error type)
        promql_parser.parse("sum(rate(x[5m])")


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    titles = {p["title"] for p in DASHBOARD["panels"]}
    for needed in (
        "Decisions by outcome", "Refusals by reason", "Step-up rate per sensitivity level",
        "Check latency (in the sidecar)", "Policy reloads", "Verified-token cache hit rate",
        "Candidate disagreements", "Shadow rule disagreements", "JWKS fetches by issuer",
    ):  # fmt: skip
        assert needed in titles
    uses = " ".join(e for _, e in dashboard_exprs())
    assert "histogram_quantile(0.99" in uses and "histogram_quantile(0.5" in uses


def test_the_alerts_cover_errors_reloads_jwks_and_latency_near_envoys_timeout() -> None:
    alerts = {r["alert"]: r for g in RULES["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) >= {
        "StepupInternalErrors", "StepupPolicyReloadRejected", "StepupJwksFetchFailing",
        "StepupCheckLatencyNearEnvoyTimeout",
    }  # fmt: skip
    assert alerts["StepupInternalErrors"]["expr"].rstrip().endswith("> 0")
    # The alert fires at half of Envoy's ext_authz timeout in the shipped configs.
    envoy_cm = yaml.safe_load((ROOT / "k8s" / "overlays" / "envoy" / "envoy.yaml").read_text())
    envoy = yaml.safe_load(envoy_cm["data"]["envoy.yaml"]) if "data" in envoy_cm else envoy_cm
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")
    timeout = float(ext["typed_config"]["grpc_service"]["timeout"].rstrip("s"))
    mesh = (ROOT / "k8s" / "overlays" / "istio" / "mesh-config.yaml").read_text()
    assert f"timeout: {ext['typed_config']['grpc_service']['timeout']}" in mesh  # Istio's is the same
    threshold = float(re.search(r"\) > ([\d.]+)\s*$", alerts["StepupCheckLatencyNearEnvoyTimeout"]["expr"]).group(1))  # type: ignore[union-attr]
    assert threshold == timeout / 2


def test_the_observability_kustomization_renders_the_dashboard_configmap() -> None:
    out = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "kubectl"), "kustomize", str(OBS)], capture_output=True, text=True, check=True
    ).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out)}
    assert set(docs) == {"ConfigMap", "PrometheusRule", "PodMonitor"}
    cm = docs["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["stepup-sidecar.json"]) == DASHBOARD
    assert docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "http-metrics"
