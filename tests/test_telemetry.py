"""Span export is bounded: a dead collector costs dropped, counted spans, never blocked decisions."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.telemetry import BoundedSpanProcessor, Metrics, tracer_provider_from_env


class StuckExporter(SpanExporter):
    """A collector that never answers (until released)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


class FailingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError("collector down")

    def shutdown(self) -> None:
        pass


def test_a_stuck_collector_drops_and_counts_spans_without_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "10")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    metrics = Metrics()
    exporter = StuckExporter()
    processor = BoundedSpanProcessor(exporter, metrics)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    time.sleep(0.05)
    t0 = time.monotonic()
    for _ in range(1000):
        tracer.start_span("x").end()
    elapsed = time.monotonic() - t0
    # at most one batch in the stuck exporter plus a full queue were kept; the rest were dropped
    assert 1000 - 15 <= processor.dropped <= 1000 - 10
    assert metrics.registry.get_sample_value("stepup_spans_dropped_total") == processor.dropped
    assert elapsed < 5  # generous: 1000 spans never waited for the collector
    exporter.release.set()
    provider.shutdown()
    assert len(exporter.exported) == 1000 - processor.dropped


def test_export_failures_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    metrics = Metrics()
    processor = BoundedSpanProcessor(FailingExporter(), metrics)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    provider.get_tracer("t").start_span("x").end()
    assert processor.force_flush(2000)
    provider.shutdown()
    assert metrics.registry.get_sample_value("stepup_span_export_failures_total") == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, None),
        ({"OTEL_TRACES_EXPORTER": "console"}, "ConsoleSpanExporter"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}, "OTLPSpanExporter"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTLPSpanExporter",
        ),
    ],
)
def test_exporter_is_chosen_by_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str | None
) -> None:
    for var in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_SDK_DISABLED",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    provider = tracer_provider_from_env()
    if expected is None:
        assert provider is None
        return
    assert provider is not None
    processors = provider._active_span_processor._span_processors
    # The OTLP/gRPC exporter is the stock one, subclassed for the fast span path.
    assert [[c.__name__ for c in type(p.exporter).__mro__ if c.__name__ == expected] for p in processors] == [
        [expected]
    ]  # type: ignore[attr-defined]
    provider.shutdown()


def test_unknown_exporter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="unsupported OTEL_TRACES_EXPORTER 'zipkin'"):
        tracer_provider_from_env()


# --- the hot path's hand-built parts equal what the general code would make -----------------------

import json as _json  # noqa: E402

from sidecar import response as _response  # noqa: E402
from sidecar.decision import Decision as _Decision  # noqa: E402
from sidecar.decision import Outcome as _Outcome  # noqa: E402
from sidecar.identity import Identity as _Identity  # noqa: E402
from sidecar.policy import UpstreamHeaders as _UpstreamHeaders  # noqa: E402
from sidecar.telemetry import decision_fields, decision_line, trace_ids  # noqa: E402

_TRICKY = ["alice", 'a"b\\c', "é\u2028\U0001f600", "new\nline", "</script>", "x" * 300]


@pytest.mark.parametrize("subject", _TRICKY)
def test_the_decision_line_is_the_json_of_its_fields(subject: str) -> None:
    ident = _Identity("bearer", principal='spiffe://a/"b"', issuer_id="dev", issuer="https://i", subject=subject)
    d = _Decision(_Outcome.STEP_UP, "acr_too_low", 401, "x", matched_rules=("r1", "r-2"), sensitivity="high+x",
                  identity=ident, required_assurance="aal2", presented_assurance="aal1")
    fields = decision_fields(d, "0123456789abcdef", "p@1")
    line = decision_line(1_800_000_000_123_456_789, "ab" * 16, "cd" * 8, fields, "GET", True, 0.0001234, True, "KeyError")
    assert line.endswith("\n") and line.count("\n") == 1
    expected = {
        "ts": round(1_800_000_000.123456789, 6), "event": "decision", "trace_id": "ab" * 16, "span_id": "cd" * 8,
        **fields, "subject": subject if len(subject) <= 256 else subject[:256] + "…",
        "method": "GET", "grpc": True, "duration_us": 123.4, "explain": True, "error": "KeyError",
    }
    assert _json.loads(line) == expected
    assert list(_json.loads(line)) == list(expected)  # and in the same order


