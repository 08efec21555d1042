"""The fast OTLP span path (sidecar/telemetry.py, FastSpans) against the OpenTelemetry SDK.

For the same decision, the bytes the fast path writes must be the bytes the SDK's own encoder
writes for the span the SDK's tracer makes (same ids, parent, trace state, flags, attributes,
resource and scope), for generated attribute sets and parents; and the sampler decides the same.
The span reaching a real receiver through the sidecar is covered by test_span_delivery.py and
test_plain_install.py.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind, TraceFlags, TraceState

from sidecar import __version__
from sidecar.telemetry import (
    SPAN_NAME,
    BoundedSpanProcessor,
    FastSpans,
    StepupTracerProvider,
    _FastSpan,
    encode_request,
    request_head,
    tracer_provider_from_env,
)


class FixedIds(IdGenerator):
    """Ids from a seeded generator, so that two tracers can be given the same ones."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def generate_span_id(self) -> int:
        return self.rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self.rng.getrandbits(128) or 1


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


class Queue:
    """Stands in for BoundedSpanProcessor.put."""

    def __init__(self) -> None:
        self.items: list[_FastSpan] = []

    def put(self, item: _FastSpan) -> None:
        self.items.append(item)


RESOURCE = Resource.create({"service.name": "stepup-sidecar", "service.version": __version__})


def both(
    sampler: Sampler, parent: Context | None, attrs: dict[str, Any], seed: int
) -> tuple[ReadableSpan | None, Any, _FastSpan | None, tuple[int, int]]:
    keep = Keep()
    sdk = TracerProvider(resource=RESOURCE, sampler=sampler, id_generator=FixedIds(seed))
    sdk.add_span_processor(SimpleSpanProcessor(keep))
    span = sdk.get_tracer("stepup-sidecar", __version__).start_span(
        SPAN_NAME, context=parent, kind=SpanKind.SERVER, start_time=1_700_000_000_123_456_789, attributes=attrs
    )
    span.end(end_time=1_700_000_000_124_000_001)
    fast_provider = TracerProvider(resource=RESOURCE, sampler=sampler, id_generator=FixedIds(seed))
    q = Queue()
    ids = FastSpans(fast_provider, q).record(  # type: ignore[arg-type]
        SPAN_NAME, parent, 1_700_000_000_123_456_789, 1_700_000_000_124_000_001, dict(attrs)
    )
    return (keep.spans[0] if keep.spans else None), span.get_span_context(), (q.items[0] if q.items else None), ids


def sdk_span_bytes(span: ReadableSpan) -> bytes:
    return bytes(encode_spans([span]).resource_spans[0].scope_spans[0].spans[0].SerializeToString())


def remote(trace_id: int, span_id: int, sampled: bool = True, state: str = "") -> Context:
    ctx = trace.SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1 if sampled else 0),
        trace_state=TraceState.from_header([state]) if state else TraceState(),
    )  # fmt: skip
    return trace.set_span_in_context(trace.NonRecordingSpan(ctx))


DECISION = {
    "authz.decision_id": "0123456789abcdef", "authz.outcome": "allow", "authz.reason": "allowed",
    "authz.http_status": 200, "authz.rules": ["transfer", "tx"], "authz.sensitivity": "high",
    "authz.required_max_age": 900, "authz.subject": "alice", "authz.explain": True,
    "http.request.method": "POST", "rpc.system": "grpc",
}  # fmt: skip

PARENTS = {
    "none": None,
    "remote sampled": remote(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7),
    "remote with tracestate": remote(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, state="a=1,vendor=x y"),
    "remote not sampled": remote(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, sampled=False),
    "empty context": Context(),
}


@pytest.mark.parametrize("parent", PARENTS.values(), ids=PARENTS.keys())
@pytest.mark.parametrize(
    "sampler",
    [ParentBased(ALWAYS_ON), ALWAYS_ON, ALWAYS_OFF, ParentBased(TraceIdRatioBased(0.5)), TraceIdRatioBased(0.5)],
    ids=["parentbased_always_on", "always_on", "always_off", "parentbased_ratio", "ratio"],
)
def test_the_fast_span_is_the_sdks_span_byte_for_byte(sampler: Sampler, parent: Context | None) -> None:
    for seed in range(20):
        readable, ctx, fast, ids = both(sampler, parent, DECISION, seed)
        assert ids == (ctx.trace_id, ctx.span_id)  # the decision log names the same ids
        assert (readable is None) == (fast is None)  # sampled alike
        if readable is not None and fast is not None:
            assert fast.encode({}) == sdk_span_bytes(readable)


