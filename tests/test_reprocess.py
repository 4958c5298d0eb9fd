"""Reprocessing as a durable job (`POST /etl/reprocess`), on the real stack in-process.

Resources are seeded straight into PostgreSQL (a version whose ETL succeeded, and a
context loaded before pipeline versions were recorded), as a deployment that predates
them would hold; the job re-runs their ETL on the reprocess task queue, served by
`worker.build_reprocess_worker`. Each test filters on an id prefix of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from devstack import Stack, StackConfig
from tests.helpers import context_records, wait_for_etl
from upsertflow.models import Blob, Resource, ResourceContext, ResourceVersion
from upsertflow.naming import reprocess_task_queue
from upsertflow.settings import Reprocess, Settings
from upsertflow.store.blobs import Document
from worker import build_reprocess_worker
from workflows.pipeline import OUTPUT_VERSION

INFO = {"Full Name": " Alice ", "city": "Paris"}
NORMALIZED = {"full_name": "Alice", "city": "Paris"}


async def seed(sessions: async_sessionmaker[AsyncSession], prefix: str, count: int) -> list[str]:
    """`count` resources at v1, ETL succeeded, with a context of no known pipeline version."""
    document = Document.of(INFO)
    now = datetime.now(UTC)
    ids = [f"{prefix}{n:05d}" for n in range(count)]
    async with sessions.begin() as session:
        await session.execute(
            pg_insert(Blob)
            .values(digest=document.digest, body=document.body, size_bytes=len(document.body))
            .on_conflict_do_nothing()
        )
        await session.execute(
            insert(Resource),
            [
                {"id": i, "version": 1, "attributes": {}, "created_at": now, "updated_at": now}
                for i in ids
            ],
        )
        await session.execute(
            insert(ResourceVersion),
            [
                {
                    "resource_id": i,
                    "version": 1,
                    "request_id": uuid.uuid4().hex,
                    "blob_digest": document.digest,
                    "persisted_at": now,
                    "etl_status": "succeeded",
                    "etl_workflow_id": f"seed:{i}",
                    "etl_run_id": f"seed-run-{i}",
                    "etl_steps": [],
                }
                for i in ids
            ],
        )
        await session.execute(
            insert(ResourceContext),
            [
                {
                    "resource_id": i,
                    "version": 1,
                    "records": {"stale": True},
                    "loaded_at": now,
                    "run_id": "seed",
                    "record_count": 1,
                    "pipeline_version": None,
                }
                for i in ids
            ],
        )
    return ids


async def contexts(
    sessions: async_sessionmaker[AsyncSession], prefix: str
) -> dict[str, ResourceContext]:
    async with sessions() as session:
        rows = await session.scalars(
            select(ResourceContext).where(ResourceContext.resource_id.startswith(prefix))
        )
        return {row.resource_id: row for row in rows}


@asynccontextmanager
async def reprocess_worker(
    live: Worker, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Worker]:
    """The reprocess task queue's worker, beside the live one (as `worker.run` runs them)."""
    async with build_reprocess_worker(live, settings, sessions) as running:
        yield running


