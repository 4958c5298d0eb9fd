"""OpenTelemetry traces: one trace per request, from the PUT to the enrichment call and the
SQL, with the correlation id and no payload data; off unless `OTEL_*` variables say.

In-process, on the real servers: the API app (over ASGI, as the `api` fixture) and a
worker built as `worker.run` builds it, tracing into an in-memory exporter. Also a real
OTLP/HTTP receiver, to show what the `OTEL_*` variables configure reaches a collector.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from temporalio.worker import Worker

from devstack import free_port
from tests.helpers import wait_for_etl
from upsertflow import temporal, tracing
from upsertflow.db import create_engine, create_sessionmaker
from upsertflow.settings import Settings
from worker import build_worker, enrichment_client
from workflows.pipeline import PIPELINES

#: The activities of a succeeded run of the newest pipeline, in order (its load records the
#: outcome: no `record_outcome` after it).
ACTIVITIES = [
    "persist",
    *(step.name for step in PIPELINES[max(PIPELINES)].steps),
    *(() if PIPELINES[max(PIPELINES)].last_step_records_success else ("record_outcome",)),
]

# ---------------------------------------------------------------- fixtures


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, every span in memory; off again after it."""
    exporter = InMemorySpanExporter()
    traced = tracing.configure_tracing("upsertflow-test", exporter=exporter)
    assert traced is not None
    try:
        yield exporter
    finally:
        traced.shutdown()


@pytest.fixture
def traced_api(spans: InMemorySpanExporter, api: httpx.AsyncClient) -> httpx.AsyncClient:
    """The `api` fixture's app, built while tracing is on."""
    return api


@pytest.fixture
async def traced_worker(
    spans: InMemorySpanExporter, settings: Settings, enrichment: httpx.AsyncClient
) -> AsyncIterator[Worker]:
    """The worker as `worker.run` builds it, in-process, while tracing is on."""
    client = await temporal.connect(codec=settings.codec)
    engine = create_engine(settings, pre_ping=False)
    tracing.instrument_engine(engine)
    try:
        async with enrichment_client(settings) as http:
            async with build_worker(client, settings, create_sessionmaker(engine), http) as running:
                yield running
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- helpers


def trace_id_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_trace_id(span.context.trace_id)


async def spans_until(
    exporter: InMemorySpanExporter,
    done: Callable[[list[ReadableSpan]], bool],
    within: float = 10.0,
) -> list[ReadableSpan]:
    """The finished spans, once `done` says they are all there."""
    deadline = time.monotonic() + within
    while True:
        finished = list(exporter.get_finished_spans())
        if done(finished) or time.monotonic() > deadline:
            return finished
        await asyncio.sleep(0.05)


def texts_in(span: ReadableSpan) -> list[str]:
    """Everything a span carries as text: name, attributes, events, status."""
    found = [span.name, str(span.status.description or "")]
    found += [f"{k}={v!r}" for k, v in (span.attributes or {}).items()]
    for event in span.events:
        found.append(event.name)
        found += [f"{k}={v!r}" for k, v in (event.attributes or {}).items()]
    return found


# ---------------------------------------------------------------- one trace per request