values = st.one_of(
    st.text(max_size=40),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=10), max_size=5),
)


@settings(max_examples=300, deadline=None)
@given(
    attrs=st.dictionaries(st.text(min_size=1, max_size=30), values, max_size=20),
    parent=st.sampled_from(list(PARENTS.values())),
    seed=st.integers(0, 2**32),
)
def test_generated_attributes_encode_as_the_sdk_encodes_them(
    attrs: dict[str, Any], parent: Context | None, seed: int
) -> None:
    # Text with a lone surrogate cannot go through the SDK's encoder at all (next test).
    def utf8(v: Any) -> bool:
        return all(utf8(x) for x in v) if isinstance(v, list) else not isinstance(v, str) or v.isascii() or _ok(v)

    attrs = {k: v for k, v in attrs.items() if utf8(k) and utf8(v)}
    readable, _, fast, _ = both(ALWAYS_ON, parent, attrs, seed)
    assert readable is not None and fast is not None
    assert fast.encode({}) == sdk_span_bytes(readable)


def _ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_text_utf8_cannot_carry_is_replaced_not_a_lost_batch() -> None:
    from opentelemetry.proto.trace.v1 import trace_pb2

    span = _FastSpan(SPAN_NAME, 1, 2, 0, False, "", 1, 2, {"authz.subject": "a\udc80b", "k\ud800": ["\udfff"]})
    parsed = trace_pb2.Span.FromString(span.encode({}))
    assert parsed.attributes[0].key == "authz.subject" and parsed.attributes[0].value.string_value == "a?b"
    assert parsed.attributes[1].key == "k?" and parsed.attributes[1].value.array_value.values[0].string_value == "?"


def test_a_whole_request_is_the_sdks_request() -> None:
    """Resource, scope and schema URLs around the spans, as encode_spans writes them."""
    spans, fast = [], []
    for seed in range(3):
        readable, _, f, _ = both(ALWAYS_ON, PARENTS["remote with tracestate"], DECISION, seed)
        assert readable is not None and f is not None
        spans.append(readable)
        fast.append(f)
    assert encode_request(request_head(RESOURCE), fast, {}) == encode_spans(spans).SerializeToString()


def test_the_fast_path_is_taken_only_for_one_otlp_grpc_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")

    def fast_of(exporters: str, **env: str) -> bool:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", exporters)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        provider = tracer_provider_from_env()
        assert isinstance(provider, StepupTracerProvider)
        try:
            if provider.fast is not None:
                assert isinstance(provider.fast.processor, BoundedSpanProcessor)
            return provider.fast is not None
        finally:
            provider.shutdown()
            for k in env:
                monkeypatch.delenv(k)

    assert fast_of("otlp")
    assert not fast_of("otlp,console")  # two exporters: the SDK's way for both
    assert not fast_of("otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf")
    assert not fast_of("otlp", OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT="8")  # limits: the SDK applies them


def test_kept_encodings_tell_true_from_1_and_the_cache_stays_bounded() -> None:
    from opentelemetry.proto.trace.v1 import trace_pb2

    from sidecar import telemetry

    for value in (True, 1, 1.0, "1", False, 0):
        span = _FastSpan(SPAN_NAME, 1, 2, 0, False, "", 1, 2, {"authz.http_status": value})
        (kv,) = trace_pb2.Span.FromString(span.encode({})).attributes
        assert kv.value.WhichOneof("value") == {bool: "bool_value", int: "int_value", float: "double_value",
                                                str: "string_value"}[type(value)]  # fmt: skip
    for i in range(3000):  # a method token is the caller's: many distinct ones
        _FastSpan(SPAN_NAME, 1, 2, 0, False, "", 1, 2, {"http.request.method": f"M{i}"}).encode({})
    assert len(telemetry._STABLE_KV) <= 1024


# --- red-team round 4 (helper-11) ----------------------------------------------------------------


