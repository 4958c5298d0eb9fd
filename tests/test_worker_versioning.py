"""Worker Versioning on the real dev server: a running upsert finishes on the version it
started on while new ones go to the current version, and `make dev`'s workers are current."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.api.enums.v1 import EventType, VersioningBehavior
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkerDeploymentVersion
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from devstack import Stack, StackConfig
from tests.helpers import wait_for_etl
from upsertflow import versioning
from upsertflow.settings import Settings, Worker
from worker import build_worker, enrichment_client


class _HoldLoad(Interceptor):
    """Hold every `load` on this worker until `release` is set; note that it got there."""

    def __init__(self) -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        outer = self

        class _Inbound(ActivityInboundInterceptor):
            async def execute_activity(self, input: ExecuteActivityInput) -> Any:
                if activity.info().activity_type == "load":
                    outer.holding.set()
                    await outer.release.wait()
                return await super().execute_activity(input)

        return _Inbound(next)


async def _task_versions(handle: WorkflowHandle[Any, Any]) -> set[str]:
    """The build ids of the workers that completed the run's workflow tasks."""
    history = await handle.fetch_history()
    return {
        event.workflow_task_completed_event_attributes.deployment_version.build_id
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    }


async def _pinned_to(handle: WorkflowHandle[Any, Any]) -> tuple[int, str]:
    info = (await handle.describe()).raw_description.workflow_execution_info.versioning_info
    return info.behavior, info.deployment_version.build_id


def test_the_default_build_id_names_the_code() -> None:
    build_id = versioning.default_build_id()
    assert build_id == versioning.default_build_id()
    version, digest = build_id.rsplit("-", 1)
    assert version and len(digest) == 12 and int(digest, 16) >= 0
    given = versioning.deployment_version(Worker(build_id="2026.12.01-abc"))
    assert given == WorkerDeploymentVersion("upsertflow", "2026.12.01-abc")
    assert versioning.deployment_version(Worker()) == WorkerDeploymentVersion(
        "upsertflow", build_id
    )
    assert versioning.deployment_version(Worker(versioning=False)) is None


async def test_a_running_upsert_finishes_on_its_version_while_new_ones_go_to_the_current(
    api: httpx.AsyncClient,
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    enrichment: httpx.AsyncClient,
) -> None:
    deployment = f"upsertflow-test-{uuid.uuid4().hex[:8]}"
    v1 = WorkerDeploymentVersion(deployment, "1.0")
    v2 = WorkerDeploymentVersion(deployment, "2.0")
    hold = _HoldLoad()
    first, second = f"r-{uuid.uuid4().hex[:12]}", f"r-{uuid.uuid4().hex[:12]}"
    async with enrichment_client(settings) as http:
        async with build_worker(client, settings, sessions, http, [hold], version=v1):
            # Until a version is current, a versioned worker gets no new workflows: the
            # deployment's first version becomes current as the worker process does it.
            async with asyncio.timeout(30):
                assert await versioning.make_current_if_unset(client, v1)
            created = await api.put(f"/resources/{first}", json={"info": {"country": "FR"}})
            assert created.status_code == 201, created.text
            on_v1 = client.get_workflow_handle(
                created.json()["etl"]["workflow_id"], run_id=created.json()["etl"]["run_id"]
            )
            await asyncio.wait_for(hold.holding.wait(), 30)  # mid-ETL, on v1

            async with build_worker(client, settings, sessions, http, version=v2):
                async with asyncio.timeout(30):
                    assert not await versioning.make_current_if_unset(client, v2)
                    await versioning.set_current(client, v2)
                described = await versioning.describe(client, deployment)
                assert described is not None and versioning.current_build_id(described) == "2.0"

                created = await api.put(f"/resources/{second}", json={"info": {"country": "DE"}})
                assert created.status_code == 201, created.text
                on_v2 = client.get_workflow_handle(
                    created.json()["etl"]["workflow_id"], run_id=created.json()["etl"]["run_id"]
                )
                done_v2 = await wait_for_etl(api, second, version=1)
                assert not hold.release.is_set()  # v2's load never waited on v1's hold

                hold.release.set()  # v1's workflow goes on, on v1, with v2 current
                done_v1 = await wait_for_etl(api, first, version=1)

    assert done_v1["etl"]["status"] == done_v2["etl"]["status"] == "succeeded"
    assert done_v1["context"]["country.country_name"] == "France"
    assert done_v2["context"]["country.country_name"] == "Germany"
    pinned = VersioningBehavior.VERSIONING_BEHAVIOR_PINNED
    assert await _pinned_to(on_v1) == (pinned, "1.0")
    assert await _pinned_to(on_v2) == (pinned, "2.0")
    assert await _task_versions(on_v1) == {"1.0"}
    assert await _task_versions(on_v2) == {"2.0"}


@pytest.mark.e2e
async def test_the_dev_stack_runs_a_versioned_worker_and_makes_it_current(
    settings: Settings, database_url: str, temporal_address: str, client: Client
) -> None:
    deployment = f"upsertflow-dev-{uuid.uuid4().hex[:8]}"
    config = StackConfig(
        database_url=database_url,
        temporal_address=temporal_address,
        enrichment_url=settings.enrichment.url,
        env={
            "UPSERTFLOW_TASK_QUEUE": f"dev-{uuid.uuid4().hex}",
            "UPSERTFLOW_WORKER__DEPLOYMENT_NAME": deployment,
            "UPSERTFLOW_CODEC__KEYS": settings.codec.keys.get_secret_value(),
        },
    )
    with Stack(config) as stack:
        version = stack.worker_version
        assert version == WorkerDeploymentVersion(deployment, versioning.default_build_id())
        assert stack.env["UPSERTFLOW_WORKER__BUILD_ID"] == version.build_id
        described = await versioning.describe(client, deployment)
        assert described is not None
        assert versioning.current_build_id(described) == version.build_id

        async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.auth_headers()) as api:
            resource_id = f"r-{uuid.uuid4().hex[:12]}"
            created = await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})
            assert created.status_code == 201, created.text
            done = await wait_for_etl(api, resource_id, version=1)
            etl = created.json()["etl"]
        assert done["etl"]["status"] == "succeeded"
        handle = client.get_workflow_handle(etl["workflow_id"], run_id=etl["run_id"])
        assert await _task_versions(handle) == {version.build_id}
