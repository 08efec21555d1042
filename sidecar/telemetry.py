"""Traces, decision logs and metrics: one span, one log line and one count per Check.

Span and log carry the same fields under the same stable names; never a token, a credential or a
header value, and no personal data beyond the subject id.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import struct
import sys
import threading
import time
import traceback
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision as SamplingDecision
from opentelemetry.sdk.trace.sampling import (
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar import __version__
from sidecar.attributes import RequestAttributes
from sidecar.decision import Decision, same_answer
from sidecar.paths import valid_method

log = logging.getLogger("stepup")


def log_internal_error(what: str, e: BaseException, **extra: Any) -> None:
    """Log an unexpected exception WITHOUT its message or locals: a message can quote request
    content (a claim, a header). The type and the innermost frames say where it happened."""
    frames = traceback.extract_tb(e.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    log.error("%s", what, extra={"error": type(e).__name__, "where": where, **extra})

SPAN_NAME = "ext_authz.check"
EXPLAIN_SPAN_NAME = "stepup.explain"
# Span attribute names (also the decision log's keys, without the "authz." prefix).
A_OUTCOME = "authz.outcome"
A_REASON = "authz.reason"
A_RULES = "authz.rules"
A_SENSITIVITY = "authz.sensitivity"
A_REQUIRED = "authz.required_assurance"
A_REQUIRED_MAX_AGE = "authz.required_max_age"
A_PRESENTED = "authz.presented_assurance"
A_POLICY = "authz.policy_version"
A_DECISION_ID = "authz.decision_id"
A_SUBJECT = "authz.subject"
A_ISSUER = "authz.issuer"
A_PRINCIPAL = "authz.principal"
A_CREDENTIAL = "authz.credential"
A_STATUS = "authz.http_status"
A_RISK = "authz.risk_rules"


class _DefaultPropagator(CompositePropagator):
    """W3C trace context, else B3 (single or multi header). Looks only at the headers that can
    carry a context, so a request without one costs a couple of dict lookups."""

    _W3C = TraceContextTextMapPropagator()
    _B3 = B3MultiFormat()

    def __init__(self) -> None:
        super().__init__([self._B3, self._W3C])

    def extract(self, carrier: Any, context: Context | None = None, getter: Any = None) -> Context:
        chosen: TextMapPropagator | None = None
        if "traceparent" in carrier:
            fast = _parse_traceparent(carrier["traceparent"])
            if fast is not None and "tracestate" not in carrier:
                return trace.set_span_in_context(trace.NonRecordingSpan(fast), context)
            chosen = self._W3C
        elif "b3" in carrier or "x-b3-traceid" in carrier:
            chosen = self._B3
        if chosen is None:
            return context if context is not None else Context()
        result: Context = chosen.extract(carrier, context)
        return result


_HEX = frozenset("0123456789abcdef")
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def _plain_traceparent(value: str) -> tuple[str, str, str] | None:
    """The common W3C case, version 00 and well-formed: its trace id, span id and flags as the
    header's own hex; None = anything else (let OpenTelemetry read it)."""
    m = _TRACEPARENT_00.fullmatch(value)
    if m is None or m[1] == _ZERO_TRACE or m[2] == _ZERO_SPAN:
        return None
    return m[1], m[2], m[3]


def _parse_traceparent(value: str) -> trace.SpanContext | None:
    plain = _plain_traceparent(value)
    if plain is None:
        return None
    tid, sid, flags = plain
    trace_flags = trace.TraceFlags(int(flags, 16))
    return trace.SpanContext(int(tid, 16), int(sid, 16), is_remote=True, trace_flags=trace_flags)


class _Remote:
    """The caller's span context as read straight off a version-00 `traceparent` with no
    `tracestate` (the common case), without OpenTelemetry's context objects: what FastSpans
    needs. `context()` is the Context the default propagator extracts from the same headers."""

    __slots__ = ("flags", "span_id", "trace_id")

    def __init__(self, trace_id: int, span_id: int, flags: int) -> None:
        self.trace_id, self.span_id, self.flags = trace_id, span_id, flags

    def context(self) -> Context:
        flags = trace.TraceFlags(self.flags)
        sc = trace.SpanContext(self.trace_id, self.span_id, is_remote=True, trace_flags=flags)
        return trace.set_span_in_context(trace.NonRecordingSpan(sc))


Parent = Context | _Remote


def _as_context(parent: Parent | None) -> Context | None:
    return parent.context() if isinstance(parent, _Remote) else parent


def _sampling_rule(s: Sampler) -> Callable[[bool | None, int], bool] | None:
    """For the SDK's own samplers (those OTEL_TRACES_SAMPLER names): whether a span is sampled,
    from a remote parent's sampled flag (None: no parent) and the trace id, as their
    `should_sample` decides it (they return the attributes given and the parent's trace state);
    None for any other sampler, which is then asked itself."""
    t = type(s)
    if t is StaticSampler:
        on = s._decision is SamplingDecision.RECORD_AND_SAMPLE  # type: ignore[attr-defined]
        return lambda parent, trace_id: on
    if t is TraceIdRatioBased:
        limit, bound = s.TRACE_ID_LIMIT, s.bound  # type: ignore[attr-defined]
        return lambda parent, trace_id: trace_id & limit < bound
    if t is ParentBased or t is ParentBasedTraceIdRatio:
        root = _sampling_rule(s._root)  # type: ignore[attr-defined]
        yes = _sampling_rule(s._remote_parent_sampled)  # type: ignore[attr-defined]
        no = _sampling_rule(s._remote_parent_not_sampled)  # type: ignore[attr-defined]
        if root is None or yes is None or no is None:
            return None
        return lambda parent, trace_id: (
            root(None, trace_id) if parent is None else (yes if parent else no)(parent, trace_id)
        )
    return None


def build_propagator() -> TextMapPropagator:
    """OTEL_PROPAGATORS when set; otherwise W3C trace context, falling back to B3 (single or multi)."""
    if os.environ.get("OTEL_PROPAGATORS"):
        return get_global_textmap()
    return _DefaultPropagator()