@settings(max_examples=300, deadline=None)
@given(end_ns=st.integers(0, 4_102_444_800 * 10**9), duration=st.floats(0, 1000, allow_nan=False))
def test_the_lines_times_are_the_instant_to_the_microsecond_and_the_duration_to_a_tenth(
    end_ns: int, duration: float
) -> None:
    """ts and duration_us are formatted from integers (not float rounding): the same numbers."""
    d = _Decision(_Outcome.ALLOW, "allowed", 200, "ok")
    doc = _json.loads(decision_line(end_ns, "", "", decision_fields(d, "0" * 16, "p@1"), "GET", True, duration, False, ""))
    assert abs(doc["ts"] - end_ns / 1e9) <= 5e-7 + abs(end_ns / 1e9) * 1e-15
    assert abs(doc["duration_us"] - duration * 1e6) <= 0.05 + duration * 1e-9
    ts_text = decision_line(end_ns, "", "", decision_fields(d, "0" * 16, "p@1"), "GET", True, 0.0, False, "")
    assert ts_text.startswith('{"ts":')
    whole, frac = ts_text[len('{"ts":') :].split(",", 1)[0].split(".")
    assert int(whole) * 10**6 + int(frac) == (end_ns + 500) // 1000 and len(frac) == 6


_LINE_SCHEMA = _json.loads(
    (__import__("pathlib").Path(__file__).parent.parent / "sidecar" / "decision-line.schema.json").read_text()
)


@pytest.mark.parametrize("long", ["x" * 5000, "\U0001f600" * 5000, "\u2028" * 300, "é" * 257])
def test_a_long_subject_principal_or_method_never_makes_a_line_a_pipe_would_tear(long: str) -> None:
    """Workers share one stdout pipe: only writes of at most 4096 bytes are atomic (red-team F7)."""
    import jsonschema

    ident = _Identity("bearer", principal=long, issuer_id="dev", issuer=long, subject=long)
    d = _Decision(_Outcome.DENY, "permission_denied", 403, "x", identity=ident)
    fields = decision_fields(d, "0123456789abcdef", "p@1")
    line = decision_line(1_800_000_000_000_000_000, "ab" * 16, "cd" * 8, fields, long, False, 0.0001, False, long)
    assert len(line.encode()) <= 4096
    doc = _json.loads(line)
    jsonschema.validate(doc, _LINE_SCHEMA)
    for key in ("subject", "principal", "issuer", "method", "error"):
        assert long.startswith(doc[key][:-1]) and doc[key].endswith("…") and len(doc[key]) <= 257
    assert "truncated" not in doc


def test_a_line_still_too_long_keeps_the_decision_and_says_truncated() -> None:
    import jsonschema

    d = _Decision(_Outcome.ALLOW, "allowed", 200, matched_rules=tuple(f"rule-{i:058d}" for i in range(80)))
    fields = decision_fields(d, "0123456789abcdef", "p@1")
    item = '{"rule":"s%s","table":"sensitivity","outcome":"deny","reason":"permission_denied"}'
    shadow = ',"shadow":[' + ",".join(item.replace("%s", str(i)) for i in range(60)) + "]"
    line = decision_line(1_800_000_000_000_000_000, "", "", fields, "GET", False, 0.0001, False, "", shadow)
    assert len(line.encode()) <= 4096
    doc = _json.loads(line)
    jsonschema.validate(doc, _LINE_SCHEMA)
    assert doc["truncated"] is True and "shadow" not in doc
    assert (doc["decision_id"], doc["outcome"], doc["reason"]) == ("0123456789abcdef", "allow", "allowed")
    assert doc["rules"] == [f"rule-{i:058d}" for i in range(4)]
    short = decision_line(1_800_000_000_000_000_000, "", "", decision_fields(
        _Decision(_Outcome.ALLOW, "allowed", 200, matched_rules=("a",)), "0123456789abcdef", "p@1"),
        "GET", False, 0.0001, False, "", shadow[:200] + "]")  # fmt: skip
    assert "truncated" not in short