class Redacting(Sampler):
    """A sampler that reads the links (the SDK passes a sequence) and returns its own attributes:
    the subject removed, one added."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> Any:  # fmt: skip
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        assert len(links) == 0
        kept = {k: v for k, v in (attributes or {}).items() if k != "authz.subject"}
        return SamplingResult(Decision.RECORD_AND_SAMPLE, {**kept, "sampler.name": "redacting"})

    def get_description(self) -> str:
        return "Redacting"


def test_a_custom_sampler_sees_links_and_its_attributes_are_the_spans() -> None:
    readable, _, fast, _ = both(Redacting(), PARENTS["remote sampled"], DECISION, 7)
    assert readable is not None and fast is not None
    assert "authz.subject" not in fast.attrs and fast.attrs["sampler.name"] == "redacting"
    assert fast.encode({}) == sdk_span_bytes(readable)


def test_no_context_means_the_current_one_as_for_the_sdk() -> None:
    ambient = trace.SpanContext(0xABCDEF, 0x1122, is_remote=False, trace_flags=TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(ambient)):
        readable, ctx, fast, ids = both(ParentBased(ALWAYS_ON), None, DECISION, 3)
    assert ids == (ctx.trace_id, ctx.span_id) and ctx.trace_id == 0xABCDEF
    assert readable is not None and fast is not None
    assert fast.encode({}) == sdk_span_bytes(readable)


def test_values_the_sdk_would_drop_are_dropped_not_mangled() -> None:
    from opentelemetry.proto.trace.v1 import trace_pb2

    attrs = {"a": 2**64 + 5, "b": None, "authz.outcome": {"x": 1}, "c": [1, 2**70], "d": -(2**63), "e": "ok"}
    (kv_d, kv_e) = trace_pb2.Span.FromString(_FastSpan(SPAN_NAME, 1, 2, 0, False, "", 1, 2, attrs).encode({})).attributes
    assert (kv_d.key, kv_d.value.int_value, kv_e.key, kv_e.value.string_value) == ("d", -(2**63), "e", "ok")


def test_an_error_span_names_the_exception_type_only() -> None:
    """Its message can quote request content (here a token): the span gets the type, as the log."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sidecar.decision import Decision, Outcome
    from sidecar.telemetry import Metrics, Telemetry

    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tel = Telemetry(provider, decision_log=None, metrics=Metrics())
    secret = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
    tel.record(
        decision=Decision(Outcome.DENY, "internal_error", 403), attrs=None, decision_id="0" * 16,
        policy_version="v", start_ns=1, parent=None, error=KeyError(f"Bearer {secret}"),
    )  # fmt: skip
    (span,) = mem.get_finished_spans()
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [("exception", {"exception.type": "KeyError"})]
    assert span.status.description == "KeyError"
    assert secret not in repr([span.attributes, [e.attributes for e in span.events], span.status])