def tracer_provider_from_env(metrics: Metrics | None = None) -> TracerProvider | None:
    """Honour the standard OTEL_* variables. OTEL_TRACES_EXPORTER: otlp, console or none; when it is
    unset, OTLP is used if an OTLP endpoint variable is set, else no exporter (spans are not kept)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    names = os.environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        has_endpoint = any(
            os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        names = "otlp" if has_endpoint else "none"
    exporters: list[SpanExporter] = []
    for name in (n.strip() for n in names.split(",")):
        if name == "none" or not name:
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            proto = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            )
            if proto == "grpc":
                fast = None if any(os.environ.get(v) for v in _SPAN_LIMIT_VARS) else _fast_otlp_exporter()
                if fast is not None:
                    exporters.append(fast)
                else:
                    from opentelemetry.exporter.otlp.proto.grpc import trace_exporter

                    exporters.append(trace_exporter.OTLPSpanExporter())
            elif proto == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExp

                exporters.append(HttpExp())
            else:
                raise ValueError(f"unsupported OTEL_EXPORTER_OTLP_PROTOCOL {proto!r} (grpc or http/protobuf)")
        else:
            raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {name!r} (otlp, console or none)")
    if not exporters:
        return None
    resource = Resource.create({"service.name": "stepup-sidecar", "service.version": __version__})
    provider = StepupTracerProvider(resource=resource)
    processors = [BoundedSpanProcessor(exp, metrics) for exp in exporters]
    for proc in processors:
        provider.add_span_processor(proc)
    if len(processors) == 1 and hasattr(exporters[0], "export_fast"):
        exporters[0].resource = provider.resource  # type: ignore[attr-defined]
        provider.fast = FastSpans(provider, processors[0])
    return provider


class StepupTracerProvider(TracerProvider):
    """A TracerProvider that may carry the fast path for its one OTLP/gRPC exporter (`fast`)."""

    fast: FastSpans | None = None


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


class BoundedSpanProcessor(SpanProcessor):
    """Batches finished spans to an exporter from a worker thread, through a bounded queue.

    When the collector is slow or down the queue fills and new spans are dropped and counted
    (`stepup_spans_dropped_total`): never queued without bound, never slowing a decision, never
    one log line per dropped span. Sizes follow OTEL_BSP_MAX_QUEUE_SIZE (2048),
    OTEL_BSP_MAX_EXPORT_BATCH_SIZE (512) and OTEL_BSP_SCHEDULE_DELAY (5000 ms)."""

    def __init__(self, exporter: SpanExporter, metrics: Metrics | None = None) -> None:
        self.exporter = exporter
        self.metrics = metrics
        self.max_batch = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.delay = _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self.capacity = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        # A deque: append and popleft are atomic, and cost a fraction of queue.Queue's locking.
        # Only the loop thread appends, only the worker pops.
        self.queue: deque[ReadableSpan | _FastSpan] = deque()
        self.dropped = 0
        self._stop = threading.Event()
        self._flush_request = threading.Event()
        self._force = False
        self._busy = False
        self.shutdown_timeout = 10.0  # seconds the last export may take at shutdown
        self._worker = threading.Thread(target=self._run, name="stepup-span-export", daemon=True)
        self._worker.start()

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context.trace_flags.sampled:
            self.put(span)

    def put(self, span: ReadableSpan | _FastSpan) -> None:
        q = self.queue
        if len(q) >= self.capacity:
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.spans_dropped.inc()
            return
        q.append(span)
        if len(q) >= self.max_batch and not self._flush_request.is_set():
            # A full batch is waiting: export it now, not at the next scheduled delay (at 1,000
            # decisions/s the 2,048-span queue fills in two seconds; the delay is five).
            self._flush_request.set()

    def _drain(self) -> list[ReadableSpan | _FastSpan]:
        batch: list[ReadableSpan | _FastSpan] = []
        pop = self.queue.popleft
        while len(batch) < self.max_batch:
            try:
                batch.append(pop())
            except IndexError:
                break
        return batch

    def _export(self, batch: list[ReadableSpan | _FastSpan]) -> None:
        self._busy = True  # force_flush waits for the batch in flight too, not only the queue
        try:
            self._send(batch)
        finally:
            self._busy = False

    def _send(self, batch: list[ReadableSpan | _FastSpan]) -> None:
        fast = [s for s in batch if isinstance(s, _FastSpan)]
        sdk = [s for s in batch if not isinstance(s, _FastSpan)] if len(fast) < len(batch) else []
        sends: list[tuple[list[Any], Any]] = [(fast, getattr(self.exporter, "export_fast", None))]
        sends.append((sdk, self.exporter.export))
        for part, send in sends:
            if not part:
                continue
            if send is None:  # fast spans for an exporter that cannot take them (not made so)
                self.dropped += len(part)
                if self.metrics is not None:
                    self.metrics.spans_dropped.inc(len(part))
                continue
            try:
                result = send(part)
                failed = result is not SpanExportResult.SUCCESS
            except Exception:
                failed = True
            if failed and self.metrics is not None:
                self.metrics.span_export_failures.inc()

    def _run(self) -> None:
        while not self._stop.is_set():
            woken = self._flush_request.wait(self.delay)
            self._flush_request.clear()
            # Full batches go at once; a partial one waits for the schedule delay (or a flush), so
            # a steady load is sent in few large requests, not many small ones.
            while len(self.queue) >= self.max_batch:
                self._export(self._drain())
            if not woken or self._force:
                self._force = False
                while batch := self._drain():
                    self._export(batch)
        while batch := self._drain():
            self._export(batch)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._force = True
        self._flush_request.set()
        deadline = time.monotonic() + timeout_millis / 1000
        while (self.queue or self._busy) and time.monotonic() < deadline:
            time.sleep(0.01)
        return not (self.queue or self._busy)

    def shutdown(self) -> None:
        self._stop.set()
        self._flush_request.set()
        self._worker.join(self.shutdown_timeout)
        left = len(self.queue)  # a collector too slow to take the rest within 10 s: counted
        if left:
            self.queue.clear()
            self.dropped += left
            if self.metrics is not None:
                self.metrics.spans_dropped.inc(left)
            log.warning("%d spans not exported at shutdown (the collector was too slow)", left)
        self.exporter.shutdown()


# --- OTLP spans without the SDK's per-span objects -----------------------------------------------
#
# Per decision the SDK builds a Span (attributes validated one by one), a ReadableSpan, and, in the
# export thread, its protobuf through pure-Python encoders: ~28 µs on the loop thread and ~85 µs
# in the export thread for each span, under the one GIL. With the OTLP/gRPC exporter that
# `tracer_provider_from_env` builds, a decision's span is instead a tuple on the loop thread and a
# few byte strings in the export thread (protobuf's wire format written directly, checked byte
# for byte against the SDK's encoder in tests/test_fast_spans.py); the stock exporter still sends
# it (endpoint, headers, TLS, compression, retries from the OTEL_* variables). The sampler, the id
# generator and the resource are the provider's. Spans with an error (an exception event) and
# any other exporter go the SDK's way.

_SPAN_LIMIT_VARS = (
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_ATTRIBUTE_COUNT_LIMIT", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
)  # fmt: skip


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), the length, the payload."""
    return tag + _varint(len(payload)) + payload


