"""`/resources`: upsert a resource, read it back with its ETL state."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError

from api.body import Document, check_content_type, parse_upsert_body, read_limited
from api.deps import SessionDep, SettingsDep, TemporalDep
from api.problems import Problem, problem_responses
from api.schemas import EtlRef, ResourcePublic, ResourceUpsert, UpsertAccepted
from upsertflow.contracts import EtlStatus, Persisted, UpsertRequest
from upsertflow.models import Blob, Resource, ResourceContext, ResourceVersion
from upsertflow.settings import Settings
from workflows import RESOURCE_ID, upsert_workflow_id
from workflows.upsert import UpsertWorkflow

log = logging.getLogger("upsertflow.api")

router = APIRouter(prefix="/resources", tags=["resources"])

_ID_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_RETRY_AFTER_SECONDS = "5"

ResourceIdPath = Annotated[
    str,
    Path(
        alias="resource_id",
        description="1–128 characters of `[A-Za-z0-9._~-]`, not `.` or `..`.",
        examples=["r1"],
    ),
]


def _check_id(resource_id: str) -> str:
    if not _ID_PATTERN.fullmatch(resource_id) or resource_id in (".", ".."):
        raise Problem(
            422,
            "invalid-id",
            "Invalid resource id",
            "a resource id is 1–128 characters of A–Z, a–z, 0–9, '.', '_', '~' and '-' "
            f"(and not '.' or '..'); got {resource_id[:140]!r}",
            errors=[{"field": "path.resource_id", "message": "invalid resource id"}],
        )
    return resource_id


def ui_url(settings: Settings, namespace: str, workflow_id: str, run_id: str | None) -> str:
    """Return the Temporal Web UI page of a workflow run."""
    base = settings.temporal_ui_url.rstrip("/")
    url = f"{base}/namespaces/{quote(namespace, safe='')}/workflows/{quote(workflow_id, safe='')}"
    return f"{url}/{run_id}/history" if run_id else url


def _temporal_unavailable(error: Exception) -> Problem:
    return Problem(
        503,
        "temporal-unavailable",
        "Temporal is unavailable",
        f"the upsert was not accepted; try again: {error}",
        headers={"Retry-After": _RETRY_AFTER_SECONDS},
    )


async def _store_documents(session: AsyncSession, *documents: Document) -> None:
    """Store documents by content address; an identical document is stored once."""
    rows = [
        {"digest": d.digest, "body": d.body, "size_bytes": len(d.body)}
        for d in {d.digest: d for d in documents}.values()
    ]
    await session.execute(pg_insert(Blob).values(rows).on_conflict_do_nothing())
    await session.commit()


@router.put(
    "/{resource_id:path}",
    operation_id="upsertResource",
    summary="Create or update a resource",
    status_code=201,
    response_model=None,
    responses={
        200: {"model": ResourcePublic, "description": "Updated: a new version was persisted."},
        201: {"model": ResourcePublic, "description": "Created: version 1 was persisted."},
        202: {
            "model": UpsertAccepted,
            "description": "Accepted: persisted and processed durably in the background.",
        },
        **problem_responses(400, 413, 415, 422, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": ResourceUpsert.model_json_schema()}},
        }
    },
)
async def upsert_resource(
    resource_id: ResourceIdPath,
    request: Request,
    session: SessionDep,
    client: TemporalDep,
    settings: SettingsDep,
    prefer: Annotated[
        str | None, Header(description="`respond-async` answers 202 at once.")
    ] = None,
) -> JSONResponse:
    """Persist a new version of the resource, then run its ETL durably.

    Waits until the version is persisted (not for the ETL) and answers `201` or
    `200`; with `Prefer: respond-async`, or when persisting takes longer than the
    sync timeout, answers `202` with `Location`. The work is durable either way.
    """
    _check_id(resource_id)
    check_content_type(request)
    raw = await read_limited(request, settings.limits.max_body_bytes)
    body = await asyncio.to_thread(parse_upsert_body, raw, settings.limits)
    request_id = uuid.uuid4().hex
    workflow_id = upsert_workflow_id(resource_id, request_id)
    await _store_documents(session, body.attributes, body.info)
    upsert = UpsertRequest(
        resource_id=resource_id,
        request_id=request_id,
        attributes_digest=body.attributes.digest,
        info_digest=body.info.digest,
        info_bytes=len(body.info.body),
    )
    start: dict[str, Any] = {
        "id": workflow_id,
        "task_queue": settings.task_queue,
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
        "search_attributes": TypedSearchAttributes([SearchAttributePair(RESOURCE_ID, resource_id)]),
        "static_summary": f"Upsert {resource_id}",
        "static_details": f"Request `{request_id}`, info {len(body.info.body)} bytes",
    }
    log.info(
        "upsert accepted",
        extra={"resource_id": resource_id, "request_id": request_id, "workflow_id": workflow_id},
    )
    headers = {"X-Request-ID": request_id, "Location": f"/resources/{resource_id}"}
    if prefer is not None and "respond-async" in prefer.lower():
        return await _accepted(client, settings, upsert, start, headers)
    operation = WithStartWorkflowOperation(UpsertWorkflow.run, upsert, **start)
    try:
        async with asyncio.timeout(settings.sync_timeout_seconds):
            persisted = await client.execute_update_with_start_workflow(
                UpsertWorkflow.persisted, start_workflow_operation=operation, id=request_id
            )
    except TimeoutError:
        return await _accepted(client, settings, upsert, start, headers)
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        raise Problem(
            422,
            "persist-failed",
            "The resource could not be persisted",
            str(getattr(cause, "message", cause)),
        ) from None
    except RPCError as error:
        raise _temporal_unavailable(error) from None
    handle = await operation.workflow_handle()
    run_id = handle.result_run_id or ""
    representation = _representation(
        settings, client, persisted, body.attributes.value, workflow_id, run_id
    )
    return JSONResponse(
        representation.model_dump(mode="json"),
        status_code=201 if persisted.created else 200,
        headers=headers,
    )


async def _accepted(
    client: Client,
    settings: Settings,
    upsert: UpsertRequest,
    start: dict[str, Any],
    headers: dict[str, str],
) -> JSONResponse:
    """Make sure the workflow exists (idempotently, by id) and answer 202."""
    try:
        handle = await client.start_workflow(UpsertWorkflow.run, upsert, **start)
    except RPCError as error:
        raise _temporal_unavailable(error) from None
    accepted = UpsertAccepted(
        id=upsert.resource_id,
        request_id=upsert.request_id,
        workflow_id=handle.id,
        run_id=handle.result_run_id,
        ui_url=ui_url(settings, client.namespace, handle.id, handle.result_run_id),
    )
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202, headers=headers)


def _representation(
    settings: Settings,
    client: Client,
    persisted: Persisted,
    attributes: dict[str, Any],
    workflow_id: str,
    run_id: str,
) -> ResourcePublic:
    return ResourcePublic(
        id=persisted.resource_id,
        version=persisted.version,
        attributes=attributes,
        created_at=persisted.created_at,
        updated_at=persisted.updated_at,
        context=None,
        context_version=None,
        etl=EtlRef(
            status=EtlStatus.PENDING,
            version=persisted.version,
            workflow_id=workflow_id,
            run_id=run_id,
            ui_url=ui_url(settings, client.namespace, workflow_id, run_id),
        ),
    )


@router.get(
    "/{resource_id:path}",
    operation_id="getResource",
    summary="Read a resource with its context and ETL state",
    response_model=ResourcePublic,
    responses=problem_responses(404, 422),
)
async def get_resource(
    resource_id: ResourceIdPath,
    session: SessionDep,
    client: TemporalDep,
    settings: SettingsDep,
) -> ResourcePublic:
    """Return the resource's latest version, its context and the state of its ETL."""
    _check_id(resource_id)
    row = (
        await session.execute(
            select(Resource, ResourceVersion, ResourceContext)
            .join(
                ResourceVersion,
                (ResourceVersion.resource_id == Resource.id)
                & (ResourceVersion.version == Resource.version),
            )
            .outerjoin(ResourceContext, ResourceContext.resource_id == Resource.id)
            .where(Resource.id == resource_id)
        )
    ).one_or_none()
    if row is None:
        raise Problem(404, "not-found", "Resource not found", f"no resource {resource_id!r}")
    resource, version, context = row
    return ResourcePublic(
        id=resource.id,
        version=resource.version,
        attributes=resource.attributes,
        created_at=resource.created_at,
        updated_at=resource.updated_at,
        context=context.records if context else None,
        context_version=context.version if context else None,
        etl=EtlRef(
            status=EtlStatus(version.etl_status),
            version=version.version,
            workflow_id=version.etl_workflow_id,
            run_id=version.etl_run_id,
            ui_url=ui_url(settings, client.namespace, version.etl_workflow_id, version.etl_run_id),
            error=version.etl_error,
        ),
    )