def test_spans_still_queued_at_shutdown_are_counted_as_dropped() -> None:
    import threading

    from sidecar.telemetry import Metrics

    release = threading.Event()

    class Stuck(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            release.wait(5)
            return SpanExportResult.SUCCESS

        export_fast = export

    metrics = Metrics()
    proc = BoundedSpanProcessor(Stuck(), metrics)
    proc.max_batch, proc.shutdown_timeout = 2, 0.3
    for i in range(6):
        proc.put(_FastSpan(SPAN_NAME, 1, i + 1, 0, False, "", 1, 2, {}))
    assert not proc.force_flush(300)  # the batch in flight counts: not flushed
    proc.shutdown()
    release.set()
    assert proc.dropped == 4  # one batch of 2 was taken by the stuck export, 4 never left
    assert metrics.registry.get_sample_value("stepup_spans_dropped_total") == 4


# --- a caller's traceparent read without context objects (Telemetry.parent -> _Remote) ------------

_TP_TID, _TP_SID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
HEADERS = {
    "sampled": {"traceparent": f"00-{_TP_TID}-{_TP_SID}-01"},
    "not sampled": {"traceparent": f"00-{_TP_TID}-{_TP_SID}-00"},
    "other flags": {"traceparent": f"00-{_TP_TID}-{_TP_SID}-03"},
    "flags without sampled": {"traceparent": f"00-{_TP_TID}-{_TP_SID}-fe"},
    "with tracestate": {"traceparent": f"00-{_TP_TID}-{_TP_SID}-01", "tracestate": "a=1,vendor=x"},
    "upper case": {"traceparent": f"00-{_TP_TID.upper()}-{_TP_SID}-01"},
    "later version": {"traceparent": f"01-{_TP_TID}-{_TP_SID}-01-more"},
    "zero span": {"traceparent": f"00-{_TP_TID}-{'0' * 16}-01"},
    "b3": {"b3": f"{_TP_TID}-{_TP_SID}-1"},
    "none": {},
}
SAMPLERS = {
    "parentbased_always_on": ParentBased(ALWAYS_ON), "parentbased_always_off": ParentBased(ALWAYS_OFF),
    "always_on": ALWAYS_ON, "always_off": ALWAYS_OFF,
    "parentbased_ratio": ParentBased(TraceIdRatioBased(0.5)), "ratio": TraceIdRatioBased(0.5),
    "ratio_0": TraceIdRatioBased(0.0), "ratio_1": TraceIdRatioBased(1.0),
    "parentbased_inverted": ParentBased(ALWAYS_ON, remote_parent_sampled=ALWAYS_OFF, remote_parent_not_sampled=ALWAYS_ON),
    "parentbased_ratio_children": ParentBased(ALWAYS_OFF, remote_parent_sampled=TraceIdRatioBased(0.5),
                                              remote_parent_not_sampled=TraceIdRatioBased(0.5)),
}  # fmt: skip


@pytest.mark.parametrize("split", [False, True], ids=["attributes", "static+attributes"])
@pytest.mark.parametrize("headers", HEADERS.values(), ids=HEADERS.keys())
@pytest.mark.parametrize("sampler", [*SAMPLERS.values(), Redacting()], ids=[*SAMPLERS.keys(), "custom"])
def test_a_traceparent_read_without_contexts_samples_and_encodes_as_the_sdk(
    sampler: Sampler, headers: dict[str, str], split: bool
) -> None:
    """Telemetry.parent reads a plain version-00 traceparent itself, and FastSpans decides for
    the SDK's samplers without asking them: the same sampling, ids and bytes as the SDK's tracer
    given the propagator's context for the same headers."""
    from sidecar.telemetry import Telemetry, _Remote, build_propagator

    parent = Telemetry(None, decision_log=None).parent(headers)
    assert isinstance(parent, _Remote) == (headers in (HEADERS["sampled"], HEADERS["not sampled"],
                                                       HEADERS["other flags"], HEADERS["flags without sampled"]))  # fmt: skip
    if isinstance(parent, _Remote):
        assert trace.get_current_span(parent.context()).get_span_context() == trace.get_current_span(
            build_propagator().extract(headers)
        ).get_span_context()
    for seed in range(40):
        keep = Keep()
        sdk = TracerProvider(resource=RESOURCE, sampler=sampler, id_generator=FixedIds(seed))
        sdk.add_span_processor(SimpleSpanProcessor(keep))
        static = {k: v for k, v in DECISION.items() if k.startswith("authz.") and k != "authz.decision_id"}
        extra = {k: v for k, v in DECISION.items() if k not in static}
        span = sdk.get_tracer("stepup-sidecar", __version__).start_span(
            SPAN_NAME, context=build_propagator().extract(headers), kind=SpanKind.SERVER,
            start_time=1_700_000_000_123_456_789, attributes={**static, **extra} if split else DECISION,
        )  # fmt: skip
        span.end(end_time=1_700_000_000_124_000_001)
        q = Queue()
        fast_spans = FastSpans(TracerProvider(resource=RESOURCE, sampler=sampler, id_generator=FixedIds(seed)), q)  # type: ignore[arg-type]
        times = (1_700_000_000_123_456_789, 1_700_000_000_124_000_001)
        if split:
            ids = fast_spans.record(SPAN_NAME, parent, *times, dict(extra), static)
        else:
            ids = fast_spans.record(SPAN_NAME, parent, *times, dict(DECISION))
        ctx = span.get_span_context()
        assert ids == (ctx.trace_id, ctx.span_id)
        assert len(q.items) == len(keep.spans)
        if keep.spans:
            assert q.items[0].encode({}) == sdk_span_bytes(keep.spans[0])


def test_the_sdks_samplers_are_decided_without_asking_them_and_any_other_is_asked() -> None:
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    from sidecar.telemetry import _sampling_rule

    for sampler in [*SAMPLERS.values(), ParentBasedTraceIdRatio(0.25)]:
        assert _sampling_rule(sampler) is not None
    assert _sampling_rule(Redacting()) is None
    assert _sampling_rule(ParentBased(Redacting())) is None
    assert _sampling_rule(ParentBased(ALWAYS_ON, remote_parent_sampled=Redacting())) is None


@settings(max_examples=200, deadline=None)
@given(
    static=st.dictionaries(st.text(min_size=1, max_size=20), values, max_size=12),
    attrs=st.dictionaries(st.text(min_size=1, max_size=20), values, max_size=6),
)
def test_a_remembered_decisions_attributes_encoded_once_are_the_same_bytes(
    static: dict[str, Any], attrs: dict[str, Any]
) -> None:
    """A span given a decision's own attributes as `static` (the same dict for every span of a
    remembered decision) encodes them once: the bytes of the span with all its attributes."""
    from sidecar import telemetry

    attrs = {k: v for k, v in attrs.items() if k not in static}
    whole = _FastSpan(SPAN_NAME, 1, 2, 3, True, "", 1, 2, {**static, **attrs}).encode({})
    for _ in range(3):  # the first encodes the block, the others reuse it
        assert _FastSpan(SPAN_NAME, 1, 2, 3, True, "", 1, 2, attrs, static).encode({}) == whole
    copy = dict(static)  # another dict: its own block, never the other's
    assert _FastSpan(SPAN_NAME, 1, 2, 3, True, "", 1, 2, {}, copy).encode({}) == _FastSpan(
        SPAN_NAME, 1, 2, 3, True, "", 1, 2, static
    ).encode({})
    assert telemetry._BLOCKS[id(static)][0] is static


def test_the_block_memo_is_bounded_and_checks_the_dict_it_holds() -> None:
    from sidecar import telemetry

    telemetry._BLOCKS.clear()
    for i in range(telemetry._BLOCKS_MAX + 10):
        _FastSpan(SPAN_NAME, 1, 2, 0, False, "", 1, 2, {}, {"authz.rule": f"r{i}"}).encode({})
    assert len(telemetry._BLOCKS) <= telemetry._BLOCKS_MAX
    st_ = {"authz.outcome": "allow"}
    telemetry._BLOCKS[id(st_)] = ({"authz.outcome": "deny"}, b"wrong")  # another dict under its id
    enc = _FastSpan(SPAN_NAME, 1, 2, 0, False, "", 1, 2, {}, st_).encode({})
    assert enc == _FastSpan(SPAN_NAME, 1, 2, 0, False, "", 1, 2, dict(st_)).encode({}) and b"wrong" not in enc


def test_the_otlp_exporter_sends_the_encoded_request_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast exporter's client sends the request bytes it is given (no parse and serialize
    again), and a message as the stock stub would; reconnecting keeps that client."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from sidecar.telemetry import _fast_otlp_exporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    exp = _fast_otlp_exporter()
    assert exp is not None and exp._raw  # type: ignore[attr-defined]
    sent: list[Any] = []

    class Channel:
        def unary_unary(self, path: str, request_serializer: Any, response_deserializer: Any) -> Any:
            assert path == "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
            return lambda request, **kw: sent.append(request_serializer(request))

    client = exp._stub(Channel())  # type: ignore[attr-defined]
    client.Export(request=b"\x0a\x00")
    msg = ExportTraceServiceRequest()
    msg.resource_spans.add()
    client.Export(request=msg)
    assert sent == [b"\x0a\x00", msg.SerializeToString()]
    exp.shutdown()