def _any_value(v: Any) -> bytes:
    """An AnyValue (a oneof: a default value is still written, as the SDK's encoder does)."""
    if isinstance(v, str):
        return _field(b"\x0a", v.encode("utf-8", "replace"))  # a lone surrogate cannot be sent
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + _varint(v & 0xFFFFFFFFFFFFFFFF)  # int64, two's complement
    if isinstance(v, float):
        return b"\x21" + struct.pack("<d", v)
    if isinstance(v, list | tuple):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(x)) for x in v))
    return _field(b"\x0a", str(v).encode("utf-8", "replace"))


# Attributes whose values repeat (the outcome, the policy's levels and rule ids, ...): their
# KeyValue encodings are kept, keyed by (name, type, value). Only export threads touch it.
_STABLE = frozenset(
    f"authz.{k}" for k in (
        "outcome", "reason", "http_status", "sensitivity", "required_assurance", "required_max_age",
        "presented_assurance", "issuer", "credential", "policy_version", "explain",
    )
) | {"http.request.method", "rpc.system"}  # fmt: skip
_STABLE_KV: dict[tuple[str, type, Any], bytes] = {}


_SCALARS = (str, bool, int, float)
_INT64 = range(-(2**63), 2**63)


def _encodable(v: Any) -> bool:
    """A value an OTLP attribute holds as the SDK sends it: text, a bool, an int64, a float, or
    a sequence of those."""
    t = type(v)
    if t is str or t is bool or t is float:
        return True
    if t is int:
        return v in _INT64
    if t is list or t is tuple:
        return all(type(x) in _SCALARS and (type(x) is not int or x in _INT64) for x in v)
    return False


def _key(keys: dict[str, bytes], k: str) -> bytes:
    key = keys.get(k)
    if key is None:
        key = _field(b"\x0a", k.encode("utf-8", "replace"))
        if len(keys) < 256:  # our attribute names: a handful
            keys[k] = key
    return key


def _encode_attrs(attrs: dict[str, Any], keys: dict[str, bytes], parts: list[bytes]) -> None:
    """Append the KeyValue fields of `attrs`, in order."""
    for k, v in attrs.items():
        if type(v) is str and k not in _STABLE:  # (a decision id, a subject: short text, mostly)
            vb = v.encode("utf-8", "replace")  # (as _any_value)
            key = _key(keys, k)
            n = len(vb)
            kv_len = len(key) + n + 4  # key, then the AnyValue field: tag, length, tag, length, text
            if kv_len < 0x80:  # every length fits one byte
                parts.append(b"\x4a" + bytes((kv_len,)) + key + bytes((0x12, n + 2, 0x0A, n)) + vb)
            else:
                parts.append(_field(b"\x4a", key + _field(b"\x12", _field(b"\x0a", vb))))
            continue
        if not _encodable(v):
            continue  # the SDK drops such an attribute too (None, a mapping, beyond int64)
        if k in _STABLE and type(v) in _SCALARS:
            ck = (k, type(v), v)  # the type too: True == 1 == 1.0 as dict keys
            kv = _STABLE_KV.get(ck)
            if kv is None:
                kv = _field(b"\x4a", _key(keys, k) + _field(b"\x12", _any_value(v)))
                if len(_STABLE_KV) >= 1024:  # bounded, though these values are few
                    _STABLE_KV.clear()
                _STABLE_KV[ck] = kv
            parts.append(kv)
        else:
            parts.append(_field(b"\x4a", _key(keys, k) + _field(b"\x12", _any_value(v))))


# id(a remembered decision's span attributes) -> (that dict, its KeyValue fields). Export threads.
# At most 1024 of at most 2 KB each, with their dicts (whose strings the decisions share).
_BLOCKS: dict[int, tuple[dict[str, Any], bytes]] = {}
_BLOCKS_MAX = 1024
_BLOCK_BYTES = 2048
_NAMES: dict[str, bytes] = {}  # a span name -> its field and the kind's
_IDS = struct.Struct(">HQQHQ")  # tag, trace id (two halves), tag, span id
_PARENT = struct.Struct(">HQ")
_TIMES = struct.Struct("<BQBQ")
_TAIL_REMOTE = b"\x7a\x00\x85\x01" + struct.pack("<I", 0x300)
_TAIL_LOCAL = b"\x7a\x00\x85\x01" + struct.pack("<I", 0x100)


