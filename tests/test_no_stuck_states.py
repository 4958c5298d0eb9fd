"""Every state has a way out: crash points, terminations, retries, deletes and their races.

Each crash point and race is driven deterministically: a worker interceptor
holds an activity attempt at the point in question (before it starts, or right
after its transaction committed) until the test releases it, or fails the
attempt there as a crash would.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)

from devstack import venv_binary
from tests.helpers import TERMINAL, wait_for_etl
from upsertflow.contracts import EtlProgress, UpsertRequest
from upsertflow.janitor import collect
from upsertflow.models import Blob, BlobClaim, ResourceVersion, StepOutput
from upsertflow.settings import Janitor, Settings
from upsertflow.store import versions
from worker import build_worker, enrichment_client
from workflows.pipeline import OUTPUT_VERSION

ASYNC = {"Prefer": "respond-async"}
INFO = {"Contact": {"Country": "FR", "Email": "someone@example.org"}, "Age": "42"}
CONTEXT = {
    "contact.country": "FR",
    "contact.country.country_name": "France",
    "contact.country.region": "Europe",
    "contact.email": "someone@example.org",
    "contact.email.domain": "example.org",
    "contact.email.is_free_provider": False,
    "age": 42,
}


class Hold(Interceptor):
    """Hold or crash chosen activity attempts at chosen points.

    `when` is "before" (the attempt has not started its work) or "after" (its
    work is done and committed, its completion not yet reported).
    """

    def __init__(self, activity_type: str, when: str, *, crash: bool = False) -> None:
        self.activity_type = activity_type
        self.when = when
        self.crash = crash
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.attempts = 0
        if crash:
            self.release.set()

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        hold = self

        class _Inbound(ActivityInboundInterceptor):
            async def execute_activity(self, input: ExecuteActivityInput) -> Any:
                info = activity.info()
                if info.activity_type != hold.activity_type:
                    return await super().execute_activity(input)
                hold.attempts += 1
                first = hold.attempts == 1
                if first and hold.when == "before":
                    hold.reached.set()
                    await hold.release.wait()
                result = await super().execute_activity(input)
                if first and hold.when == "after":
                    hold.reached.set()
                    await hold.release.wait()
                    if hold.crash:
                        raise ApplicationError("simulated crash after commit", type="Crash")
                return result

        return _Inbound(next)


@pytest.fixture
def run_worker(
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    enrichment: httpx.AsyncClient,
) -> Callable[..., Any]:
    """Run the project's worker with extra interceptors, as a context manager."""

    @asynccontextmanager
    async def running(*interceptors: Interceptor) -> AsyncIterator[Worker]:
        async with enrichment_client(settings) as http:
            async with build_worker(
                client, settings, sessions, http, interceptors=interceptors
            ) as worker:
                yield worker

    return running


async def _counts(sessions: async_sessionmaker[AsyncSession], resource_id: str) -> dict[str, int]:
    async with sessions() as session:
        return {
            "versions": await session.scalar(
                select(func.count()).where(ResourceVersion.resource_id == resource_id)
            )
            or 0,
            "step_outputs": await session.scalar(
                select(func.count()).where(StepOutput.resource_id == resource_id)
            )
            or 0,
        }


# --- 2. every step survives a crash right after its commit ----------------------------------


@pytest.mark.parametrize("step", ["persist", "normalize", "enrich", "load"])
async def test_a_crash_after_a_step_commits_changes_nothing(
    step: str,
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    resource_id: str,
) -> None:
    crash = Hold(step, "after", crash=True)
    async with run_worker(crash):
        created = await api.put(f"/resources/{resource_id}", json={"info": INFO})
        final = await wait_for_etl(api, resource_id, version=1)
        handle = client.get_workflow_handle(created.json()["etl"]["workflow_id"])
        await handle.result()

    assert crash.attempts == 2  # the crashed attempt and its retry
    assert created.status_code == 201
    assert final["etl"]["status"] == "succeeded", final["etl"]
    assert (final["version"], final["context_version"]) == (1, 1)
    assert final["context"] == CONTEXT
    assert await _counts(sessions, resource_id) == {"versions": 1, "step_outputs": 0}


