"""OpenTelemetry traces, off unless the standard `OTEL_*` variables turn them on.

`configure_tracing(service_name)` is called once at the start of a process (the API, the
worker). It does nothing — no provider, no exporter, no instrumentation — unless
`OTEL_TRACES_EXPORTER` or `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is set (and
`OTEL_SDK_DISABLED` is not `true`). Then spans go over OTLP/HTTP (`http/protobuf`) to the
endpoint, batched; the SDK reads the other standard variables itself (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_BSP_*`, …). An empty variable counts as unset, as the specification says.

While tracing is on, what the process builds is instrumented where it is built:

- the FastAPI app, with FastAPI's own telemetry (`fastapi_telemetry`): a server span per
  request, except `/healthz` and `/readyz`, with the request's correlation id
  (`set_correlation_id`), and a span for each step of its handling;
- every Temporal client (`temporal_interceptors`, added by `upsertflow.temporal.connect`):
  the SDK's `TracingInterceptor` carries the trace into the workflow and its activities,
  so a PUT, its workflow run and each activity are one trace;
- every database engine (`instrument_engine`) and the worker's HTTP client of the
  enrichment service (`instrument_http_client`).

No payload data leaves in a span: SQL statements carry placeholders, never parameters;
no request or response body and no header is recorded. On every span, `ScrubbingExporter`
also cuts query strings from URLs (and drops `url.query`), cuts an outgoing request's URL
to its origin, and keeps of an error its type and status, never its message or stack
trace (which can quote values, as `upsertflow.logs` explains). Attribute values are
bounded (`DEFAULT_ATTRIBUTE_LENGTH`). Log lines written while a span is current carry its
`trace_id` and `span_id` (`add_trace_ids`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind, Status

if TYPE_CHECKING:
    import httpx
    from fastapi.telemetry import TelemetryConfig
    from sqlalchemy.ext.asyncio import AsyncEngine
    from structlog.typing import EventDict
    from temporalio.client import Interceptor

log = logging.getLogger("upsertflow.tracing")

#: Paths never traced: probes, called every few seconds.
PROBES = frozenset({"/healthz", "/readyz"})
#: The request span's attribute holding the request's correlation id (`X-Correlation-ID`).
CORRELATION_ID_ATTRIBUTE = "upsertflow.correlation_id"
#: Longest attribute value (a long SQL statement is cut), unless `OTEL_*_LENGTH_LIMIT` says.
DEFAULT_ATTRIBUTE_LENGTH = 2048
#: Attributes holding a URL or a request target: their query string is cut (more of an
#: outgoing request's: `scrubbed`).
_URL_ATTRIBUTES = ("http.url", "url.full", "http.target")
#: Attributes of an outgoing request dropped with its path.
_PATH_ATTRIBUTES = frozenset({"url.path", "http.target"})
#: Attributes never exported.
_DROPPED_ATTRIBUTES = frozenset({"url.query"})
#: What an exception event keeps.
_EXCEPTION_EVENT_KEPT = frozenset({"exception.type", "exception.escaped"})
_EXPORTERS = {"otlp", "console"}


class TracingConfigError(ValueError):
    """The `OTEL_*` variables ask for something upsertflow does not do."""


@dataclass
class Tracing:
    """Tracing as configured for this process; `shutdown()` exports what is left."""

    provider: TracerProvider

    def shutdown(self) -> None:
        """Export the spans still buffered, then stop tracing what is built from now on."""
        global _active
        if _active is self:
            _active = None
        self.provider.shutdown()


_active: Tracing | None = None
_global_provider_set = False


def _variable(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the `OTEL_*` variables turn tracing on (off when none is set)."""
    env = os.environ if env is None else env
    if _variable(env, "OTEL_SDK_DISABLED").lower() == "true":
        return False
    exporters = _variable(env, "OTEL_TRACES_EXPORTER").lower()
    if exporters == "none":
        return False
    return bool(
        exporters
        or _variable(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
        or _variable(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(service_name: str, *, exporter: SpanExporter | None = None) -> Tracing | None:
    """Configure tracing for this process from the `OTEL_*` variables; None if they leave it off.

    `service_name` is the default of `OTEL_SERVICE_NAME`. `exporter` (for tests) turns
    tracing on whatever the variables say and receives every span as it ends; the
    process's global tracer provider is then left as it is.
    Raises `TracingConfigError` for an exporter or protocol upsertflow does not ship.
    """
    global _active, _global_provider_set
    if exporter is None and not tracing_requested():
        return None
    # The SDK reads os.environ itself, and not every reader takes "" for unset.
    for name in [n for n, v in os.environ.items() if n.startswith("OTEL_") and not v.strip()]:
        del os.environ[name]
    resource = Resource.create()
    attributes: dict[str, str] = {}
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        attributes[SERVICE_NAME] = service_name
    if SERVICE_VERSION not in resource.attributes:
        attributes[SERVICE_VERSION] = _version()
    limited = {"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"}
    limits = (
        SpanLimits()
        if limited & set(os.environ)
        else SpanLimits(max_attribute_length=DEFAULT_ATTRIBUTE_LENGTH)
    )
    provider = TracerProvider(resource=resource.merge(Resource(attributes)), span_limits=limits)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(ScrubbingExporter(exporter)))
    else:
        for each in _exporters_from_env():
            provider.add_span_processor(BatchSpanProcessor(ScrubbingExporter(each)))
    if exporter is None and not _global_provider_set:
        # For any other code that traces through the global API (ours is handed `provider`).
        # Once per process: the API refuses a second, so tests leave it alone.
        trace.set_tracer_provider(provider)
        _global_provider_set = True
    _active = Tracing(provider)
    log.info(
        "tracing on: service %s",
        provider.resource.attributes.get(SERVICE_NAME),
        extra={"endpoint": _endpoint() if exporter is None else "in-process"},
    )
    return _active


def _version() -> str:
    try:
        return metadata.version("upsertflow")
    except metadata.PackageNotFoundError:
        return "unknown"


def _endpoint() -> str:
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"
    )


def _exporters_from_env() -> list[SpanExporter]:
    """The exporters `OTEL_TRACES_EXPORTER` names (`otlp` by default, `console`)."""
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    unknown = sorted(set(names) - _EXPORTERS - {""})
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={','.join(unknown)}: upsertflow exports traces with "
            "`otlp` (OTLP over HTTP) or `console`"
        )
    exporters: list[SpanExporter] = []
    if "otlp" in names:
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        )
        if protocol != "http/protobuf":
            raise TracingConfigError(
                f"OTLP protocol {protocol!r}: upsertflow exports traces over http/protobuf "
                "only (a collector's port 4318)"
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter())
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    return exporters