class _FastSpan:
    """What the loop thread records of a sampled decision; encoded in the export thread."""

    __slots__ = (
        "attrs", "end", "name", "parent_id", "remote", "span_id", "start", "static", "trace_id",
        "trace_state",
    )  # fmt: skip

    def __init__(
        self, name: str, trace_id: int, span_id: int, parent_id: int, remote: bool, trace_state: str,
        start: int, end: int, attrs: dict[str, Any], static: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """`static`: attributes that come before `attrs`, the same dict object for many spans (a
        remembered decision's): encoded once."""
        self.name, self.trace_id, self.span_id, self.parent_id = name, trace_id, span_id, parent_id
        self.remote, self.trace_state, self.start, self.end = remote, trace_state, start, end
        self.attrs, self.static = attrs, static

    def encode(self, keys: dict[str, bytes]) -> bytes:
        """The Span message, field by field as opentelemetry-proto numbers them."""
        tid = self.trace_id
        if not 0 <= tid < 1 << 128:
            raise ValueError("a trace id is 128 bits")
        # trace_id (1) and span_id (2): bytes, big-endian as the ids read.
        parts = [_IDS.pack(0x0A10, tid >> 64, tid & 0xFFFFFFFFFFFFFFFF, 0x1208, self.span_id)]
        if self.trace_state:
            parts.append(_field(b"\x1a", self.trace_state.encode("utf-8", "replace")))
        if self.parent_id:
            parts.append(_PARENT.pack(0x2208, self.parent_id))
        name = _NAMES.get(self.name)
        if name is None:
            name = _field(b"\x2a", self.name.encode()) + b"\x30\x02"  # and kind: SPAN_KIND_SERVER
            if len(_NAMES) < 16:  # (our two span names)
                _NAMES[self.name] = name
        parts += (name, _TIMES.pack(0x39, self.start, 0x41, self.end))  # fixed64 start and end
        static = self.static
        if static is not None:
            hit = _BLOCKS.get(id(static))
            if hit is None or hit[0] is not static:
                block: list[bytes] = []
                _encode_attrs(static, keys, block)
                hit = (static, b"".join(block))
                if len(hit[1]) <= _BLOCK_BYTES:  # (a long subject's is not kept: bounded memory)
                    if len(_BLOCKS) >= _BLOCKS_MAX:
                        _BLOCKS.clear()
                    _BLOCKS[id(static)] = hit  # (holding the dict: its id is not reused meanwhile)
            parts.append(hit[1])
        _encode_attrs(self.attrs, keys, parts)
        # status: present and empty (UNSET), as the SDK writes it; flags: the parent is remote or not.
        parts.append(_TAIL_REMOTE if self.remote else _TAIL_LOCAL)
        return b"".join(parts)


class FastSpans:
    """Starts and ends a decision's span as the SDK would (same sampler, ids, parent, trace state)
    and queues it for a `BoundedSpanProcessor` whose exporter takes `_FastSpan`s."""

    def __init__(self, provider: TracerProvider, processor: BoundedSpanProcessor) -> None:
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.processor = processor
        try:
            self._rule = _sampling_rule(self.sampler)
        except AttributeError:  # an SDK whose samplers keep their settings elsewhere: ask them
            self._rule = None

    def record(
        self, name: str, parent: Parent | None, start_ns: int, end_ns: int, attrs: dict[str, Any],
        static: dict[str, Any] | None = None,
    ) -> tuple[int, int]:  # fmt: skip
        """The new span's trace id and span id (made, as the SDK makes them, also when the sampler
        drops it: the decision log names them). The span's attributes: `static`'s, then `attrs`'
        (`static`: the same dict object for many spans, never changed)."""
        rule = self._rule
        if rule is not None:  # (the SDK's sampler, as it would decide: no context objects)
            if type(parent) is _Remote:
                trace_id, parent_id = parent.trace_id, parent.span_id
                sampled = rule(bool(parent.flags & 1), trace_id)
            elif type(parent) is Context and not parent:  # no caller's context: a root span
                trace_id, parent_id = self.ids.generate_trace_id(), 0
                sampled = rule(None, trace_id)
            else:
                trace_id = 0
            if trace_id:
                span_id = self.ids.generate_span_id()
                if sampled:
                    self.processor.put(
                        _FastSpan(
                            name, trace_id, span_id, parent_id, parent_id != 0, "", start_ns, end_ns, attrs,
                            static,
                        )
                    )  # fmt: skip
                return trace_id, span_id
        merged = {**static, **attrs} if static else attrs
        return self._record(name, _as_context(parent), start_ns, end_ns, merged)

    def _record(
        self, name: str, parent: Context | None, start_ns: int, end_ns: int, attrs: dict[str, Any]
    ) -> tuple[int, int]:
        # As the SDK's tracer: no context means the current one (an ambient span is the parent).
        pctx: trace.SpanContext | None = trace.get_current_span(parent).get_span_context()
        if pctx is None or not pctx.is_valid:
            pctx = None
            trace_id = self.ids.generate_trace_id()
        else:
            trace_id = pctx.trace_id
        result = self.sampler.should_sample(parent, trace_id, name, SpanKind.SERVER, attrs, ())
        span_id = self.ids.generate_span_id()
        if result.decision.is_sampled():  # type: ignore[no-untyped-call]
            if result.attributes is not None and result.attributes is not attrs:
                attrs = dict(result.attributes)  # the span holds what the sampler returned
            ts = result.trace_state
            self.processor.put(
                _FastSpan(
                    name, trace_id, span_id, pctx.span_id if pctx else 0, bool(pctx and pctx.is_remote),
                    ",".join(f"{k}={v}" for k, v in ts.items()) if ts else "", start_ns, end_ns, attrs,
                )
            )  # fmt: skip
        return trace_id, span_id


def _fast_otlp_exporter() -> SpanExporter | None:
    """The stock OTLP/gRPC span exporter, able to send `_FastSpan`s too (None when the installed
    exporter lacks the hook this needs: then every span takes the SDK's way)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    if not (hasattr(OTLPSpanExporter, "_translate_data") and hasattr(OTLPSpanExporter, "_export")):
        return None

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    class _Batch(list):  # type: ignore[type-arg]
        request: Any = None

    def _serialize(request: Any) -> bytes:
        return request if type(request) is bytes else request.SerializeToString()

    class _RawStub:
        """TraceServiceStub's Export, sending a request encoded already as it is (not parsed
        into a message to be serialized again: 2 µs a span in the export thread)."""

        def __init__(self, channel: Any) -> None:
            self.Export = channel.unary_unary(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                request_serializer=_serialize,
                response_deserializer=ExportTraceServiceResponse.FromString,
            )

    class FastOTLPSpanExporter(OTLPSpanExporter):
        def __init__(self) -> None:
            super().__init__()
            self._keys: dict[str, bytes] = {}
            self._head: tuple[bytes, bytes, bytes, bytes] | None = None
            self.resource = Resource.create({})
            # The exporter makes its client from `_stub` (and again when it reconnects).
            self._raw = None not in (getattr(self, "_stub", None), getattr(self, "_channel", None))
            if self._raw:
                self._stub = _RawStub
                self._client = _RawStub(self._channel)  # type: ignore[assignment]

        def _translate_data(self, data: Any) -> Any:
            if isinstance(data, _Batch):
                return data.request
            return super()._translate_data(data)

        def export_fast(self, spans: list[_FastSpan]) -> Any:
            if self._head is None:
                self._head = request_head(self.resource)
            batch = _Batch(spans)
            data = encode_request(self._head, spans, self._keys)
            batch.request = data if self._raw else ExportTraceServiceRequest.FromString(data)
            return self._export(batch)

    return FastOTLPSpanExporter()


def encode_request(
    head: tuple[bytes, bytes, bytes, bytes], spans: list[_FastSpan], keys: dict[str, bytes]
) -> bytes:
    """An ExportTraceServiceRequest: one resource, one scope, the spans (`head`: request_head)."""
    res, scope, scope_schema, res_schema = head
    encoded = []
    for s in spans:
        try:
            encoded.append(_field(b"\x12", s.encode(keys)))
        except Exception as e:  # one span that cannot be encoded does not cost the batch
            log_internal_error("could not encode a span; it is dropped", e)
    scope_spans = scope + b"".join(encoded) + scope_schema
    return _field(b"\x0a", res + _field(b"\x12", scope_spans) + res_schema)


def request_head(resource: Resource) -> tuple[bytes, bytes, bytes, bytes]:
    """The resource and instrumentation scope parts of an export request, as the SDK's encoder
    writes them (taken from its encoding of one template span)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    template = ReadableSpan(
        name="template", context=trace.SpanContext(1, 1, False), resource=resource,
        instrumentation_scope=InstrumentationScope("stepup-sidecar", __version__),
    )  # fmt: skip
    rs = encode_spans([template]).resource_spans[0]
    ss = rs.scope_spans[0]
    res = _field(b"\x0a", rs.resource.SerializeToString()) if rs.HasField("resource") else b""
    scope = _field(b"\x0a", ss.scope.SerializeToString()) if ss.HasField("scope") else b""
    scope_schema = _field(b"\x1a", ss.schema_url.encode()) if ss.schema_url else b""
    res_schema = _field(b"\x1a", rs.schema_url.encode()) if rs.schema_url else b""
    return res, scope, scope_schema, res_schema


