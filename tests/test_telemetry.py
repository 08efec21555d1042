"""Span export is bounded: a dead collector costs dropped, counted spans, never blocked decisions."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
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
    assert [type(p.exporter).__name__ for p in processors] == [expected]  # type: ignore[attr-defined]
    provider.shutdown()


def test_unknown_exporter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="unsupported OTEL_TRACES_EXPORTER 'zipkin'"):
        tracer_provider_from_env()
