"""`/resources/{id}/etl`: the ETL of the latest version, live; and running it again."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client, WorkflowQueryFailedError, WorkflowQueryRejectedError
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.deps import SessionDep, SessionsDep, SettingsDep, TemporalDep
from api.observability import WORKFLOWS_STARTED, correlation_id
from api.paths import ResourceIdPath, check_id
from api.problems import Problem, problem_responses
from api.routes.resources import not_found
from api.schemas import EtlRetryAccepted, EtlRunPublic, EtlStepPublic
from api.upserts import temporal_unavailable, ui_url
from upsertflow.contracts import EtlStatus, StepState, StepStatus, UpsertRequest
from upsertflow.models import Resource, ResourceVersion, is_current_version
from upsertflow.naming import RESOURCE_ID, etl_retry_workflow_id
from upsertflow.reconcile import IN_FLIGHT, reconcile_version
from upsertflow.temporal import UNREACHABLE
from workflows.pipeline import PIPELINE
from workflows.upsert import UpsertWorkflow

router = APIRouter(prefix="/resources", tags=["etl"])

_LIVE_TIMEOUT_SECONDS = 2.0


async def _current_version(session: AsyncSession, resource_id: str) -> ResourceVersion:
    version = await session.scalar(
        select(ResourceVersion)
        .join(Resource, is_current_version())
        .where(Resource.id == resource_id)
    )
    if version is None:
        raise not_found(resource_id)
    return version


@router.get(
    "/{resource_id:resource_id}/etl",
    operation_id="getResourceEtl",
    summary="The ETL of the latest version, step by step",
    response_model=EtlRunPublic,
    responses=problem_responses(404, 422),
)
async def get_etl(
    resource_id: ResourceIdPath,
    session: SessionDep,
    sessions: SessionsDep,
    client: TemporalDep,
    settings: SettingsDep,
) -> EtlRunPublic:
    """Each step's status, attempts, times and last error; live while the ETL runs."""
    check_id(resource_id)
    version = await _current_version(session, resource_id)
    version = await _reconciled(sessions, client, version)
    status = EtlStatus(version.etl_status)
    error = version.etl_error
    steps = [StepState.model_validate(step) for step in version.etl_steps] or [
        StepState(name=step.name) for step in PIPELINE
    ]
    live = False
    if status in IN_FLIGHT:
        progress = await _live_progress(client, version.etl_workflow_id, version.etl_run_id)
        if progress is not None:
            steps, live = progress, True
    return EtlRunPublic(
        resource_id=resource_id,
        version=version.version,
        status=status,
        workflow_id=version.etl_workflow_id,
        run_id=version.etl_run_id,
        ui_url=ui_url(settings, client.namespace, version.etl_workflow_id, version.etl_run_id),
        live=live,
        error=error,
        steps=[EtlStepPublic.model_validate(step.model_dump()) for step in steps],
    )


async def _reconciled(
    sessions: async_sessionmaker[AsyncSession], client: Client, version: ResourceVersion
) -> ResourceVersion:
    """The version with its ETL status made to agree with Temporal, if it was in flight."""
    try:
        return await reconcile_version(sessions, client, version)
    except UNREACHABLE:
        return version  # Temporal is down: say what PostgreSQL says


async def _live_progress(client: Client, workflow_id: str, run_id: str) -> list[StepState] | None:
    """Ask the running workflow for its steps; add attempts of the activity in progress."""
    handle = client.get_workflow_handle_for(UpsertWorkflow.run, workflow_id, run_id=run_id)
    try:
        async with asyncio.timeout(_LIVE_TIMEOUT_SECONDS):
            progress = await handle.query(UpsertWorkflow.progress)
            description = await handle.describe()
    except (TimeoutError, RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
        # No worker answered, it just ended, or its code cannot answer (a failing
        # workflow task): the database has the last recorded state.
        return None
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


@router.post(
    "/{resource_id:resource_id}/etl/retry",
    operation_id="retryResourceEtl",
    summary="Run the ETL of the current version again",
    status_code=202,
    response_model=EtlRetryAccepted,
    responses=problem_responses(404, 409, 422, 503),
)
async def retry_etl(
    resource_id: ResourceIdPath,
    session: SessionDep,
    sessions: SessionsDep,
    client: TemporalDep,
    settings: SettingsDep,
) -> JSONResponse:
    """Run the ETL of the current version again, from the start, and reload its context.

    After a failure, or after an external dependency was fixed (so also after a
    success: the context is recomputed).
    """
    check_id(resource_id)
    version = await _current_version(session, resource_id)
    version = await _reconciled(sessions, client, version)
    if version.etl_status in IN_FLIGHT:
        raise Problem(
            409,
            "etl-running",
            "The ETL is running",
            f"the ETL of {resource_id} v{version.version} is {version.etl_status}; "
            "retry it once it has ended",
        )
    workflow_id = etl_retry_workflow_id(resource_id, version.version, version.etl_run_id)
    request = UpsertRequest(
        resource_id=resource_id,
        request_id=uuid.uuid4().hex,
        attributes_digest="",
        info_digest=version.blob_digest,
        retry_of_version=version.version,
        correlation_id=correlation_id.get() or None,
    )
    WORKFLOWS_STARTED.labels("etl_retry").inc()
    try:
        handle = await client.start_workflow(
            UpsertWorkflow.run,
            request,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [SearchAttributePair(RESOURCE_ID, resource_id)]
            ),
            static_summary=f"Retry ETL {resource_id} v{version.version}",
            static_details=f"After run `{version.etl_run_id}` ended {version.etl_status}",
        )
    except WorkflowAlreadyStartedError:
        raise Problem(
            409,
            "etl-already-retried",
            "This ETL run was already retried",
            f"the ETL of {resource_id} v{version.version} was retried already; "
            "see GET /resources/{id}/etl",
        ) from None
    except UNREACHABLE as error:
        raise temporal_unavailable(error) from None
    accepted = EtlRetryAccepted(
        resource_id=resource_id,
        version=version.version,
        workflow_id=handle.id,
        run_id=handle.result_run_id,
        ui_url=ui_url(settings, client.namespace, handle.id, handle.result_run_id),
    )
    return JSONResponse(
        accepted.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/resources/{resource_id}/etl"},
    )
