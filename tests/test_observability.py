"""Metrics and logs that tie a request to its workflow and its activities."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Worker

from api.observability import serve_metrics
from devstack import free_port
from tests.helpers import wait_for_etl
from upsertflow import temporal
from upsertflow.settings import Settings
from worker import build_worker, enrichment_client


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture
def api_metrics() -> Iterator[str]:
    """The API process's metrics on a port of their own (as `UPSERTFLOW_API__METRICS_PORT`);
    yields the scrape URL."""
    port = free_port()
    server, thread = serve_metrics("127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_api_metrics_count_requests_by_route_and_workflows_started(
    api: httpx.AsyncClient, api_metrics: str, worker: Worker, resource_id: str
) -> None:
    async with httpx.AsyncClient() as scraper:
        before = _samples((await scraper.get(api_metrics)).text)

    created = await api.put(f"/resources/{resource_id}", json={"info": {"a": "1"}})
    await api.get(f"/resources/{resource_id}")
    await api.get(f"/resources/{resource_id}-missing")

    async with httpx.AsyncClient() as scraper:
        after = _samples((await scraper.get(api_metrics)).text)
    assert created.status_code == 201
    route = "/resources/{resource_id:resource_id}"
    for method, status in (("PUT", "201"), ("GET", "200"), ("GET", "404")):
        name = "upsertflow_http_requests_total"
        labels = {"method": method, "route": route, "status": status}
        assert _value(after, name, **labels) - _value(before, name, **labels) == 1
    latency = "upsertflow_http_request_duration_seconds_count"
    assert _value(after, latency, method="PUT") - _value(before, latency, method="PUT") == 1
    started = "upsertflow_workflows_started_total"
    assert _value(after, started, kind="upsert") - _value(before, started, kind="upsert") == 1


@pytest.fixture
async def metered_worker(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], enrichment: httpx.AsyncClient
) -> AsyncIterator[str]:
    """The project's worker on a runtime exporting Prometheus metrics; yields the scrape URL."""
    port = free_port()
    runtime = Runtime(
        telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{port}"))
    )
    client = await temporal.connect(runtime=runtime, codec=settings.codec)
    async with enrichment_client(settings) as http:
        async with build_worker(client, settings, sessions, http):
            yield f"http://127.0.0.1:{port}/metrics"


async def test_the_api_port_does_not_serve_metrics(api: httpx.AsyncClient) -> None:
    for path in ("/metrics", "/metrics/"):
        response = await api.get(path)
        assert response.status_code == 404, path
        assert "upsertflow_http_requests_total" not in response.text


async def test_worker_metrics_have_the_sdks_and_the_etls(
    api: httpx.AsyncClient, metered_worker: str, resource_id: str
) -> None:
    await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})
    done = await wait_for_etl(api, resource_id, version=1)
    assert done["etl"]["status"] == "succeeded"

    async with httpx.AsyncClient() as http:
        # The ETL's status is recorded just before the workflow completes: wait for that.
        for _ in range(100):
            samples = _samples((await http.get(metered_worker)).text)
            if _value(samples, "temporal_workflow_completed_total") >= 1:
                break
            await asyncio.sleep(0.1)

    assert _value(samples, "temporal_workflow_completed_total") >= 1
    # enrich is a regular activity; persist, normalize and load local ones (pipeline v5: a
    # load that succeeds records the outcome, no `record_outcome` after it).
    assert _value(samples, "temporal_activity_execution_latency_count") >= 1
    assert _value(samples, "temporal_local_activity_execution_latency_count") >= 3
    for step in ("normalize", "enrich", "load"):
        count = _value(
            samples, "upsertflow_etl_step_duration_count", step=step, outcome="succeeded"
        )
        assert count >= 1, step
    assert _value(samples, "upsertflow_etl_runs_total", outcome="succeeded") >= 1
    assert _value(samples, "upsertflow_enrichment_requests_total", status="200") >= 1


async def test_one_request_can_be_followed_through_the_logs(
    api: httpx.AsyncClient, worker: Worker, json_logs: io.StringIO, resource_id: str
) -> None:
    response = await api.put(
        f"/resources/{resource_id}",
        json={"info": {"country": "FR"}},
        headers={"X-Correlation-ID": f"corr-{resource_id}"},
    )
    await wait_for_etl(api, resource_id, version=1)

    assert response.headers["x-correlation-id"] == f"corr-{resource_id}"
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line.strip()]
    workflow_id = response.json()["etl"]["workflow_id"]
    api_lines = [line for line in lines if line.get("correlation_id") == f"corr-{resource_id}"]
    assert any(line.get("workflow_id") == workflow_id for line in api_lines), api_lines
    activity_lines = [
        line for line in lines if line.get("workflow_id") == workflow_id and "activity" in line
    ]
    assert activity_lines, "no activity logged with the workflow id"
    assert all(line["resource_id"] == resource_id for line in activity_lines)
    assert all(line.get("run_id") for line in activity_lines)
    workflow_lines = [
        line
        for line in lines
        if line.get("workflow_id") == workflow_id and "step" in line.get("event", "")
    ]
    assert {line["step"] for line in workflow_lines} == {"normalize", "enrich", "load"}


async def test_a_correlation_id_is_made_when_none_is_sent(api: httpx.AsyncClient) -> None:
    first = await api.get("/healthz")
    second = await api.get("/healthz", headers={"X-Correlation-ID": "bad id with spaces"})

    assert len(first.headers["x-correlation-id"]) == 32
    assert second.headers["x-correlation-id"] not in ("", "bad id with spaces")