async def test_one_put_is_one_trace_from_the_request_to_the_enrichment_call_and_the_sql(
    traced_api: httpx.AsyncClient,
    traced_worker: Worker,
    spans: InMemorySpanExporter,
    json_logs: io.StringIO,
    settings: Settings,
    resource_id: str,
) -> None:
    marker = f"secret-{uuid.uuid4().hex}"
    correlation_id = f"corr-{resource_id}"
    response = await traced_api.put(
        f"/resources/{resource_id}",
        json={"attributes": {"name": marker}, "info": {"country": "FR", "note": marker}},
        headers={"X-Correlation-ID": correlation_id},
    )
    assert response.status_code == 201, response.text
    workflow_id = response.json()["etl"]["workflow_id"]
    await wait_for_etl(traced_api, resource_id, version=1)

    # FastAPI's steps of the request; from the API's update-with-start to the workflow,
    # each activity (the local ones too: they run in the workflow's worker) and the
    # workflow's end. Each span is exported when it ends, the workflow's last.
    expected = {
        "fastapi.dependencies",
        "fastapi.endpoint",
        "StartUpdateWithStartWorkflow:UpsertWorkflow",
        "RunWorkflow:UpsertWorkflow",
        "HandleUpdate:persisted",
        "CompleteWorkflow:UpsertWorkflow",
        *(f"StartActivity:{a}" for a in ACTIVITIES),
        *(f"RunActivity:{a}" for a in ACTIVITIES),
    }

    def put_span(finished: list[ReadableSpan]) -> ReadableSpan | None:
        return next(
            (
                s
                for s in finished
                if s.kind == SpanKind.SERVER
                and (s.attributes or {}).get("http.request.method") == "PUT"
            ),
            None,
        )

    def complete(finished: list[ReadableSpan]) -> bool:
        server = put_span(finished)
        names = {s.name for s in finished if server and trace_id_of(s) == trace_id_of(server)}
        return expected <= names

    finished = await spans_until(spans, complete)
    server = put_span(finished)
    assert server is not None and server.context is not None, [s.name for s in finished]
    trace_id = trace_id_of(server)
    in_trace = [s for s in finished if trace_id_of(s) == trace_id]
    names = [s.name for s in in_trace]

    # The request span: the route, the correlation id, no parent.
    assert server.name == "PUT /resources/{resource_id}"
    assert server.parent is None
    assert (server.attributes or {})["upsertflow.correlation_id"] == correlation_id
    assert expected <= set(names), sorted(expected - set(names))
    # One tree: every span hangs, parent by parent, from the request's.
    by_id = {s.context.span_id: s for s in in_trace if s.context is not None}
    for span in in_trace:
        chain = span
        while chain.parent is not None:
            assert chain.parent.span_id in by_id, f"{span.name}: its parent is not in the trace"
            chain = by_id[chain.parent.span_id]
        assert chain is server, span.name
    # Nothing of that workflow outside the trace.
    of_workflow = [
        s for s in finished if (s.attributes or {}).get("temporalWorkflowID") == workflow_id
    ]
    assert of_workflow and all(trace_id_of(s) == trace_id for s in of_workflow)

    def run_activity(name: str) -> ReadableSpan:
        return next(s for s in in_trace if s.name == f"RunActivity:{name}")

    def children(parent: ReadableSpan) -> list[ReadableSpan]:
        assert parent.context is not None
        return [s for s in in_trace if s.parent and s.parent.span_id == parent.context.span_id]

    # The enrichment call, inside `enrich`.
    calls = [s for s in children(run_activity("enrich")) if s.kind == SpanKind.CLIENT]
    http_calls = [s for s in calls if (s.attributes or {}).get("http.method") == "POST"]
    assert len(http_calls) == 1, [s.name for s in calls]
    # Its URL is cut to the origin: a receiver's path can hold a token.
    assert (http_calls[0].attributes or {})["http.url"] == settings.enrichment.url
    assert (http_calls[0].attributes or {})["http.status_code"] == 200
    # The SQL of every activity, and of the API: statements with placeholders.
    for name in ACTIVITIES:
        sql = [
            s
            for s in children(run_activity(name))
            if (s.attributes or {}).get("db.system") == "postgresql"
        ]
        assert sql, f"no SQL span under RunActivity:{name}"
    statements = [
        str((s.attributes or {})["db.statement"])
        for s in in_trace
        if (s.attributes or {}).get("db.system") == "postgresql"
    ]
    assert any("$1" in statement for statement in statements)
    # No payload data anywhere: not the attributes' or the info's values.
    for span in finished:
        assert not [t for t in texts_in(span) if marker in t], span.name
    assert not any(s.status.status_code == StatusCode.ERROR for s in in_trace)

    # Log lines written under a span carry its trace id: the API's and the activities'.
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.strip()]
    access = next(
        line
        for line in lines
        if line.get("logger") == "upsertflow.api.access"
        and line.get("correlation_id") == correlation_id
    )
    assert access["trace_id"] == trace_id
    assert access["span_id"] == trace.format_span_id(server.context.span_id)
    activity_lines = [line for line in lines if line.get("workflow_id") == workflow_id]
    assert any(line.get("activity") for line in activity_lines), activity_lines
    assert all(line.get("trace_id") == trace_id for line in activity_lines if line.get("activity"))