async def test_a_crash_after_record_outcome_commits_changes_nothing(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    enrichment: httpx.AsyncClient,
    client: Client,
    resource_id: str,
) -> None:
    # A load that succeeds records the outcome itself (pipeline v5): `record_outcome`
    # records the other endings, a failed ETL here.
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})
    crash = Hold("record_outcome", "after", crash=True)
    async with run_worker(crash):
        created = await api.put(f"/resources/{resource_id}", json={"info": INFO})
        final = await wait_for_etl(api, resource_id, version=1)
        handle = client.get_workflow_handle(created.json()["etl"]["workflow_id"])
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        etl = (await api.get(f"/resources/{resource_id}/etl")).json()
        assert (await api.post(f"/resources/{resource_id}/etl/retry")).status_code == 202
        retried = await _until_status(api, resource_id, "succeeded")

    assert crash.attempts == 2  # the crashed attempt and its retry
    assert final["etl"]["status"] == "failed", final["etl"]
    assert [step["status"] for step in etl["steps"]] == ["succeeded", "failed", "pending"]
    assert retried["context"] == CONTEXT


async def test_a_crash_after_claim_etl_commits_changes_nothing(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})
    crash = Hold("claim_etl", "after", crash=True)
    async with run_worker(crash):
        await api.put(f"/resources/{resource_id}", json={"info": INFO})
        assert (await wait_for_etl(api, resource_id, 1))["etl"]["status"] == "failed"
        assert (await api.post(f"/resources/{resource_id}/etl/retry")).status_code == 202
        final = await _until_status(api, resource_id, "succeeded")

    assert crash.attempts == 2
    assert final["context"] == CONTEXT


async def _until(
    http: httpx.AsyncClient,
    resource_id: str,
    done: Callable[[dict[str, Any]], bool],
    within: float = 30.0,
) -> dict[str, Any]:
    """Poll `GET /resources/{id}` until `done(resource)`; return the resource."""
    deadline = asyncio.get_running_loop().time() + within
    body: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        body = (await http.get(f"/resources/{resource_id}")).json()
        if "etl" in body and done(body):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"{resource_id} never got there: {body}")


async def _until_status(http: httpx.AsyncClient, resource_id: str, status: str) -> dict[str, Any]:
    return await _until(http, resource_id, lambda body: body["etl"]["status"] == status)


# --- 3. reconciliation: terminated in the CLI ------------------------------------------------


def _temporal_cli(*args: str) -> None:
    import os

    subprocess.run(
        [venv_binary("temporal"), *args, "--address", os.environ["TEMPORAL_ADDRESS"]],
        check=True,
        capture_output=True,
        timeout=30,
    )