_CANDIDATE = ',"candidate":{"outcome":"deny","reason":"permission_denied","http_status":403,"policy_version":"c@1","agrees":false}'


def test_the_round_2_line_keeps_its_candidate_and_sample_rate_within_the_limit() -> None:
    """Red-team round 2: ten risk rules with 128-character ids and three capped strings made a
    schema-valid line of 4,337 bytes; and truncation dropped `sample_rate` and `candidate`."""
    import jsonschema

    from sidecar.assurance import Requirement

    long = "\U0001f600" * 300
    risk = tuple(f"r{i}" + "x" * 126 for i in range(10))
    ident = _Identity("bearer", principal=long, issuer_id="dev", issuer=long, subject=long)
    req = Requirement("high", False, 1, 300, frozenset(), risk)
    d = _Decision(_Outcome.ALLOW, "allowed", 200, identity=ident, requirement=req,
                  matched_rules=("transfer", "customers", *risk))  # fmt: skip
    fields = decision_fields(d, "0123456789abcdef", "p@1")
    item = '{"rule":"s%s","table":"sensitivity","outcome":"deny","reason":"permission_denied"}'
    shadow = ',"shadow":[' + ",".join(item.replace("%s", str(i)) for i in range(3)) + "]"
    line = decision_line(1_800_000_000_000_000_000, "ab" * 16, "cd" * 8, fields, long, True, 0.0001, False,
                         long, shadow, _CANDIDATE, ',"sample_rate":0.5')  # fmt: skip
    assert len(line.encode()) <= 4096
    doc = _json.loads(line)
    jsonschema.validate(doc, _LINE_SCHEMA)
    assert doc["truncated"] is True and "shadow" not in doc
    assert doc["sample_rate"] == 0.5 and doc["candidate"]["reason"] == "permission_denied"
    assert (doc["outcome"], doc["reason"], doc["decision_id"]) == ("allow", "allowed", "0123456789abcdef")
    assert len(doc["risk_rules"]) == 4 and all(len(r) <= 65 for r in doc["risk_rules"])
    assert doc["subject"] == long[:16] + "…"


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(min_size=0, max_size=600),
    n_rules=st.integers(0, 200),
    id_len=st.integers(1, 128),
    shadows=st.integers(0, 80),
    candidate=st.booleans(),
    sample=st.booleans(),
)
def test_no_decision_line_is_longer_than_a_pipe_writes_at_once(
    text: str, n_rules: int, id_len: int, shadows: int, candidate: bool, sample: bool
) -> None:
    """Whatever the caller sends and however large the policy: at most 4096 bytes, valid against
    the schema, the decision and sample_rate always there."""
    import jsonschema

    from sidecar.assurance import Requirement

    ids = tuple(f"{i}-" + "r" * id_len for i in range(n_rules))
    ident = _Identity("bearer", principal=text, issuer_id="dev", issuer=text, subject=text)
    req = Requirement(text, False, 1, 300, frozenset(), ids)
    d = _Decision(_Outcome.STEP_UP, "acr_too_low", 401, identity=ident, requirement=req, matched_rules=ids,
                  sensitivity=text, required_assurance=text, presented_assurance=text)  # fmt: skip
    fields = decision_fields(d, "0123456789abcdef", text)
    item = '{"rule":"s%s","table":"sensitivity","outcome":"deny","reason":"permission_denied"}'
    shadow = ',"shadow":[' + ",".join(item.replace("%s", str(i)) for i in range(shadows)) + "]" if shadows else ""
    line = decision_line(1_800_000_000_000_000_000, "ab" * 16, "cd" * 8, fields, text, True, 0.0001, True, text,
                         shadow, _CANDIDATE if candidate else "", ',"sample_rate":0.25' if sample else "")  # fmt: skip
    assert len(line.encode()) <= 4096 and line.endswith("}\n") and line.count("\n") == 1
    doc = _json.loads(line)
    jsonschema.validate(doc, _LINE_SCHEMA)
    assert (doc["outcome"], doc["reason"], doc["http_status"]) == ("step_up", "acr_too_low", 401)
    assert ("sample_rate" in doc) == sample
    if "truncated" not in doc:
        assert doc["rules"] == list(ids) and ("candidate" in doc) == candidate and ("shadow" in doc) == bool(shadows)


