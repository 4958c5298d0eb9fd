"""`/resources/{id}/etl`: the ETL of the latest version, live; and running it again."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.exceptions import WorkflowAlreadyStartedError

from api.deps import SessionDep, SessionsDep, SettingsDep, TemporalDep
from api.observability import WORKFLOWS_STARTED, correlation_id
from api.paths import ResourceIdPath, check_id, not_found
from api.problems import Problem, problem_responses
from api.ratelimit import require_write
from api.schemas import EtlRetryAccepted, EtlRunPublic, EtlStepPublic
from api.security import Scope, require_scopes
from api.workflows import etl_retry_options, live_progress, reconciled, start, ui_url
from upsertflow.contracts import IN_FLIGHT, EtlStatus, StepState, UpsertRequest
from upsertflow.models import ResourceVersion
from upsertflow.store.resources import current_version
from workflows import pipeline
from workflows.pipeline import PIPELINE

router = APIRouter(prefix="/resources", tags=["etl"], responses=problem_responses(401, 403))


async def _current_version(session: AsyncSession, resource_id: str) -> ResourceVersion:
    version = await current_version(session, resource_id)
    if version is None:
        raise not_found(resource_id)
    return version


@router.get(
    "/{resource_id:resource_id}/etl",
    operation_id="getResourceEtl",
    summary="The ETL of the latest version, step by step",
    response_model=EtlRunPublic,
    responses=problem_responses(404, 422),
    dependencies=[require_scopes(Scope.READ)],
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
    live = None
    if version.etl_status in IN_FLIGHT:
        # One look at the workflow: live while it runs; if it has ended, reconciled.
        live = await live_progress(client, version.etl_workflow_id, version.etl_run_id)
        if live is None:
            version = await reconciled(sessions, client, version)
    status = EtlStatus(version.etl_status)
    steps = [StepState.model_validate(step) for step in version.etl_steps] or [
        StepState(name=step.name) for step in PIPELINE
    ]
    return EtlRunPublic(
        resource_id=resource_id,
        version=version.version,
        status=status,
        workflow_id=version.etl_workflow_id,
        run_id=version.etl_run_id,
        ui_url=ui_url(settings, client.namespace, version.etl_workflow_id, version.etl_run_id),
        live=live is not None,
        error=version.etl_error,
        steps=[EtlStepPublic.model_validate(step.model_dump()) for step in live or steps],
    )


@router.post(
    "/{resource_id:resource_id}/etl/retry",
    operation_id="retryResourceEtl",
    summary="Run the ETL of the current version again",
    status_code=202,
    response_model=EtlRetryAccepted,
    responses=problem_responses(404, 409, 422, 429, 503),
    dependencies=[require_write(Scope.OPERATE)],
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
    version = await reconciled(sessions, client, await _current_version(session, resource_id))
    if version.etl_status in IN_FLIGHT:
        raise _etl_running(version)
    options = etl_retry_options(settings, version)
    WORKFLOWS_STARTED.labels("etl_retry").inc()
    try:
        handle = await start(
            client, _retry_request(version, notify=bool(settings.webhooks.url)), options
        )
    except WorkflowAlreadyStartedError:
        raise _already_retried(version) from None
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


def _retry_request(version: ResourceVersion, *, notify: bool) -> UpsertRequest:
    """The input of a workflow that runs the ETL of `version` again (and persists nothing)."""
    return UpsertRequest(
        resource_id=version.resource_id,
        request_id=uuid.uuid4().hex,
        attributes_digest="",
        info_digest=version.blob_digest,
        retry_of_version=version.version,
        correlation_id=correlation_id.get() or None,
        notify=notify,
        pipeline_version=pipeline.newest(),
    )


def _etl_running(version: ResourceVersion) -> Problem:
    return Problem(
        409,
        "etl-running",
        "The ETL is running",
        f"the ETL of {version.resource_id} v{version.version} is {version.etl_status}; "
        "retry it once it has ended",
    )


def _already_retried(version: ResourceVersion) -> Problem:
    return Problem(
        409,
        "etl-already-retried",
        "This ETL run was already retried",
        f"the ETL of {version.resource_id} v{version.version} was retried already; "
        "see GET /resources/{id}/etl",
    )