@pytest.fixture
async def reprocessing(
    worker: Worker, settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[Worker]:
    async with reprocess_worker(worker, settings, sessions) as running:
        yield running


@pytest.fixture
def prefix() -> str:
    return f"rp-{uuid.uuid4().hex[:8]}-"


async def start(api: httpx.AsyncClient, **body: Any) -> str:
    response = await api.post("/etl/reprocess", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    assert response.headers["location"] == f"/etl/reprocess/{job_id}"
    return job_id


async def job(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await api.get(f"/etl/reprocess/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_job(
    api: httpx.AsyncClient,
    job_id: str,
    until: Callable[[dict[str, Any]], bool],
    within: float = 60.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = await job(api, job_id)
        if until(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not get there; last seen: {last}")


def ended(body: dict[str, Any]) -> bool:
    return body["status"] != "running" and body["progress"] is not None


def progressed(at_least: int) -> Callable[[dict[str, Any]], bool]:
    return lambda body: (body["progress"] or {}).get("done", 0) >= at_least


async def reruns_per_resource(client: Client, settings: Settings) -> Counter[str]:
    """How many ETL re-runs each resource had on the reprocess task queue."""
    query = (
        f'WorkflowType="UpsertWorkflow" AND TaskQueue="{reprocess_task_queue(settings.task_queue)}"'
    )
    counts: Counter[str] = Counter()
    async for execution in client.list_workflows(query):
        counts[execution.id.split(":")[1]] += 1
    return counts


async def test_a_job_reprocesses_a_thousand_resources_to_the_current_pipeline_version(
    api: httpx.AsyncClient,
    worker: Worker,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    prefix: str,
) -> None:
    ids = await seed(sessions, prefix, 1000)
    # A worker given more reprocessing slots than the default (a deployment's choice).
    roomy = settings.model_copy(
        update={
            "reprocess": Reprocess(
                max_concurrent_activities=50,
                max_concurrent_workflow_tasks=20,
                max_concurrent_local_activities=50,
            )
        }
    )
    async with reprocess_worker(worker, roomy, sessions):
        began = time.monotonic()
        # Contexts loaded before versions were recorded are older than any version.
        job_id = await start(
            api, id_prefix=prefix, pipeline_version_lt=OUTPUT_VERSION, concurrency=50
        )
        body = await wait_job(api, job_id, ended, within=240)
        took = time.monotonic() - began
        print(f"reprocessed 1,000 resources in {took:.1f} s ({1000 / took:.1f}/s)")
        # Nothing is older than the current version any more: the same job again finds none.
        again = await start(api, id_prefix=prefix, pipeline_version_lt=OUTPUT_VERSION)
        assert again == job_id
        second = await wait_job(api, job_id, ended)
    assert second["progress"]["matched"] == 0 and second["progress"]["done"] == 0
    assert body["status"] == "completed"
    progress = body["progress"]
    assert (progress["done"], progress["failed"], progress["skipped"]) == (1000, 0, 0), progress
    assert progress["matched"] == 1000 and progress["remaining"] == 0
    assert progress["state"] == "completed" and progress["in_flight"] == 0
    assert progress["continued"] >= 1  # its history was cut by continue-as-new
    loaded = await contexts(sessions, prefix)
    assert sorted(loaded) == ids
    async with sessions() as session:
        records = await context_records(session, *ids)
    for resource_id, context in loaded.items():
        assert context.pipeline_version == OUTPUT_VERSION
        assert records[resource_id] == NORMALIZED and context.run_id != "seed"


async def test_a_job_resumes_after_its_worker_stops_without_redoing_a_resource(
    api: httpx.AsyncClient,
    client: Client,
    worker: Worker,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    prefix: str,
) -> None:
    ids = await seed(sessions, prefix, 150)
    async with reprocess_worker(worker, settings, sessions):
        job_id = await start(api, id_prefix=prefix, concurrency=5)
        body = await wait_job(api, job_id, progressed(30))
    # The worker is gone (its `async with` ended) with the job halfway.
    assert body["progress"]["done"] < 150
    async with reprocess_worker(worker, settings, sessions):
        body = await wait_job(api, job_id, ended)
    progress = body["progress"]
    assert body["status"] == "completed"
    assert (progress["done"], progress["failed"], progress["skipped"]) == (150, 0, 0), progress
    assert await reruns_per_resource(client, settings) == dict.fromkeys(ids, 1)
    assert all(
        c.pipeline_version == OUTPUT_VERSION for c in (await contexts(sessions, prefix)).values()
    )


async def test_the_same_request_twice_is_one_job(
    api: httpx.AsyncClient,
    client: Client,
    reprocessing: Worker,
    sessions: async_sessionmaker[AsyncSession],
    prefix: str,
) -> None:
    await seed(sessions, prefix, 30)
    first = await api.post("/etl/reprocess", json={"id_prefix": prefix, "concurrency": 1})
    second = await api.post("/etl/reprocess", json={"concurrency": 3, "id_prefix": prefix})
    assert first.status_code == second.status_code == 202, second.text
    assert first.json()["job_id"] == second.json()["job_id"]
    assert first.json()["run_id"] == second.json()["run_id"]
    assert first.json()["ui_url"].endswith(first.json()["job_id"].replace(":", "%3A"))
    other = await start(api, id_prefix=prefix, etl_status="failed")
    assert other != first.json()["job_id"]
    job_id = first.json()["job_id"]
    runs = [e async for e in client.list_workflows(f'WorkflowId="{job_id}"')]
    assert len(runs) == 1
    body = await wait_job(api, job_id, ended)
    assert body["progress"]["done"] == 30 and body["progress"]["concurrency"] == 1
    # Nothing matches the other filter (every one succeeded): it ends at once.
    assert (await wait_job(api, other, ended))["progress"]["matched"] == 0


async def test_bad_requests_and_unknown_jobs(api: httpx.AsyncClient) -> None:
    for bad in (
        {"etl_status": "nope"},
        {"pipeline_version_lt": 0},
        {"concurrency": 1000},
        {"id_prefix": "a/b"},
        {"extra": 1},
    ):
        response = await api.post("/etl/reprocess", json=bad)
        assert response.status_code == 422, (bad, response.text)
    for path in ("/etl/reprocess/reprocess:0123456789abcdef", "/etl/reprocess/nonsense"):
        assert (await api.get(path)).status_code == 404
        assert (await api.post(f"{path}/pause")).status_code == 404
        assert (await api.delete(path)).status_code == 404


async def test_a_job_pauses_resumes_and_cancels(
    api: httpx.AsyncClient,
    reprocessing: Worker,
    sessions: async_sessionmaker[AsyncSession],
    prefix: str,
) -> None:
    await seed(sessions, f"{prefix}a-", 60)
    job_id = await start(api, id_prefix=f"{prefix}a-", concurrency=2)
    await wait_job(api, job_id, progressed(4))
    paused = await api.post(f"/etl/reprocess/{job_id}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["progress"]["state"] == "paused"
    body = await wait_job(api, job_id, lambda b: b["progress"]["in_flight"] == 0)
    await asyncio.sleep(1.5)
    still = await job(api, job_id)
    assert still["progress"]["done"] == body["progress"]["done"] < 60
    assert still["progress"]["state"] == "paused" and still["status"] == "running"
    resumed = await api.post(f"/etl/reprocess/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["progress"]["state"] == "running"
    body = await wait_job(api, job_id, ended)
    assert body["progress"]["done"] == 60

    ids = await seed(sessions, f"{prefix}b-", 60)
    job_id = await start(api, id_prefix=f"{prefix}b-", concurrency=2)
    await wait_job(api, job_id, progressed(4))
    cancelled = await api.delete(f"/etl/reprocess/{job_id}")
    assert cancelled.status_code == 202, cancelled.text
    body = await wait_job(api, job_id, ended)
    progress = body["progress"]
    assert body["status"] == "canceled" and progress["state"] == "cancelled"
    assert progress["in_flight"] == 0 and progress["done"] < 60 and progress["failed"] == 0
    # The re-runs in flight finished: no resource is left cancelled or half-done.
    async with sessions() as session:
        statuses = set(
            await session.scalars(
                select(ResourceVersion.etl_status).where(ResourceVersion.resource_id.in_(ids))
            )
        )
    assert statuses == {"succeeded"}
    reloaded = [c for c in (await contexts(sessions, f"{prefix}b-")).values() if c.run_id != "seed"]
    assert len(reloaded) == progress["done"]
    assert (await api.delete(f"/etl/reprocess/{job_id}")).status_code == 409
    assert (await api.post(f"/etl/reprocess/{job_id}/pause")).status_code == 409


async def test_a_live_upsert_during_a_job_is_never_overwritten_by_a_stale_rerun(
    api: httpx.AsyncClient,
    worker: Worker,
    reprocessing: Worker,
    sessions: async_sessionmaker[AsyncSession],
    prefix: str,
) -> None:
    ids = await seed(sessions, prefix, 100)
    job_id = await start(api, id_prefix=prefix, concurrency=4)
    body = await wait_job(api, job_id, progressed(10))
    # Upsert a new version of resources behind the cursor, around it (in flight) and ahead.
    cursor = ids.index(body["progress"]["cursor"])
    chosen = sorted({*ids[max(cursor - 6, 0) : cursor + 6], *ids[cursor + 20 :: 9]})
    puts = await asyncio.gather(
        *(api.put(f"/resources/{i}", json={"info": {"city": "Lyon", "live": i}}) for i in chosen)
    )
    assert all(p.status_code == 200 for p in puts), [p.text for p in puts]
    body = await wait_job(api, job_id, ended)
    progress = body["progress"]
    assert progress["failed"] == 0 and progress["done"] + progress["skipped"] == 100, progress
    for resource_id in chosen:
        resource = await wait_for_etl(api, resource_id, version=2)
        assert resource["etl"]["status"] == "succeeded"
        assert resource["context_version"] == 2
        assert resource["context"] == {"city": "Lyon", "live": resource_id}
    loaded = await contexts(sessions, prefix)
    assert all(c.pipeline_version == OUTPUT_VERSION for c in loaded.values())
    async with sessions() as session:
        records = await context_records(session, *ids)
    assert all(records[i] == NORMALIZED for i in ids if i not in chosen)


@pytest.mark.e2e
async def test_a_job_whose_worker_is_killed_resumes_without_redoing_a_resource(
    database_url: str,
    temporal_address: str,
    enrichment_url: str,
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    prefix: str,
) -> None:
    """The worker process SIGKILLed in the middle of a job (its job, re-runs and
    activities on the reprocess queue cut off at any point), then started again: the
    job goes on where it stopped, and every resource is re-run exactly once."""
    count = 60
    task_queue = f"rp-kill-{uuid.uuid4().hex}"
    ids = await seed(sessions, prefix, count)
    stack = Stack(
        StackConfig(
            database_url=database_url,
            temporal_address=temporal_address,
            enrichment_url=enrichment_url,
            workers=1,
            api_ports=(0,),
            env={"UPSERTFLOW_TASK_QUEUE": task_queue},
            app_grace=10,
        )
    )
    try:
        stack.start()
        async with httpx.AsyncClient(
            base_url=stack.api_url, headers=stack.auth_headers(), timeout=30
        ) as api:
            job_id = await start(api, id_prefix=prefix, concurrency=5)
            await wait_job(api, job_id, progressed(15))
            worker = stack.child("worker")
            assert worker.process is not None
            os.kill(worker.process.pid, signal.SIGKILL)
            worker.process.wait(10)
            halfway = await job(api, job_id)
            worker.start()
            body = await wait_job(api, job_id, ended, within=180)
    finally:
        stack.stop()
    assert halfway["status"] == "running"
    progress = body["progress"]
    assert body["status"] == "completed"
    assert (progress["done"], progress["failed"], progress["skipped"]) == (count, 0, 0), progress
    queue = reprocess_task_queue(task_queue)
    reruns: Counter[str] = Counter()
    async for execution in client.list_workflows(
        f'WorkflowType="UpsertWorkflow" AND TaskQueue="{queue}"'
    ):
        reruns[execution.id.split(":")[1]] += 1
    assert reruns == dict.fromkeys(ids, 1)
    assert all(
        c.pipeline_version == OUTPUT_VERSION for c in (await contexts(sessions, prefix)).values()
    )
