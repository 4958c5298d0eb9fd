"""The worker as operators run it: its own process, its own task queue, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from devstack import Stack, StackConfig
from tests.helpers import api_client, wait_for_etl
from upsertflow.settings import Settings

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(settings: Settings, database_url: str, temporal_address: str) -> Iterator[Stack]:
    """A worker process of the dev stack on the suite's servers and a task queue of its own."""
    with Stack(_config(settings, database_url, temporal_address)) as running:
        yield running


def _config(
    settings: Settings, database_url: str, temporal_address: str, **env: str
) -> StackConfig:
    """One worker (no API) on the suite's servers, a task queue of its own, and `env`."""
    return StackConfig(
        database_url=database_url,
        temporal_address=temporal_address,
        enrichment_url=settings.enrichment.url,
        api_ports=(),
        env={
            "UPSERTFLOW_TASK_QUEUE": f"ops-{uuid.uuid4().hex}",
            "UPSERTFLOW_WORKER__GRACEFUL_SHUTDOWN_SECONDS": "20",
            "UPSERTFLOW_LOG_FORMAT": "json",
            # The API of the test (in-process) encrypts with the suite's key.
            "UPSERTFLOW_CODEC__KEYS": settings.codec.keys.get_secret_value(),
            **env,
        },
    )


def _on_queue_of(settings: Settings, stack: Stack) -> Settings:
    """The test's API settings on the stack's task queue: the worker and the API agree on a
    task queue of the operator's choosing."""
    return settings.model_copy(update={"task_queue": stack.env["UPSERTFLOW_TASK_QUEUE"]})


def _started(worker_log: str) -> dict[str, object]:
    """The worker's "worker started" log record (JSON logs)."""
    for line in worker_log.splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("event") == "worker started":
            return dict(record)
    raise AssertionError(f"no 'worker started' record in:\n{worker_log}")


async def test_the_worker_runs_on_uvloop_or_on_the_event_loop_it_is_told(
    settings: Settings,
    stack: Stack,
    database_url: str,
    temporal_address: str,
    resource_id: str,
) -> None:
    assert _started(stack.worker.tail())["event_loop"] == "uvloop"

    config = _config(
        settings, database_url, temporal_address, UPSERTFLOW_WORKER__EVENT_LOOP="asyncio"
    )
    with Stack(config) as plain:
        assert _started(plain.worker.tail())["event_loop"] == "asyncio"
        async with api_client(_on_queue_of(settings, plain)) as api:
            created = await api.put(f"/resources/{resource_id}", json={"info": {"Age": "7"}})
            assert created.status_code == 201, created.text
            done = await wait_for_etl(api, resource_id, version=1, within=60)
    assert done["etl"]["status"] == "succeeded", plain.tails()
    assert done["context"] == {"age": 7}


async def test_sigterm_lets_the_running_activity_finish(
    settings: Settings,
    stack: Stack,
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    worker = stack.worker
    await enrichment.put("/_faults", json={"latency_ms": 3000})
    async with api_client(_on_queue_of(settings, stack)) as api:
        created = await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})
        assert created.status_code == 201, created.text
        deadline = time.monotonic() + 20
        while (await enrichment.get("/_stats")).json()["in_flight"] == 0:
            assert time.monotonic() < deadline, "enrich never called the service"
            await asyncio.sleep(0.05)

        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(worker.process.wait, 30)

        # The in-flight enrichment was answered and completed before the worker left.
        stats = (await enrichment.get("/_stats")).json()
        assert stats["by_status"] == {"200": 1}
        assert exit_code == 0, worker.tail()
        assert "worker stopped" in worker.tail()
        await asyncio.to_thread(worker.start)  # a second worker process
        done = await wait_for_etl(api, resource_id, version=1, within=60)
        etl = (await api.get(f"/resources/{resource_id}/etl")).json()

    assert done["etl"]["status"] == "succeeded"
    assert done["context"]["country.country_name"] == "France"
    enrich = next(step for step in etl["steps"] if step["name"] == "enrich")
    assert enrich["attempts"] == 1  # not cut and retried: it finished during the grace period
    assert (await enrichment.get("/_stats")).json()["by_key"] == {"FR": 1}