class LineWriter:
    """The decision log's writer: whole lines, written in chunks of at most PIPE_BUF bytes, so that
    lines from several processes (workers) sharing one stdout pipe never interleave mid-line.
    Buffered; `flush` (every half second, and at exit) writes what is there."""

    CHUNK = 4096  # PIPE_BUF on Linux: a write of at most this many bytes to a pipe is atomic

    def __init__(self, fd: int, *, immediate: bool = False) -> None:
        """`immediate`: write each line at once (stderr's habit), not at the next flush."""
        self._fd = fd
        self._immediate = immediate
        self._lines: list[bytes] = []
        self._size = 0

    def write(self, line: str) -> int:
        data = line.encode("utf-8", "surrogateescape")
        if self._size + len(data) > self.CHUNK:
            self.flush()
        self._lines.append(data)
        self._size += len(data)
        if self._immediate:
            self.flush()
        return len(line)

    def flush(self) -> None:
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines, self._size = [], 0
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            pass  # a closed stdout must not stop decisions


_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25, 0.5)


class _Tally:
    """A counter's increments as a plain integer (`n += 1` on the hot path: a prometheus child's
    inc takes a lock and costs ~0.4 µs); `Metrics.flush` adds them to the child."""

    __slots__ = ("child", "n", "synced")

    def __init__(self, child: Any) -> None:
        self.n = 0
        self.child = child
        self.synced = 0


def _histogram_parts(h: Any) -> bool:
    """Whether `h` keeps one value per bucket and a sum as `Metrics.flush` adds to them."""
    buckets, total = getattr(h, "_buckets", None), getattr(h, "_sum", None)
    return (
        isinstance(buckets, list) and len(buckets) == len(_LATENCY_BUCKETS) + 1
        and all(hasattr(b, "inc") for b in buckets) and hasattr(total, "inc")
    )  # fmt: skip


class _FlushFirst:
    """Registered first in a Metrics registry: every collection (a scrape, `get_sample_value`)
    flushes the tallies before the counters are read, so a scrape is never behind."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> list[Any]:
        self.metrics.flush()
        return []

    def describe(self) -> list[Any]:
        return []


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # The per-Check counters and the latency histogram are counted as plain numbers and
        # flushed into prometheus on every collection and every half second (workers: their
        # scrape is the supervisor's, of the files the flush writes).
        self._flush_lock = threading.Lock()
        self._tally_of: dict[tuple[int, tuple[str, ...]], _Tally] = {}
        self.latency_counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last: above every bound
        self.latency_sum = 0.0
        self._latency_synced = [0] * len(self.latency_counts)
        self._latency_sum_synced = 0.0
        self.registry.register(_FlushFirst(self))
        self.decisions = Counter(
            "stepup_decisions",
            "Check decisions by outcome and reason",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.by_sensitivity = Counter(
            "stepup_decisions_by_sensitivity",
            "Check decisions by the operation's sensitivity level (none: no rule matched) and outcome",
            ["sensitivity", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "stepup_check_duration_seconds",
            "Time to decide one Check (in the sidecar)",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # The flush adds to the histogram's own per-bucket values; a prometheus-client without
        # them (as this one has them) gets each observation as it is made.
        self._observe_direct = not _histogram_parts(self.latency)
        self.token_cache = Counter(
            "stepup_token_cache",
            "Bearer tokens found already verified (hit) or not (miss)",
            ["result"],
            registry=self.registry,
        )
        self.decision_cache = Counter(
            "stepup_decision_cache",
            "Checks that could be answered from the decision cache: reused (hit) or decided (miss)",
            ["result"],
            registry=self.registry,
        )
        self.jwks_fetches = Counter(
            "stepup_jwks_fetches",
            "JWKS fetches by issuer id and result (ok, failed)",
            ["issuer", "result"],
            registry=self.registry,
        )
        self.policy_info = Gauge(
            "stepup_policy_info",
            "The loaded policies (role active or candidate): 1 for each, by name, version and hash",
            ["role", "name", "version", "hash"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self._synced: dict[Any, int] = {}
        self._info: set[tuple[str, str, str, str]] = set()
        self.reloads = Counter(
            "stepup_policy_reloads", "Policy reload attempts by result", ["result"], registry=self.registry
        )
        self.internal_errors = Counter(
            "stepup_internal_errors", "Checks denied because of an unexpected error", registry=self.registry
        )
        self.spans_dropped = Counter(
            "stepup_spans_dropped", "Spans dropped because the export queue was full", registry=self.registry
        )
        self.explains = Counter(
            "stepup_explains", "Explain calls (decided like a Check, not enforced)", registry=self.registry
        )
        self.shadow_disagreements = Counter(
            "stepup_shadow_disagreements",
            "Checks a shadow rule would have answered otherwise, by rule and its outcome",
            ["rule", "would"],
            registry=self.registry,
        )
        self.candidate_disagreements = Counter(
            "stepup_candidate_disagreements",
            "Checks the candidate policy would have answered otherwise",
            ["active", "candidate", "reason"],
            registry=self.registry,
        )
        self.candidate_reloads = Counter(
            "stepup_candidate_reloads", "Candidate policy load attempts by result", ["result"],
            registry=self.registry,
        )  # fmt: skip
        self.span_export_failures = Counter(
            "stepup_span_export_failures", "Span batches the exporter failed to send", registry=self.registry
        )


    def tally(self, metric: Any, *labels: str) -> _Tally:
        """The tally of `metric`'s child with these labels (one per child, kept)."""
        key = (id(metric), labels)
        t = self._tally_of.get(key)
        if t is None:
            t = self._tally_of[key] = _Tally(metric.labels(*labels) if labels else metric)
        return t

    def observe_latency(self, seconds: float) -> None:
        """As `latency.observe`: the first bucket whose bound is at least `seconds`."""
        if self._observe_direct:
            self.latency.observe(seconds)
            return
        self.latency_counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def flush(self) -> None:
        """Add what the tallies and the latency counts gained since the last flush to the
        prometheus metrics (from the loop's half-second task and from a scrape's thread: one at
        a time; the hot path only ever adds to the tallies)."""
        with self._flush_lock:
            for t in list(self._tally_of.values()):  # (a copy: the loop thread may add one)
                n = t.n
                if n != t.synced:
                    t.child.inc(n - t.synced)
                    t.synced = n
            h = self.latency
            counts, synced = self.latency_counts, self._latency_synced
            for i, c in enumerate(counts):
                if c != synced[i]:
                    h._buckets[i].inc(c - synced[i])  # (Histogram.observe's own per-bucket values)
                    synced[i] = c
            total = self.latency_sum
            if total != self._latency_sum_synced:
                h._sum.inc(total - self._latency_sum_synced)
                self._latency_sum_synced = total

    def sync(
        self, verifier: Any, policies: Mapping[str, Any], decision_cache: tuple[int, int] = (0, 0)
    ) -> None:
        """Bring the counters kept as plain integers (token cache, decision cache, JWKS fetches)
        and the policy info up to date: called every half second, so the hot path never touches
        them."""
        self.flush()
        self._add(self.token_cache.labels("hit"), ("hit",), verifier.hits)
        self._add(self.token_cache.labels("miss"), ("miss",), verifier.misses)
        self._add(self.decision_cache.labels("hit"), ("decision", "hit"), decision_cache[0])
        self._add(self.decision_cache.labels("miss"), ("decision", "miss"), decision_cache[1])
        info = set()
        for role, policy in policies.items():
            if policy is None:
                continue
            info.add((role, policy.name, policy.version, policy.version.rpartition("@")[2]))
            for issuer in policy.issuers:
                keys = issuer.keys
                if hasattr(keys, "fetch_failures"):
                    for result, total in (("ok", keys.fetches), ("failed", keys.fetch_failures)):
                        self._add(self.jwks_fetches.labels(issuer.id, result), (id(keys), result), total)
        for gone in self._info - info:
            self.policy_info.labels(*gone).set(0)
        for now in info - self._info:
            self.policy_info.labels(*now).set(1)
        self._info = info

    def _add(self, counter: Any, key: Any, total: int) -> None:
        delta = total - self._synced.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._synced[key] = total


