"""Every workflow runs in the SDK's workflow sandbox: the determinism guard, before deployment.

Workers run workflow code unsandboxed by default (`UPSERTFLOW_WORKER__SANDBOXED`, off:
the sandbox costs a third of the worker's CPU per upsert). The guard runs here instead:
the project's real workers with the sandbox on run an upsert, a retry of its ETL (the
`claim_etl` path), its completion webhook (`NotifyWorkflow`) and a reprocessing job
(`ReprocessWorkflow`) end to end. A call the sandbox forbids in workflow code — the
clock, random, I/O, a restricted import — fails these workflows' tasks and these tests.
The replay tests replay every recorded history in the sandbox too (the `Replayer`'s
default runner), and the time-skipping policy tests run `UpsertWorkflow` in it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from tests.helpers import api_client, wait_for_etl
from tests.test_reprocess import ended, reprocess_worker, seed, start, wait_job
from tests.test_webhooks import SECRET, Receiver, receiver
from upsertflow.settings import Settings, Webhooks
from worker import build_worker, enrichment_client

__all__ = ["receiver"]


@pytest.fixture
def sandboxed(settings: Settings, receiver: Receiver) -> Settings:
    """The suite's settings with the sandbox on, and a webhook receiver."""
    return settings.model_copy(
        update={
            "worker": settings.worker.model_copy(update={"sandboxed": True}),
            "webhooks": Webhooks(url=receiver.url, secret=SecretStr(SECRET)),
        }
    )


@pytest.fixture
async def sandboxed_worker(
    client: Client,
    sandboxed: Settings,
    sessions: async_sessionmaker[AsyncSession],
    enrichment: httpx.AsyncClient,
) -> AsyncIterator[Worker]:
    async with enrichment_client(sandboxed) as http:
        async with build_worker(client, sandboxed, sessions, http) as running:
            yield running


async def test_workers_run_workflows_unsandboxed_unless_asked(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], client: Client
) -> None:
    on = settings.model_copy(
        update={
            "worker": settings.worker.model_copy(update={"sandboxed": True}),
            "task_queue": f"{settings.task_queue}-sandboxed",  # one worker per task queue
        }
    )
    async with httpx.AsyncClient() as http:
        default = build_worker(client, settings, sessions, http).config()["workflow_runner"]
        guarded = build_worker(client, on, sessions, http).config()["workflow_runner"]
    assert isinstance(default, UnsandboxedWorkflowRunner)
    assert isinstance(guarded, SandboxedWorkflowRunner)


async def test_every_workflow_runs_in_the_sandbox(
    sandboxed: Settings,
    sandboxed_worker: Worker,
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    receiver: Receiver,
    resource_id: str,
) -> None:
    async with api_client(sandboxed) as api:
        # An upsert, answered by the `persisted` update, then its ETL.
        created = await api.put(f"/resources/{resource_id}", json={"info": {"Country": "FR"}})
        assert created.status_code == 201, created.text
        first = await wait_for_etl(api, resource_id, 1)
        assert first["etl"]["status"] == "succeeded", first["etl"]
        assert first["context"]["country.country_name"] == "France"

        # Its ETL again (`claim_etl`), then both runs' webhooks delivered.
        retry = await api.post(f"/resources/{resource_id}/etl/retry")
        assert retry.status_code == 202, retry.text
        retried = retry.json()["workflow_id"]
        await client.get_workflow_handle(retried).result()
        for _ in range(600):
            if len(receiver.received) >= 2:
                break
            await asyncio.sleep(0.05)
        events = [json.loads(body) for _, _, body in receiver.received]
        assert sorted(event["workflow_id"] for event in events) == sorted(
            [first["etl"]["workflow_id"], retried]
        )

        # A reprocessing job over resources of its own, by the sandboxed workers.
        prefix = f"sbx-{resource_id[-8:]}-"
        ids = await seed(sessions, prefix, 3)
        async with reprocess_worker(sandboxed_worker, sandboxed, sessions):
            job_id = await start(api, id_prefix=prefix, concurrency=2)
            done = await wait_job(api, job_id, ended)
    assert done["status"] == "completed", done
    assert done["progress"]["done"] == len(ids), done