@pytest.mark.parametrize(
    ("headers", "ids"),
    [
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")),
        ({"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"}, ("", "")),
        ({"traceparent": "garbage"}, ("", "")),
        ({"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"}, ("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1")),
        ({"b3": "64fe8b2a57d3eff7-e457b5a2e4d86bd1"}, ("000000000000000064fe8b2a57d3eff7", "e457b5a2e4d86bd1")),
        ({"x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7", "x-b3-spanid": "e457b5a2e4d86bd1"}, ("80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1")),
        ({"x-b3-traceid": "zz", "x-b3-spanid": "e457b5a2e4d86bd1"}, ("", "")),
        ({}, ("", "")),
    ],
)
def test_trace_ids_come_straight_off_the_headers(headers: dict[str, str], ids: tuple[str, str]) -> None:
    assert trace_ids(headers) == ids


@pytest.mark.parametrize("subject", [*_TRICKY, _response._PLACEHOLDER, "y" * 600])
def test_an_allow_from_a_template_is_the_same_bytes(subject: str) -> None:
    hdrs = _UpstreamHeaders()
    ident = _Identity("bearer", issuer_id="dev", issuer="https://idp", subject=subject)
    for d in (
        _Decision(_Outcome.ALLOW, "allowed", 200, identity=ident, presented_assurance="aal2"),
        _Decision(_Outcome.ALLOW, "public", 200),
        _Decision(_Outcome.ALLOW, "workload_granted", 200, identity=_Identity("mtls", principal="spiffe://x")),
    ):
        for did in ("0123456789abcdef", "fedcba9876543210"):
            assert _response.allow_bytes(d, did, hdrs) == _response.allow(d, did, hdrs).SerializeToString()


def test_a_wall_clock_that_steps_back_mid_check_gives_duration_0_not_negative() -> None:
    """start_ns and the end are wall-clock time (a span's times are): a step back (NTP) between
    them must not give a negative duration_us (the schema's minimum is 0) or histogram value."""
    import asyncio
    import io
    import time as _time

    import jsonschema

    from sidecar.compiler import load_policy
    from sidecar.runtime import Runtime
    from sidecar.telemetry import Telemetry
    from tests.helpers import EXAMPLE_POLICY, NOW, FixedClock, check_request

    log = io.StringIO()
    tel = Telemetry(None, decision_log=log, metrics=Metrics())
    rt = Runtime(load_policy(EXAMPLE_POLICY), tel, FixedClock(NOW))
    ev = asyncio.run(rt.evaluate(check_request("/bank.v1.Payments/Transfer")))
    rt.record(ev, "f" * 16, _time.time_ns() + 5 * 10**9)  # started "5 s from now"
    doc = _json.loads(log.getvalue())
    jsonschema.validate(doc, _LINE_SCHEMA)
    assert doc["duration_us"] == 0
    assert tel.metrics.registry.get_sample_value("stepup_check_duration_seconds_sum") == 0


_TID, _SID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{_TID}-{_SID}-01", f"01-{_TID}-{_SID}-01-what-comes-later", f"cc-{_TID}-{_SID}-00",
        f" \t00-{_TID}-{_SID}-01 ", f"ff-{_TID}-{_SID}-01", f"00-{_TID}-{_SID}-01-extra",
        f"00-{_TID.upper()}-{_SID}-01", f"00-{_TID}-{_SID}", f"00-{'0' * 32}-{_SID}-01", f"00-{_TID}-{'0' * 16}-01",
        f"00-{_TID}-{_SID}-01,00-{_TID}-{_SID}-01", f"0-{_TID}-{_SID}-01", "", f"01-{_TID}-{_SID}-01" + "x" * 600,
        f"00-{_TID}-{_SID}-01\n", f"00-{_TID}-{_SID}-0g", f"00-{_TID[:-1]}g-{_SID}-01",
    ],
)  # fmt: skip
def test_the_untraced_log_reads_a_traceparent_as_the_traced_path_does(traceparent: str) -> None:
    """trace_ids (no tracing) and the propagator (tracing) name the same caller's ids, whatever
    the version and blanks (red-team helper-10: a later version was dropped when untraced)."""
    from opentelemetry import trace as _trace

    from sidecar.telemetry import build_propagator, trace_ids

    sc = _trace.get_current_span(build_propagator().extract({"traceparent": traceparent})).get_span_context()
    expected = (format(sc.trace_id, "032x"), format(sc.span_id, "016x")) if sc.is_valid else ("", "")
    assert trace_ids({"traceparent": traceparent}) == expected
    valid = {f"00-{_TID}-{_SID}-01", f"01-{_TID}-{_SID}-01-what-comes-later", f"cc-{_TID}-{_SID}-00",
             f" \t00-{_TID}-{_SID}-01 ", f"00-{_TID}-{_SID}-01\n"}  # fmt: skip
    assert (expected == (_TID, _SID)) == (traceparent in valid)


