"""What the API asks of Temporal: how its workflows start, and what it reads from them.

Every workflow the API starts gets its options here (`start_options`): the id
(`upsertflow.naming`), the task queue, the id policies, the `ResourceId` search
attribute and the static summary and details shown in the Temporal UI.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, TypedDict
from urllib.parse import quote

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from api.problems import RETRY_AFTER_SECONDS, Problem
from upsertflow.contracts import EtlProgress, Persisted, StepState, StepStatus, UpsertRequest
from upsertflow.models import ResourceVersion
from upsertflow.naming import RESOURCE_ID, etl_retry_workflow_id, upsert_workflow_id
from upsertflow.reconcile import reconcile_version
from upsertflow.settings import Settings
from upsertflow.temporal import UNREACHABLE
from workflows.upsert import UpsertWorkflow

_LIVE_TIMEOUT_SECONDS = 2.0


class StartOptions(TypedDict):
    """Keyword arguments of `Client.start_workflow` (and of a with-start operation)."""

    id: str
    task_queue: str
    id_conflict_policy: WorkflowIDConflictPolicy
    id_reuse_policy: WorkflowIDReusePolicy
    search_attributes: TypedSearchAttributes
    static_summary: str
    static_details: str


def start_options(
    settings: Settings, workflow_id: str, resource_id: str, summary: str, details: str
) -> StartOptions:
    """Start `workflow_id` once: a second start joins it while it runs, and is refused after."""
    return StartOptions(
        id=workflow_id,
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        # An id never gets a second run, even after its workflow closed.
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=TypedSearchAttributes([SearchAttributePair(RESOURCE_ID, resource_id)]),
        static_summary=summary,
        static_details=details,
    )


def upsert_options(settings: Settings, request: UpsertRequest) -> StartOptions:
    """The options of the workflow that applies one upsert request."""
    details = (
        f"Request `{request.request_id}`, correlation id `{request.correlation_id}`, "
        f"info {request.info_bytes} bytes"
    )
    if request.idempotency_key:
        details += f", Idempotency-Key `{request.idempotency_key[:80]}`"
    workflow_id = upsert_workflow_id(request.resource_id, request.request_id)
    return start_options(
        settings, workflow_id, request.resource_id, f"Upsert {request.resource_id}", details
    )


def etl_retry_options(settings: Settings, version: ResourceVersion) -> StartOptions:
    """The options of the workflow that retries the ETL run that last ran over `version`."""
    workflow_id = etl_retry_workflow_id(version.resource_id, version.version, version.etl_run_id)
    return start_options(
        settings,
        workflow_id,
        version.resource_id,
        f"Retry ETL {version.resource_id} v{version.version}",
        f"After run `{version.etl_run_id}` ended {version.etl_status}",
    )


def ui_url(settings: Settings, namespace: str, workflow_id: str, run_id: str | None) -> str:
    """Return the Temporal Web UI page of a workflow run."""
    base = settings.temporal_ui_url.rstrip("/")
    url = f"{base}/namespaces/{quote(namespace, safe='')}/workflows/{quote(workflow_id, safe='')}"
    return f"{url}/{run_id}/history" if run_id else url


def temporal_unavailable() -> Problem:
    return Problem(
        503,
        "temporal-unavailable",
        "Temporal is unavailable",
        "Temporal could not be reached, so the upsert may or may not have started; "
        "repeat the request later: with the same Idempotency-Key a repeat is safe "
        "(applied at most once), without one it may create another version",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


async def start(
    client: Client, request: UpsertRequest, options: StartOptions
) -> WorkflowHandle[Any, Any]:
    """Start an `UpsertWorkflow` (or join the open one of that id); `503` if Temporal is down.

    Raises `WorkflowAlreadyStartedError` if the workflow of that id has closed.
    """
    try:
        return await client.start_workflow(UpsertWorkflow.run, request, **options)
    except UNREACHABLE:
        raise temporal_unavailable() from None


async def start_and_wait_persisted(
    client: Client, request: UpsertRequest, options: StartOptions, wait_seconds: float
) -> tuple[Persisted, str] | None:
    """Start (or join) the upsert's workflow and wait until it has persisted the version.

    Return the version and the run id; None if that takes longer than `wait_seconds` (the
    workflow goes on). Raises `WorkflowAlreadyStartedError` if the workflow has closed,
    a `422` problem if it could not persist, a `503` one if Temporal is down.
    """
    operation = WithStartWorkflowOperation(UpsertWorkflow.run, request, **options)
    try:
        async with asyncio.timeout(wait_seconds):
            persisted = await client.execute_update_with_start_workflow(
                UpsertWorkflow.persisted, start_workflow_operation=operation, id=request.request_id
            )
        run_id = (await operation.workflow_handle()).result_run_id or ""
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        # Not persisted in time (the SDK reports the cancelled wait its way).
        return None
    except WorkflowUpdateFailedError as error:
        raise persist_failed(str(getattr(error.cause, "message", error.cause))) from None
    except UNREACHABLE:
        raise temporal_unavailable() from None
    return persisted, run_id


def persist_failed(detail: str) -> Problem:
    return Problem(422, "persist-failed", "The resource could not be persisted", detail)


async def reconciled(
    sessions: async_sessionmaker[AsyncSession], client: Client, version: ResourceVersion
) -> ResourceVersion:
    """The version with its ETL status made to agree with Temporal, if it was in flight."""
    with contextlib.suppress(*UNREACHABLE):  # Temporal down: say what PostgreSQL says
        return await reconcile_version(sessions, client, version)
    return version


async def live_progress(client: Client, workflow_id: str, run_id: str) -> list[StepState] | None:
    """Ask the running workflow for its steps; add attempts of the activity in progress."""
    handle = client.get_workflow_handle_for(UpsertWorkflow.run, workflow_id, run_id=run_id)
    try:
        async with asyncio.timeout(_LIVE_TIMEOUT_SECONDS):
            progress: EtlProgress = await handle.query(UpsertWorkflow.progress)
            description = await handle.describe()
    except (TimeoutError, RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
        # No worker answered, it just ended, or its code cannot answer (a failing
        # workflow task): the database has the last recorded state.
        return None
    if description.status != WorkflowExecutionStatus.RUNNING:
        return None  # it ended: what it recorded (or `reconciled`) says how
    pending: dict[str, Any] = {
        activity.activity_type.name: activity
        for activity in description.raw_description.pending_activities
    }
    for step in progress.steps:
        activity = pending.get(step.name)
        if activity is not None and step.status == StepStatus.RUNNING:
            step.attempts = activity.attempt
            if activity.HasField("last_failure"):
                step.error = activity.last_failure.message
    return progress.steps


async def cancel_all(client: Client, workflow_ids: Iterable[str]) -> tuple[int, int]:
    """Ask the workflows to cancel, all at once; return how many were reached and not."""
    outcomes = await asyncio.gather(
        *(_cancel(client, workflow_id) for workflow_id in workflow_ids), return_exceptions=True
    )
    failed = sum(1 for outcome in outcomes if isinstance(outcome, BaseException))
    return len(outcomes) - failed, failed


async def _cancel(client: Client, workflow_id: str) -> None:
    """Ask a workflow to cancel; one that has ended (or never started) needs nothing."""
    try:
        await client.get_workflow_handle(workflow_id).cancel()
    except RPCError as error:
        if error.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
            raise