def active() -> Tracing | None:
    """This process's tracing, if it is on."""
    return _active


# ---------------------------------------------------------------- instrumentation


def fastapi_telemetry() -> TelemetryConfig:
    """The `telemetry=` of the API's `FastAPI(...)`: FastAPI's own tracing, ours or none.

    With tracing on: a server span per request (not the probes), and a span for each of
    its steps (dependencies, endpoint, serialization) — no metrics (Prometheus has them)
    and no OpenTelemetry logs (they would carry exception messages). Off: nothing, even
    where some other code has set a global tracer provider.
    """
    off: TelemetryConfig = {
        "tracing": False,
        "metrics": False,
        "logs": False,
        "auto_configure": False,
    }
    if _active is None:
        return off
    return {**off, "tracing": True, "tracer_provider": _active.provider, "exclude": _is_probe}


def _is_probe(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in PROBES


def set_correlation_id(correlation_id: str) -> None:
    """Put the request's correlation id on its span (nothing when no span records)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(CORRELATION_ID_ATTRIBUTE, correlation_id)


def temporal_interceptors() -> list[Interceptor]:
    """The Temporal client interceptors of a process with tracing on (none otherwise).

    On a client they trace its calls and, on a worker built from that client, its
    workflows and activities: a workflow started under a span continues its trace.
    """
    if _active is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(_active.provider.get_tracer("temporalio.contrib.opentelemetry"))]


def instrument_engine(engine: AsyncEngine) -> None:
    """Trace the statements `engine` runs: the SQL with its placeholders, never the values."""
    if _active is None:
        return
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__
    from opentelemetry.metrics import NoOpMeterProvider

    # The instrumentor's `instrument(engine=…)` works once per process and patches
    # `create_engine` too; EngineTracer instruments just this engine, as it does.
    tracer = _active.provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", __version__)
    connections = (
        NoOpMeterProvider().get_meter(__name__).create_up_down_counter("db.client.connections")
    )
    EngineTracer(tracer, engine.sync_engine, connections)  # type: ignore[no-untyped-call]


def instrument_http_client(client: httpx.AsyncClient) -> None:
    """Trace the requests `client` sends: method, URL and status, never a body."""
    if _active is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=_active.provider)


# ---------------------------------------------------------------- logs


def add_trace_ids(_logger: object, _name: str, event: EventDict) -> EventDict:
    """A structlog processor: the current span's `trace_id` and `span_id`, if there is one."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", trace.format_trace_id(context.trace_id))
        event.setdefault("span_id", trace.format_span_id(context.span_id))
    return event


# ---------------------------------------------------------------- export


def _without_query(value: Any) -> Any:
    return value.split("?", 1)[0] if isinstance(value, str) else value


def _origin(value: Any) -> Any:
    """`scheme://host:port` of a URL: no credentials, path, query or fragment."""
    if not isinstance(value, str):
        return value
    parts = urlsplit(value)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def scrubbed(span: ReadableSpan) -> ReadableSpan:
    """The span without what can quote data or secrets.

    Error messages and stack traces go (an error keeps its type and status); so do query
    strings; and the URL of an outgoing request is cut to its origin (a receiver's URL,
    such as a webhook's, can hold a token in its path).
    """
    client = span.kind == SpanKind.CLIENT
    attributes = {
        key: (_origin(value) if client else _without_query(value))
        if key in _URL_ATTRIBUTES
        else value
        for key, value in (span.attributes or {}).items()
        if key not in _DROPPED_ATTRIBUTES and not (client and key in _PATH_ATTRIBUTES)
    }
    events = [
        Event(
            event.name,
            {k: v for k, v in (event.attributes or {}).items() if k in _EXCEPTION_EVENT_KEPT},
            event.timestamp,
        )
        if event.name == "exception"
        else event
        for event in span.events
    ]
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=Status(span.status.status_code),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class ScrubbingExporter(SpanExporter):
    """Hand every span to `exporter` `scrubbed`."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.exporter.export([scrubbed(span) for span in spans])

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)