def test_a_decision_object_recorded_again_gives_the_line_and_counts_of_a_new_one() -> None:
    """record() remembers what it takes from a Decision object (the engine's cache answers with
    the same one): each call still gets its own id, time and method, a new policy version is
    seen, and the counters count every call."""
    import io

    from sidecar.telemetry import Telemetry

    log = io.StringIO()
    tel = Telemetry(None, decision_log=log, metrics=Metrics())
    ident = _Identity("bearer", issuer_id="dev", issuer="https://idp", subject="alice")
    d = _Decision(_Outcome.ALLOW, "allowed", 200, identity=ident, matched_rules=("a", "b"), sensitivity="low")
    same = _Decision(_Outcome.ALLOW, "allowed", 200, identity=ident, matched_rules=("a", "b"), sensitivity="low")
    calls = [(d, "p@1", "0" * 16), (d, "p@1", "1" * 16), (d, "p@2", "2" * 16), (same, "p@2", "3" * 16)]
    for decision, version, did in calls:
        tel.record(decision=decision, attrs=None, decision_id=did, policy_version=version,
                   start_ns=1_000, parent=None, remember=True)  # fmt: skip
    lines = [_json.loads(x) for x in log.getvalue().splitlines()]
    for line, (decision, version, did) in zip(lines, calls, strict=True):
        fields = decision_fields(decision, did, version)
        expected = decision_line(1, "", "", fields, "", False, 0.0, False, "")
        got = {k: v for k, v in line.items() if k not in ("ts", "duration_us")}
        assert got == {k: v for k, v in _json.loads(expected).items() if k not in ("ts", "duration_us")}
    assert [x["decision_id"] for x in lines] == ["0" * 16, "1" * 16, "2" * 16, "3" * 16]
    assert [x["policy_version"] for x in lines] == ["p@1", "p@1", "p@2", "p@2"]
    reg = tel.metrics.registry
    assert reg.get_sample_value("stepup_decisions_total", {"outcome": "allow", "reason": "allowed"}) == 4


def test_an_allow_for_a_decision_seen_before_is_the_same_bytes_with_its_own_id() -> None:
    hdrs, other = _UpstreamHeaders(), _UpstreamHeaders(subject="x-user")
    ident = _Identity("bearer", issuer_id="dev", issuer="https://idp", subject="alice")
    d = _Decision(_Outcome.ALLOW, "allowed", 200, identity=ident, presented_assurance="aal2")
    for h in (hdrs, hdrs, other, hdrs):
        for did in ("0123456789abcdef", "fedcba9876543210"):
            assert _response.allow_bytes(d, did, h, True) == _response.allow(d, did, h).SerializeToString()


_BOUNDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25, 0.5]


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.one_of(st.sampled_from([0.0, *_BOUNDS, 0.7]), st.floats(0, 2, allow_nan=False)), max_size=20),
        max_size=4,
    )
)
def test_the_latency_histogram_counted_as_plain_numbers_is_what_observe_would_give(
    batches: list[list[float]],
) -> None:
    """The hot path counts into plain lists; a scrape (any collection) flushes them into the
    histogram first: the same buckets (le is inclusive), count and sum as Histogram.observe, at
    every scrape, however the observations fall between scrapes."""
    from prometheus_client import CollectorRegistry, Histogram

    m = Metrics()
    ref = Histogram("ref", "ref", buckets=_BOUNDS, registry=CollectorRegistry())
    for batch in batches:
        for x in batch:
            m.observe_latency(x)
            ref.observe(x)
        want = {s.labels.get("le"): s.value for s in ref.collect()[0].samples if s.name.endswith(("_bucket", "_count"))}
        got = {
            s.labels.get("le"): s.value
            for fam in m.registry.collect() if fam.name == "stepup_check_duration_seconds"
            for s in fam.samples if s.name.endswith(("_bucket", "_count"))
        }  # fmt: skip
        assert got == want
        got_sum = m.registry.get_sample_value("stepup_check_duration_seconds_sum")
        assert got_sum == pytest.approx(sum(s.value for s in ref.collect()[0].samples if s.name == "ref_sum"))


def test_decision_counts_are_in_the_registry_at_once_and_counted_once_however_often_it_is_read() -> None:
    from sidecar.telemetry import Telemetry

    tel = Telemetry(None, decision_log=None)
    d = _Decision(_Outcome.ALLOW, "allowed", 200, sensitivity="high")
    reg = tel.metrics.registry
    for i in range(1, 4):
        tel.record(decision=d, attrs=None, decision_id="0" * 16, policy_version="p@1", start_ns=0, parent=None)
        for _ in range(2):  # each read flushes; a second read adds nothing
            assert reg.get_sample_value("stepup_decisions_total", {"outcome": "allow", "reason": "allowed"}) == i
            assert reg.get_sample_value(
                "stepup_decisions_by_sensitivity_total", {"sensitivity": "high", "outcome": "allow"}
            ) == i
            assert reg.get_sample_value("stepup_check_duration_seconds_count") == i
    tel.record(decision=d, attrs=None, decision_id="0" * 16, policy_version="p@1", start_ns=0, parent=None,
               explain=True)  # fmt: skip
    assert reg.get_sample_value("stepup_explains_total") == 1
    assert reg.get_sample_value("stepup_decisions_total", {"outcome": "allow", "reason": "allowed"}) == 3


def test_a_prometheus_client_without_the_histograms_parts_gets_each_observation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sidecar import telemetry

    assert telemetry._histogram_parts(Metrics().latency) and not telemetry._histogram_parts(object())
    monkeypatch.setattr(telemetry, "_histogram_parts", lambda h: False)
    m = Metrics()
    for x in (0.00005, 0.0003, 9.0):
        m.observe_latency(x)
    assert m.latency_counts == [0] * len(m.latency_counts)  # nothing left to flush
    reg = m.registry
    assert reg.get_sample_value("stepup_check_duration_seconds_count") == 3
    assert reg.get_sample_value("stepup_check_duration_seconds_bucket", {"le": "0.0001"}) == 1
    assert reg.get_sample_value("stepup_check_duration_seconds_bucket", {"le": "0.5"}) == 2


@pytest.mark.parametrize(
    "headers",
    [
        {"b3": "4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-1"},
        {"b3": "A3ce929d0E0e4736-00F067AA0ba902b7"},
        {"x-b3-traceid": "4Bf92f3577B34dA6A3cE929d0E0E4736", "x-b3-spanid": "00f067aa0bA902B7"},
        {"x-b3-traceid": "a3ce929D0e0e4736", "x-b3-spanid": "00f067aA0BA902b7", "x-b3-sampled": "1"},
        {"x-b3-traceid": "0" * 32, "x-b3-spanid": "00F067AA0BA902B7"},
    ],
)
def test_the_untraced_log_reads_b3_in_either_case_as_the_traced_path_does(headers: dict[str, str]) -> None:
    """(Red-team helper-17: an upper-case B3 header named the caller's ids only when traced.)"""
    from opentelemetry import trace as _trace

    from sidecar.telemetry import build_propagator

    sc = _trace.get_current_span(build_propagator().extract(headers)).get_span_context()
    expected = (format(sc.trace_id, "032x"), format(sc.span_id, "016x")) if sc.is_valid else ("", "")
    assert trace_ids(headers) == expected