class Telemetry:
    """Records each decision as a span, a JSON log line and metrics."""

    def __init__(
        self,
        provider: trace.TracerProvider | None = None,
        *,
        decision_log: IO[str] | LineWriter | None = sys.stdout,
        metrics: Metrics | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.provider = provider
        self.tracer = (provider or trace.NoOpTracerProvider()).get_tracer("stepup-sidecar", __version__)
        self.propagator = propagator or build_propagator()
        self._w3c_first = type(self.propagator) is _DefaultPropagator
        self.decision_log = decision_log
        self.metrics = metrics or Metrics()
        self._by_sensitivity: dict[tuple[str, str], Any] = {}
        self._explains = self.metrics.tally(self.metrics.explains)
        self._children: dict[tuple[Any, ...], Any] = {}
        self._static: dict[int, _Static] = {}  # id(decision) -> what record takes from it
        self._tracing = provider is not None
        self._fast = provider.fast if isinstance(provider, StepupTracerProvider) else None
        # The share of allowed decisions written to the decision log (denials, step-ups and
        # disagreements always are); a sampled line carries "sample_rate".
        self.sample_allowed = 1.0

    @property
    def tracing(self) -> bool:
        return self._tracing

    def parent(self, carrier: Mapping[str, str]) -> Parent:
        """The caller's trace context: the propagator's, or for the default propagator and a
        plain version-00 traceparent (no tracestate), the same read without its objects."""
        if self._w3c_first and "tracestate" not in carrier:
            tp = carrier.get("traceparent")
            plain = _plain_traceparent(tp) if tp is not None else None
            if plain is not None:
                return _Remote(int(plain[0], 16), int(plain[1], 16), int(plain[2], 16))
        return self.propagator.extract(carrier)

    def record(
        self,
        *,
        decision: Decision,
        attrs: RequestAttributes | None,
        decision_id: str,
        policy_version: str,
        start_ns: int,
        parent: Parent | None,
        error: BaseException | None = None,
        explain: bool = False,
        ids: tuple[str, str] = ("", ""),
        shadow: tuple[Any, ...] = (),
        candidate: Decision | None = None,
        candidate_version: str = "",
        remember: bool = False,
    ) -> None:
        """`parent`: the caller's trace context, when tracing; `ids`: the caller's trace and span
        ids when not (read straight off the headers: no OpenTelemetry context work then).
        `shadow`: the shadow rules that would have answered otherwise; `candidate`: the candidate
        policy's decision, when one is loaded. `remember`: the engine's cache holds `decision`
        (and answers with that very object again), so what the line, the span and the counters
        take from it is remembered with it (`is` proves a hit is that object: the entry holds
        it, so its id is not reused meanwhile)."""
        static = self._static.get(id(decision)) if remember else None
        if static is None or static.decision is not decision or static.policy_version != policy_version:
            static = self._derive(decision, policy_version, remember)
        shadow_part = candidate_part = sample_part = ""
        disagrees = cand_differs = False
        if shadow or candidate is not None:
            shadow_part, candidate_part, cand_differs = self._beside(
                decision, shadow, candidate, candidate_version
            )
            disagrees = bool(shadow) or cand_differs
        # The method is request content: only a valid method token goes to the span and the log.
        method = attrs.method if attrs is not None and valid_method(attrs.method) else ""
        ctx: trace.SpanContext | None = None
        end_ns = time.time_ns()
        if self._tracing:
            # The decision's own attributes (the same dict for a remembered decision), then these.
            span_attrs: dict[str, Any] = {"authz.decision_id": decision_id}
            if attrs is not None:
                span_attrs["http.request.method"] = method
                span_attrs["rpc.system"] = "grpc" if attrs.is_grpc else "http"
            if explain:
                span_attrs["authz.explain"] = True
            if shadow:
                span_attrs["authz.shadow.rules"] = [r.rule for r in shadow]
                span_attrs["authz.shadow.outcomes"] = [r.outcome for r in shadow]
                span_attrs["authz.shadow.reasons"] = [r.reason for r in shadow]
            if candidate is not None:
                span_attrs["authz.candidate.outcome"] = candidate.outcome.value
                span_attrs["authz.candidate.reason"] = candidate.reason
                span_attrs["authz.candidate.policy_version"] = candidate_version
                span_attrs["authz.candidate.agrees"] = not cand_differs
            name = EXPLAIN_SPAN_NAME if explain else SPAN_NAME
            if self._fast is not None and error is None:
                fast = self._fast
                if remember:
                    tid, sid = fast.record(name, parent, start_ns, end_ns, span_attrs, static.span_attrs)
                else:
                    merged = {**static.span_attrs, **span_attrs}
                    tid, sid = fast.record(name, parent, start_ns, end_ns, merged)
                ids = (format(tid, "032x"), format(sid, "016x"))
            else:
                # The decision id first, as ever: with a count limit the SDK drops the oldest.
                span_attrs = {"authz.decision_id": decision_id, **static.span_attrs, **span_attrs}
                span = self.tracer.start_span(
                    name, context=_as_context(parent), kind=SpanKind.SERVER, start_time=start_ns,
                    attributes=span_attrs,
                )  # fmt: skip
                if error is not None:
                    # The exception's type only: its message and stack trace can quote request
                    # content (a header, the token), as log_internal_error knows.
                    span.add_event("exception", {"exception.type": type(error).__name__})
                    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                span.end(end_time=end_ns)
                ctx = span.get_span_context()
        elif parent is not None:
            ctx = trace.get_current_span(_as_context(parent)).get_span_context()
        duration = max(0, end_ns - start_ns) / 1e9  # the wall clock may step back meanwhile
        if explain:
            self._explains.n += 1
        else:
            static.by_reason.n += 1
            static.by_sensitivity.n += 1
            self.metrics.observe_latency(duration)
        if self.decision_log is not None and (
            self.sample_allowed >= 1.0 or not decision.allowed or disagrees or explain or self._sampled()
        ):
            if self.sample_allowed < 1.0 and decision.allowed and not (disagrees or explain):
                sample_part = f',"sample_rate":{self.sample_allowed}'
            if ctx is not None and ctx.is_valid:
                trace_id, span_id = format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
            else:
                trace_id, span_id = ids
            self.decision_log.write(
                decision_line(
                    end_ns, trace_id, span_id, static.fields, method, attrs.is_grpc if attrs else False,
                    duration, explain, type(error).__name__ if error is not None else "", shadow_part,
                    candidate_part, sample_part, static.middle, decision_id,
                )
            )

    def _derive(self, decision: Decision, policy_version: str, remember: bool) -> _Static:
        fields = decision_fields(decision, "", policy_version)
        del fields["decision_id"]
        key = (decision.outcome.value, decision.reason)
        by_reason = self.metrics.tally(self.metrics.decisions, *key)  # (reasons: a fixed registry)
        key = (decision.sensitivity or "none", decision.outcome.value)
        by_sensitivity = self._by_sensitivity.get(key)
        if by_sensitivity is None:
            if len(self._by_sensitivity) >= 1024:  # levels are the policy's: few, but bounded
                key = ("other", key[1])
            by_sensitivity = self._by_sensitivity[key] = self.metrics.tally(self.metrics.by_sensitivity, *key)
        static = _Static(
            decision,
            policy_version,
            fields,
            # (Only what record uses: span attributes when tracing, the line's part when logging.)
            {f"authz.{k}": v for k, v in fields.items() if v != "" and v != []} if self._tracing else {},
            _decision_middle(fields, False) if self.decision_log is not None else "",
            by_reason,
            by_sensitivity,
        )
        if remember:
            if len(self._static) >= _STATIC_MAX:
                self._static.clear()
            self._static[id(decision)] = static
        return static

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """A labelled child, remembered (label values here come from the policy and the reason
        registry: bounded)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _sampled(self) -> bool:
        return random.random() < self.sample_allowed  # noqa: S311 (sampling, not secrecy)

    def _beside(
        self, decision: Decision, shadow: tuple[Any, ...], candidate: Decision | None, version: str
    ) -> tuple[str, str, bool]:
        """Count the shadow rules' and the candidate's disagreements; their decision-log fields
        (shadow, candidate) and whether the candidate disagrees."""
        m = self.metrics
        shadow_part = candidate_part = ""
        if shadow:
            for r in shadow:
                self._child(m.shadow_disagreements, (r.rule, r.outcome)).inc()
            items = ",".join(
                f'{{"rule":{_str(r.rule)},"table":"{r.table}","outcome":"{r.outcome}","reason":"{r.reason}"}}'
                for r in shadow
            )
            shadow_part = f',"shadow":[{items}]'
        differs = False
        if candidate is not None:
            differs = not same_answer(decision, candidate)
            if differs:
                key = (decision.outcome.value, candidate.outcome.value, candidate.reason)
                self._child(m.candidate_disagreements, key).inc()
            candidate_part = (
                f',"candidate":{{"outcome":"{candidate.outcome.value}","reason":"{candidate.reason}",'
                f'"http_status":{candidate.http_status},"policy_version":{_cap(version)},'
                f'"agrees":{"false" if differs else "true"}}}'
            )
        return shadow_part, candidate_part, differs

    def flush(self) -> None:
        if self.decision_log is not None:
            try:
                self.decision_log.flush()
            except (OSError, ValueError):
                pass

    def shutdown(self) -> None:
        self.flush()
        self.metrics.flush()  # (a worker's last counts reach its metrics file)
        if isinstance(self.provider, TracerProvider):
            self.provider.shutdown()


_str = json.encoder.encode_basestring_ascii  # C: "..." with escapes

_STATIC_MAX = 4096  # decisions whose line part, span attributes and counters are remembered


@dataclass(slots=True)  # (not frozen: a frozen dataclass's __init__ costs a microsecond more)
class _Static:
    """What `Telemetry.record` takes from one Decision object, whatever the call."""

    decision: Decision
    policy_version: str
    fields: dict[str, Any]  # decision_fields but the decision id
    span_attrs: dict[str, Any]  # authz.<field> for the non-empty ones but the decision id
    middle: str  # _decision_middle(fields, False)
    by_reason: _Tally  # of the decisions counters' labelled children
    by_sensitivity: _Tally

LINE_LIMIT = 4096  # LineWriter.CHUNK: a longer line could tear between workers sharing a pipe
FIELD_CHARS = 256  # a string from a token, a peer or a request is cut after this many characters


def _cap(s: str) -> str:
    """`_str(s)`, cut (marked with a trailing "…") so that it takes at most 512 bytes escaped: a
    subject, principal or method is the caller's or a peer's to choose, and a long one must not
    make the line longer than a pipe writes at once (red-team F7)."""
    if len(s) <= FIELD_CHARS:
        e = _str(s)
        if len(e) <= 512:
            return e
    e = _str(s[:FIELD_CHARS] + "…")
    return e if len(e) <= 512 else _str(s[:40] + "…")  # \ud83d\ude00 is 12 bytes a character


def decision_line(
    end_ns: int,
    trace_id: str,
    span_id: str,
    f: dict[str, Any],
    method: str,
    grpc: bool,
    duration: float,
    explain: bool,
    error: str,
    beside: str = "",
    candidate: str = "",
    sample: str = "",
    middle: str = "",
    decision_id: str = "",
) -> str:
    """The decision log line: the JSON `json.dumps` would write for these fields, built directly
    (it is written for every Check). Strings from a token or a peer are escaped; the others are
    policy ids, codes and hex that need no escaping, but go through the same escaper anyway where
    a policy author could have chosen them. `beside`, `candidate`, `sample`: the shadow rules',
    the candidate policy's and the sampling fields (each "" or ',"key":...').

    At most LINE_LIMIT bytes (every escape is ASCII, so characters are bytes). A line that would
    be longer loses, in this order and only as far as needed, and then says `truncated: true`:
    the shadow details; then rule lists beyond four ids each, ids beyond 64 characters and
    strings beyond 16; then the candidate's details. The decision and `sample_rate` always stay.
    `middle`: `_decision_middle(f, False)` when the caller has it already; `decision_id`: when `f`
    has none."""
    did = decision_id or f["decision_id"]
    line = _decision_body(
        end_ns, trace_id, span_id, f, method, grpc, duration, explain, error, False, middle, did
    )
    if len(line) + len(beside) + len(candidate) + len(sample) + 2 <= LINE_LIMIT:
        return line + beside + candidate + sample + "}\n"
    tail = ',"truncated":true}\n'
    if len(line) + len(candidate) + len(sample) + len(tail) <= LINE_LIMIT:
        return line + candidate + sample + tail
    line = _decision_body(end_ns, trace_id, span_id, f, method, grpc, duration, explain, error, True, "", did)
    if len(line) + len(candidate) + len(sample) + len(tail) <= LINE_LIMIT:
        return line + candidate + sample + tail
    return line + sample + tail  # short: at most ~2,000 bytes whatever the policy and the caller


_METHOD_TEXT: dict[str, str] = {}  # method -> _cap(method)

_COMPACT_CHARS = 16  # a string's characters in a compact line (at most 12 escaped bytes each)
_COMPACT_RULES = 4  # rule ids per list in a compact line


def _short(s: str) -> str:
    """`_str(s)` of at most _COMPACT_CHARS characters (a trailing "…" when cut)."""
    return _str(s if len(s) <= _COMPACT_CHARS else s[:_COMPACT_CHARS] + "…")


def _short_ids(ids: list[str]) -> str:
    return ",".join(_str(r if len(r) <= 64 else r[:64] + "…") for r in ids[:_COMPACT_RULES])


def _decision_body(
    end_ns: int, trace_id: str, span_id: str, f: dict[str, Any], method: str, grpc: bool, duration: float,
    explain: bool, error: str, compact: bool, middle: str, decision_id: str,
) -> str:  # fmt: skip
    """The line without its closing brace; `compact`: the short form `decision_line` falls back to."""
    cap = _short if compact else _cap
    if compact or not middle:
        middle = _decision_middle(f, compact)
    method_text = _short(method) if compact else _METHOD_TEXT.get(method)
    if method_text is None:
        method_text = _cap(method)
        if len(method) <= 32:  # remembered: at most 256 short ones (emptied when full)
            if len(_METHOD_TEXT) >= 256:
                _METHOD_TEXT.clear()
            _METHOD_TEXT[method] = method_text
    extra = ',"explain":true' if explain else ""
    if error:
        extra += ',"error":' + cap(error)
    # Both numbers from integers: float rounding and repr cost microseconds on a cold cache.
    us = (end_ns + 500) // 1000
    tenths = round(duration * 1e7)
    ts = "%d.%06d" % divmod(us, 1_000_000)  # noqa: UP031 (an f-string format spec costs twice as much)
    return (
        f'{{"ts":{ts},"event":"decision","trace_id":"{trace_id}",'
        f'"span_id":"{span_id}","decision_id":"{decision_id}",{middle}'
        f'"method":{method_text},"grpc":{"true" if grpc else "false"},'
        f'"duration_us":{tenths // 10}.{tenths % 10}{extra}'
    )


def _decision_middle(f: dict[str, Any], compact: bool) -> str:
    """The part of the line that is the decision's own (outcome ... policy_version, and a comma)."""
    cap = _short if compact else _cap
    if compact:
        rules, risk = _short_ids(f["rules"]), _short_ids(f["risk_rules"])
        text: Callable[[str], str] = _short
    else:
        rules = ",".join(_str(r) for r in f["rules"])
        risk = ",".join(_str(r) for r in f["risk_rules"])
        text = _str
    return (
        f'"outcome":"{f["outcome"]}","reason":"{f["reason"]}",'
        f'"http_status":{f["http_status"]},"rules":[{rules}],"sensitivity":{text(f["sensitivity"])},'
        f'"required_assurance":{text(f["required_assurance"])},"required_max_age":{f["required_max_age"]},'
        f'"risk_rules":[{risk}],"presented_assurance":{text(f["presented_assurance"])},'
        f'"subject":{cap(f["subject"])},"issuer":{cap(f["issuer"])},"principal":{cap(f["principal"])},'
        f'"credential":"{f["credential"]}","policy_version":{text(f["policy_version"])},'
    )


def trace_ids(headers: Mapping[str, str]) -> tuple[str, str]:
    """The caller's trace and span ids straight off the headers (W3C traceparent, else B3), for
    the decision log when nothing is traced; ("", "") when there are none or they are malformed."""
    tp = headers.get("traceparent")
    if tp is not None:
        plain = _plain_traceparent(tp)  # (the common case: the ids are the header's own hex)
        if plain is not None:
            return plain[0], plain[1]
        # Anything else as OpenTelemetry reads it (the traced path's reading): a later version
        # with more fields, surrounding blanks; version ff, 00 with more fields, upper case: none.
        sc = trace.get_current_span(_DefaultPropagator._W3C.extract({"traceparent": tp})).get_span_context()
        return (format(sc.trace_id, "032x"), format(sc.span_id, "016x")) if sc.is_valid else ("", "")
    b3 = headers.get("b3")
    if b3 is not None:
        parts = b3.lower().split("-")  # (B3 hex is read in either case, as OpenTelemetry reads it)
        if len(parts) >= 2 and len(parts[0]) in (16, 32) and len(parts[1]) == 16:
            tid, sid = parts[0].rjust(32, "0"), parts[1]
            if _HEX.issuperset(tid) and _HEX.issuperset(sid) and int(tid, 16) and int(sid, 16):
                return tid, sid
        return "", ""
    tid, sid = headers.get("x-b3-traceid", "").lower(), headers.get("x-b3-spanid", "").lower()
    if len(tid) in (16, 32) and len(sid) == 16:
        tid = tid.rjust(32, "0")
        if _HEX.issuperset(tid) and _HEX.issuperset(sid) and int(tid, 16) and int(sid, 16):
            return tid, sid
    return "", ""


def decision_fields(d: Decision, decision_id: str, policy_version: str) -> dict[str, Any]:
    """The fields shared by span (as authz.<name>) and decision log. Nothing secret goes here."""
    req = d.requirement
    ident = d.identity
    return {
        "decision_id": decision_id,
        "outcome": d.outcome.value,
        "reason": d.reason,
        "http_status": d.http_status,
        "rules": list(d.matched_rules),
        "sensitivity": d.sensitivity,
        "required_assurance": d.required_assurance,
        "required_max_age": req.max_age if req is not None and req.max_age is not None else -1,
        "risk_rules": list(req.risk_rules) if req is not None else [],
        "presented_assurance": d.presented_assurance,
        "subject": ident.subject if ident is not None else "",
        "issuer": ident.issuer if ident is not None else "",
        "principal": ident.principal if ident is not None else "",
        "credential": ident.credential if ident is not None else "none",
        "policy_version": policy_version,
    }