async def test_probes_and_query_strings_stay_out_of_traces(
    traced_api: httpx.AsyncClient, spans: InMemorySpanExporter, resource_id: str
) -> None:
    marker = f"secret-{uuid.uuid4().hex}"
    assert (await traced_api.get("/healthz")).status_code == 200
    await traced_api.get("/readyz")
    response = await traced_api.get(f"/resources/{resource_id}/context", params={"prefix": marker})
    assert response.status_code == 404

    finished = list(spans.get_finished_spans())
    servers = [s for s in finished if s.kind == SpanKind.SERVER]
    assert [s.name for s in servers] == ["GET /resources/{resource_id}/context"]
    attributes = servers[0].attributes or {}
    assert attributes["url.path"] == f"/resources/{resource_id}/context"
    assert "url.query" not in attributes
    for span in finished:
        assert not [t for t in texts_in(span) if marker in t], span.name


async def test_exported_spans_keep_no_error_messages_queries_or_request_paths(
    spans: InMemorySpanExporter,
) -> None:
    traced = tracing.active()
    assert traced is not None
    marker = f"secret-{uuid.uuid4().hex}"
    tracer = traced.provider.get_tracer("tests")
    with pytest.raises(ValueError), tracer.start_as_current_span("failing") as span:
        span.set_attribute("url.full", f"http://service/path?value={marker}")
        span.set_attribute("url.query", f"value={marker}")
        raise ValueError(f"refused {marker!r}")
    with tracer.start_as_current_span("POST", kind=SpanKind.CLIENT) as span:
        span.set_attribute("http.url", f"https://hooks.example:8443/services/{marker}")
        span.set_attribute("url.path", f"/services/{marker}")

    failing, outgoing = spans.get_finished_spans()
    assert failing.status.status_code == StatusCode.ERROR
    assert failing.status.description is None
    (event,) = failing.events
    assert event.name == "exception"
    assert dict(event.attributes or {}) == {
        "exception.type": "ValueError",
        "exception.escaped": "False",
    }
    assert dict(failing.attributes or {}) == {"url.full": "http://service/path"}
    assert dict(outgoing.attributes or {}) == {"http.url": "https://hooks.example:8443"}


# ---------------------------------------------------------------- configuration


def without_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)


def test_tracing_is_off_without_otel_variables(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    without_otel_variables(monkeypatch)
    provider = trace.get_tracer_provider()

    assert tracing.configure_tracing("upsertflow-api") is None

    assert trace.get_tracer_provider() is provider
    assert tracing.active() is None
    assert tracing.temporal_interceptors() == []
    assert tracing.fastapi_telemetry()["tracing"] is False
    http = enrichment_client(settings)
    assert not getattr(http, "_is_instrumented_by_opentelemetry", False)


@pytest.mark.parametrize(
    ("variables", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "upsertflow-api"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ],
)
def test_which_variables_turn_tracing_on(variables: dict[str, str], on: bool) -> None:
    assert tracing.tracing_requested(variables) is on


@pytest.mark.parametrize(
    "variables",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    ],
)
def test_an_exporter_upsertflow_does_not_ship_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    without_otel_variables(monkeypatch)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(tracing.TracingConfigError):
        tracing.configure_tracing("upsertflow-api")
    assert tracing.active() is None


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps what is posted to /v1/traces."""

    received: ClassVar[list[tuple[str, str, bytes]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: list[tuple[str, str, bytes]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_otel_variables_send_spans_to_an_otlp_http_collector(
    monkeypatch: pytest.MonkeyPatch, collector: tuple[str, list[tuple[str, str, bytes]]]
) -> None:
    endpoint, received = collector
    without_otel_variables(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    # Empty, as compose and ConfigMaps leave what is not set: the default sampler.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "")

    traced = tracing.configure_tracing("upsertflow-worker")
    assert traced is not None and tracing.active() is traced
    with traced.provider.get_tracer("tests").start_as_current_span("exported"):
        pass
    traced.shutdown()

    assert tracing.active() is None
    assert [(path, kind) for path, kind, _ in received] == [
        ("/v1/traces", "application/x-protobuf")
    ]
    request = ExportTraceServiceRequest.FromString(received[0][2])
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "upsertflow-worker"
    assert [s.name for scope in resource_spans.scope_spans for s in scope.spans] == ["exported"]