def test_a_long_block_is_encoded_but_not_kept() -> None:
    from sidecar import telemetry

    telemetry._BLOCKS.clear()
    big = {"authz.subject": "s" * 3000, "authz.outcome": "allow"}
    enc = _FastSpan(SPAN_NAME, 1, 2, 0, False, "", 1, 2, {"authz.decision_id": "d"}, big).encode({})
    assert enc == _FastSpan(SPAN_NAME, 1, 2, 0, False, "", 1, 2, {**big, "authz.decision_id": "d"}).encode({})
    assert id(big) not in telemetry._BLOCKS


def test_a_sampler_whose_settings_are_not_where_they_were_is_asked() -> None:
    from opentelemetry.sdk.trace.sampling import Decision as SD
    from opentelemetry.sdk.trace.sampling import StaticSampler

    s = StaticSampler(SD.RECORD_AND_SAMPLE)
    del s._decision  # type: ignore[attr-defined]
    fast = FastSpans(TracerProvider(resource=RESOURCE, sampler=s), Queue())  # type: ignore[arg-type]
    assert fast._rule is None


def test_a_span_the_sdk_makes_names_the_decision_id_first() -> None:
    """With a span count limit the SDK drops the oldest attributes: the decision id goes first."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sidecar.decision import Decision, Outcome
    from sidecar.telemetry import Telemetry

    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tel = Telemetry(provider, decision_log=None)
    d = Decision(Outcome.DENY, "internal_error", 403, "x", sensitivity="high")
    tel.record(decision=d, attrs=None, decision_id="0123456789abcdef", policy_version="p@1", start_ns=1,
               parent=None, error=KeyError("k"))  # fmt: skip
    (span,) = mem.get_finished_spans()
    assert next(iter(span.attributes)) == "authz.decision_id"
    assert span.attributes["authz.outcome"] == "deny"