async def test_a_workflow_terminated_in_the_cli_ends_the_etl_and_can_be_retried(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    held = Hold("enrich", "before")
    async with run_worker(held):
        created = await api.put(f"/resources/{resource_id}", json={"info": INFO})
        await asyncio.wait_for(held.reached.wait(), 30)
        workflow_id = created.json()["etl"]["workflow_id"]
        _temporal_cli("workflow", "terminate", "--workflow-id", workflow_id, "--reason", "ops")
        ended = (await api.get(f"/resources/{resource_id}")).json()
        etl = (await api.get(f"/resources/{resource_id}/etl")).json()
        retry = await api.post(f"/resources/{resource_id}/etl/retry")
        held.release.set()  # the terminated run's attempt goes on, and must write nothing
        final = await _until_status(api, resource_id, "succeeded")

    assert ended["etl"]["status"] == "failed"
    assert "terminated" in ended["etl"]["error"]
    assert etl["status"] == "failed" and etl["live"] is False
    assert retry.status_code == 202, retry.text
    assert final["context"] == CONTEXT


async def test_a_workflow_reset_in_the_cli_finishes_its_etl_in_the_new_run(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    client: Client,
    resource_id: str,
) -> None:
    held = Hold("enrich", "before")
    async with run_worker(held):
        created = await api.put(f"/resources/{resource_id}", json={"info": INFO})
        await asyncio.wait_for(held.reached.wait(), 30)
        workflow_id = created.json()["etl"]["workflow_id"]
        _temporal_cli(
            "workflow",
            "reset",
            "--workflow-id",
            workflow_id,
            "--type",
            "FirstWorkflowTask",
            "--reason",
            "ops",
        )
        held.release.set()
        final = await _until_status(api, resource_id, "succeeded")
        result = await client.get_workflow_handle(workflow_id).result()

    assert final["version"] == 1  # the new run's persist found its version
    assert final["context"] == CONTEXT
    assert final["etl"]["run_id"] != created.json()["etl"]["run_id"]
    assert result["status"] == "succeeded"


async def test_a_succeeded_workflow_reset_to_its_load_succeeds_again_with_its_context(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    client: Client,
    resource_id: str,
) -> None:
    # The load deleted the step outputs it loaded; a reset to the last workflow task runs
    # the load again, without the steps before it.
    async with run_worker():
        created = await api.put(f"/resources/{resource_id}", json={"info": INFO})
        workflow_id = created.json()["etl"]["workflow_id"]
        await client.get_workflow_handle(workflow_id).result()
        _temporal_cli(
            "workflow",
            "reset",
            "--workflow-id",
            workflow_id,
            "--type",
            "LastWorkflowTask",
            "--reason",
            "ops",
        )
        result = await client.get_workflow_handle(workflow_id).result()
        final = (await api.get(f"/resources/{resource_id}")).json()
        etl = (await api.get(f"/resources/{resource_id}/etl")).json()

    assert result["status"] == "succeeded", result
    assert result["steps"][-1]["stats"] == {"records": len(CONTEXT)}
    assert (final["version"], final["context_version"]) == (1, 1)
    assert final["context"] == CONTEXT
    assert etl["status"] == "succeeded" and etl["error"] is None, etl


async def test_a_load_without_its_input_keeps_only_a_context_of_its_own_pipeline(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    async with run_worker():
        created = await api.put(f"/resources/{resource_id}", json={"info": INFO})
        workflow_id = created.json()["etl"]["workflow_id"]
        await client.get_workflow_handle(workflow_id).result()
    # Another run of the same ETL loads again, its input gone with the first load.
    load = (resource_id, 1, workflow_id, "another-run", ["normalize", "enrich"])

    kept = await versions.load_context(sessions, *load, OUTPUT_VERSION)
    with pytest.raises(versions.OutputMissing):  # a context computed otherwise: not kept
        await versions.load_context(sessions, *load, OUTPUT_VERSION + 1)

    assert kept == len(CONTEXT)
    assert (await api.get(f"/resources/{resource_id}")).json()["context"] == CONTEXT


async def test_the_janitor_reconciles_a_terminated_workflow_nobody_asked_about(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    held = Hold("normalize", "before")
    async with run_worker(held):
        created = await api.put(f"/resources/{resource_id}", json={"info": INFO})
        await asyncio.wait_for(held.reached.wait(), 30)
        await client.get_workflow_handle(created.json()["etl"]["workflow_id"]).terminate()
        collected = await collect(sessions, client, Janitor(reconcile_after_seconds=0))
        held.release.set()

    async with sessions() as session:
        version = await session.get_one(ResourceVersion, (resource_id, 1))
    assert collected.reconciled >= 1
    assert (version.etl_status, version.etl_error) == (
        "failed",
        "the workflow was terminated in Temporal",
    )


# --- 4. a retry re-runs everything, also after a success -------------------------------------


async def test_retrying_a_succeeded_etl_recomputes_the_context(
    api: httpx.AsyncClient,
    worker: Worker,
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    await enrichment.put("/_faults", json={"forget": True})  # the dependency lost its data
    await api.put(f"/resources/{resource_id}", json={"info": INFO})
    before = await wait_for_etl(api, resource_id, 1)
    await enrichment.delete("/_faults")  # ... and got it back

    retry = await api.post(f"/resources/{resource_id}/etl/retry")
    after = await _until_context(api, resource_id, CONTEXT)

    assert before["etl"]["status"] == "succeeded"
    assert before["context"] == {
        "contact.country": "FR",
        "contact.email": "someone@example.org",
        "age": 42,
    }
    assert retry.status_code == 202
    assert after["etl"]["status"] == "succeeded"
    assert after["etl"]["workflow_id"] == retry.json()["workflow_id"]


async def _until_context(
    http: httpx.AsyncClient, resource_id: str, context: dict[str, Any]
) -> dict[str, Any]:
    return await _until(
        http,
        resource_id,
        lambda body: body["context"] == context and body["etl"]["status"] in TERMINAL,
    )


# --- 5. deletes that no late attempt can undo ------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_persist_attempt_held_across_a_delete_cannot_bring_the_resource_back(
    when: str,
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    await _create(api, run_worker, resource_id)
    held = Hold("persist", when)
    async with run_worker(held):
        accepted = await api.put(
            f"/resources/{resource_id}",
            json={"info": {"v": "2"}},
            headers=ASYNC,
        )
        await asyncio.wait_for(held.reached.wait(), 30)
        deleted = await api.delete(f"/resources/{resource_id}")
        held.release.set()
        handle = client.get_workflow_handle(accepted.json()["workflow_id"])
        status = await _closed_status(handle)

    assert deleted.status_code == 204
    assert status == WorkflowExecutionStatus.CANCELED
    assert (await api.get(f"/resources/{resource_id}")).status_code == 404
    assert await _counts(sessions, resource_id) == {"versions": 0, "step_outputs": 0}


async def test_delete_withdraws_an_accepted_upsert_not_persisted_yet(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    held = Hold("persist", "before")
    async with run_worker(held):
        accepted = await api.put(f"/resources/{resource_id}", json={"info": INFO}, headers=ASYNC)
        await asyncio.wait_for(held.reached.wait(), 30)
        # Never persisted, so unknown to GET — but known to DELETE, from PostgreSQL alone.
        assert (await api.get(f"/resources/{resource_id}")).status_code == 404
        deleted = await api.delete(f"/resources/{resource_id}")
        held.release.set()
        status = await _closed_status(client.get_workflow_handle(accepted.json()["workflow_id"]))

    assert accepted.status_code == 202
    assert deleted.status_code == 204
    assert status == WorkflowExecutionStatus.CANCELED
    assert (await api.get(f"/resources/{resource_id}")).status_code == 404
    assert (await api.delete(f"/resources/{resource_id}")).status_code == 404
    async with sessions() as session:
        claims = await session.scalar(
            select(func.count()).where(BlobClaim.resource_id == resource_id)
        )
    assert claims == 0


async def test_a_late_load_of_a_deleted_life_cannot_write_into_the_next(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    resource_id: str,
) -> None:
    held = Hold("load", "before")
    async with run_worker(held):
        await api.put(f"/resources/{resource_id}", json={"info": {"life": "first"}})
        await asyncio.wait_for(held.reached.wait(), 30)
        assert (await api.delete(f"/resources/{resource_id}")).status_code == 204
        again = await api.put(f"/resources/{resource_id}", json={"info": {"life": "second"}})
        second = await wait_for_etl(api, resource_id, again.json()["version"])
        held.release.set()  # the first life's load runs now
        await asyncio.sleep(0.5)
        final = (await api.get(f"/resources/{resource_id}")).json()

    assert again.status_code == 201
    assert again.json()["version"] == 2  # versions never go backwards across a DELETE
    assert second["context"] == {"life": "second"}
    assert final["context"] == {"life": "second"}
    assert final["context_version"] == 2


async def test_versions_continue_after_a_delete(
    api: httpx.AsyncClient, worker: Worker, resource_id: str
) -> None:
    for _ in range(2):
        await api.put(f"/resources/{resource_id}", json={"info": {}})
    assert (await api.delete(f"/resources/{resource_id}")).status_code == 204

    recreated = await api.put(f"/resources/{resource_id}", json={"attributes": {"n": 3}})
    updated = await api.put(f"/resources/{resource_id}", json={"attributes": {"n": 4}})

    assert (recreated.status_code, recreated.json()["version"]) == (201, 3)
    assert (updated.status_code, updated.json()["version"]) == (200, 4)


async def _create(api: httpx.AsyncClient, run_worker: Callable[..., Any], resource_id: str) -> None:
    async with run_worker():
        await api.put(f"/resources/{resource_id}", json={"info": {"v": "1"}})
        await wait_for_etl(api, resource_id, 1)


async def _closed_status(handle: Any, within: float = 30.0) -> WorkflowExecutionStatus | None:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        status = (await handle.describe()).status
        if status != WorkflowExecutionStatus.RUNNING:
            return status  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{handle.id} did not close")


# --- 6. storage comes back to its baseline ---------------------------------------------------


async def test_the_janitor_collects_what_superseded_and_failed_runs_leave(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    enrichment: httpx.AsyncClient,
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    held = Hold("enrich", "after")
    async with run_worker(held):
        # v1 stops after enrich stored its output; v2 supersedes it.
        await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})
        await asyncio.wait_for(held.reached.wait(), 30)
        await api.put(f"/resources/{resource_id}", json={"info": {"country": "DE"}})
        await wait_for_etl(api, resource_id, 2)
        held.release.set()
        await wait_for_etl(api, resource_id, 2)
        # v3 fails in enrich, after normalize stored its output.
        await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})
        await api.put(f"/resources/{resource_id}", json={"info": {"country": "IT"}})
        await wait_for_etl(api, resource_id, 3)
        left_behind = await _counts(sessions, resource_id)
        await _until_versions_ended(sessions, resource_id)
        await collect(sessions, client, Janitor(step_output_grace_seconds=0))

    assert left_behind["step_outputs"] >= 1
    assert await _counts(sessions, resource_id) == {"versions": 3, "step_outputs": 0}


async def _until_versions_ended(
    sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    for _ in range(300):
        async with sessions() as session:
            open_ = await session.scalar(
                select(func.count()).where(
                    ResourceVersion.resource_id == resource_id,
                    ResourceVersion.etl_finished_at.is_(None),
                )
            )
        if not open_:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("ETLs did not end")


async def test_claims_of_accepted_upserts_outlive_their_ttl_while_workers_are_down(
    api: httpx.AsyncClient,
    run_worker: Callable[..., Any],
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    # No worker: the upsert is accepted and waits.
    accepted = await api.put(f"/resources/{resource_id}", json={"info": INFO}, headers=ASYNC)
    long_ago = datetime.now(UTC) - timedelta(days=30)
    async with sessions.begin() as session:
        await session.execute(
            update(BlobClaim)
            .where(BlobClaim.resource_id == resource_id)
            .values(created_at=long_ago)
        )
        await session.execute(
            update(Blob)
            .where(
                Blob.digest.in_(
                    select(BlobClaim.digest).where(BlobClaim.resource_id == resource_id)
                )
            )
            .values(created_at=long_ago)
        )
    await collect(sessions, client, Janitor(claim_ttl_seconds=60, blob_grace_seconds=60))
    async with run_worker():
        final = await wait_for_etl(api, resource_id, 1)

    assert accepted.status_code == 202
    assert final["etl"]["status"] == "succeeded"
    assert final["context"] == CONTEXT


# --- 7. GET /etl never fails on a workflow that cannot answer --------------------------------


@workflow.defn(name="UpsertWorkflow", sandboxed=False)
class _Unanswerable:
    """An `UpsertWorkflow` whose code cannot answer the `progress` query."""

    @workflow.run
    async def run(self, request: UpsertRequest) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.query
    def progress(self) -> EtlProgress:
        raise ApplicationError("this workflow's code cannot answer")


async def test_etl_view_answers_from_the_database_when_the_query_fails(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    await api.put(f"/resources/{resource_id}", json={"info": INFO})
    await wait_for_etl(api, resource_id, 1)
    queue = f"unanswerable-{resource_id}"
    async with Worker(client, task_queue=queue, workflows=[_Unanswerable]):
        handle = await client.start_workflow(
            "UpsertWorkflow",
            UpsertRequest(
                resource_id=resource_id, request_id="x", attributes_digest="", info_digest=""
            ),
            id=f"unanswerable:{resource_id}",
            task_queue=queue,
        )
        async with sessions.begin() as session:
            await session.execute(
                update(ResourceVersion)
                .where(ResourceVersion.resource_id == resource_id)
                .values(
                    etl_status="running", etl_workflow_id=handle.id, etl_run_id=handle.result_run_id
                )
            )
        etl = await api.get(f"/resources/{resource_id}/etl")
        await handle.terminate()

    assert etl.status_code == 200, etl.text
    assert (etl.json()["status"], etl.json()["live"]) == ("running", False)


# --- 8. truthful hints -----------------------------------------------------------------------


async def test_the_in_flight_409_says_how_long_the_lock_lasts(
    api: httpx.AsyncClient, settings: Settings, resource_id: str
) -> None:
    # No worker: the first request waits for its persist until the sync timeout.
    settings.api.sync_timeout_seconds = 3
    key = {"Idempotency-Key": f"k-{resource_id}"}
    first = asyncio.create_task(api.put(f"/resources/{resource_id}", json={}, headers=key))
    await asyncio.sleep(1)
    second = await api.put(f"/resources/{resource_id}", json={}, headers=key)
    await first

    lock = settings.api.sync_timeout_seconds + 30
    assert second.status_code == 409
    assert lock - 3 <= int(second.headers["Retry-After"]) <= lock
