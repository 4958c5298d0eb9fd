"""`/resources`: upsert, read, list and delete resources."""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from api.body import check_content_type, read_upsert_body
from api.cursors import after_resource, resource_cursor
from api.deps import SessionDep, SessionsDep, SettingsDep, TemporalDep
from api.idempotency import Idempotency
from api.paths import ResourceIdPath, check_id, not_found
from api.problems import problem_responses
from api.ratelimit import require_write
from api.schemas import (
    EtlRef,
    ResourceList,
    ResourcePublic,
    ResourceSummary,
    ResourceUpsert,
    UpsertAccepted,
)
from api.security import Scope, require_scopes
from api.upserts import Upsert, apply_upsert
from api.workflows import cancel_all, reconciled, ui_url
from upsertflow.contracts import EtlStatus
from upsertflow.models import ResourceVersion
from upsertflow.settings import Settings
from upsertflow.store import resources as store
from upsertflow.store.deletion import delete_resource as delete_stored
from upsertflow.store.resources import ResourceRead

log = logging.getLogger("upsertflow.api")

router = APIRouter(prefix="/resources", tags=["resources"], responses=problem_responses(401, 403))


@router.put(
    "/{resource_id:resource_id}",
    operation_id="upsertResource",
    summary="Create or update a resource",
    status_code=201,
    response_model=None,
    dependencies=[require_write(Scope.WRITE)],
    responses={
        200: {"model": ResourcePublic, "description": "Updated: a new version was persisted."},
        201: {"model": ResourcePublic, "description": "Created: version 1 was persisted."},
        202: {
            "model": UpsertAccepted,
            "description": "Accepted: persisted and processed durably in the background.",
        },
        **problem_responses(400, 409, 413, 415, 422, 429, 503),
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
    sessions: SessionsDep,
    client: TemporalDep,
    settings: SettingsDep,
    prefer: Annotated[
        str | None, Header(description="`respond-async` answers 202 at once.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(description="Makes repeats of this request safe: they replay the first answer."),
    ] = None,
) -> Response:
    """Persist a new version of the resource, then run its ETL durably.

    Waits until the version is persisted (not for the ETL) and answers `201` or
    `200`; with `Prefer: respond-async`, or when persisting takes longer than the
    sync timeout, answers `202` with `Location`. The work is durable either way.
    """
    check_id(resource_id)
    check_content_type(request)
    idempotency = Idempotency(idempotency_key, scope=f"PUT /resources/{resource_id}")
    body = await read_upsert_body(request, settings.limits)
    respond_async = prefer is not None and "respond-async" in prefer.lower()
    upsert = Upsert(resource_id, body, respond_async, idempotency_key)
    return await idempotency.respond(
        sessions,
        body.fingerprint,
        functools.partial(apply_upsert, client, sessions, settings, upsert),
        ttl=timedelta(seconds=settings.api.idempotency_ttl_seconds),
        lock_for=timedelta(seconds=settings.api.sync_timeout_seconds + 30),
    )


@router.get(
    "",
    operation_id="listResources",
    summary="List resources, page by page",
    response_model=ResourceList,
    responses=problem_responses(400, 422),
    dependencies=[require_scopes(Scope.READ)],
)
async def list_resources(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    etl_status: Annotated[
        EtlStatus | None, Query(description="Only resources whose latest ETL has this status.")
    ] = None,
    pipeline_version_lt: Annotated[
        int | None,
        Query(
            ge=1,
            le=2**31 - 1,
            description="Only resources whose context was computed by a pipeline output version "
            "below this (or by an unknown one): the contexts to reprocess.",
        ),
    ] = None,
) -> ResourceList:
    """Return resources in id order; follow `next_cursor` for the next page.

    Pages are keyed by id, so resources created while paging never shift them.
    """
    after = after_resource(cursor) if cursor is not None else None
    rows, more = await store.list_resources(
        session,
        after=after,
        limit=limit,
        etl_status=etl_status,
        pipeline_version_lt=pipeline_version_lt,
    )
    items = [ResourceSummary(**vars(row)) for row in rows]
    return ResourceList(items=items, next_cursor=resource_cursor(items[-1].id) if more else None)


@router.get(
    "/{resource_id:resource_id}",
    operation_id="getResource",
    summary="Read a resource with its context and ETL state",
    response_model=ResourcePublic,
    responses=problem_responses(404, 422),
    dependencies=[require_scopes(Scope.READ)],
)
async def get_resource(
    resource_id: ResourceIdPath,
    session: SessionDep,
    sessions: SessionsDep,
    client: TemporalDep,
    settings: SettingsDep,
) -> ResourcePublic:
    """Return the resource's latest version, the state of its ETL and its context.

    The context is inline while it is small (`context`); `context_url` pages any context.
    """
    check_id(resource_id)
    read = await store.read_resource(
        session, resource_id, settings.limits.max_inline_context_records
    )
    if read is None:
        raise not_found(resource_id)
    version = await reconciled(sessions, client, read.version)
    return _resource_public(read, version, settings, client.namespace)


def _resource_public(
    read: ResourceRead, version: ResourceVersion, settings: Settings, namespace: str
) -> ResourcePublic:
    resource, context = read.resource, read.context
    return ResourcePublic(
        id=resource.id,
        version=resource.version,
        attributes=resource.attributes,
        created_at=resource.created_at,
        updated_at=resource.updated_at,
        context=dict(sorted(read.records.items())) if read.records is not None else None,
        context_version=context.load.version if context else None,
        context_records=context.record_count if context else None,
        context_pipeline_version=context.pipeline_version if context else None,
        context_url=f"/resources/{resource.id}/context" if context else None,
        etl=EtlRef(
            status=EtlStatus(version.etl_status),
            version=version.version,
            workflow_id=version.etl_workflow_id,
            run_id=version.etl_run_id,
            ui_url=ui_url(settings, namespace, version.etl_workflow_id, version.etl_run_id),
            error=version.etl_error,
        ),
    )


@router.delete(
    "/{resource_id:resource_id}",
    operation_id="deleteResource",
    summary="Cancel a resource's work and delete it",
    status_code=204,
    response_class=Response,
    responses=problem_responses(404, 422, 429, 503),
    dependencies=[require_write(Scope.OPERATE)],
)
async def delete_resource(
    resource_id: ResourceIdPath, sessions: SessionsDep, client: TemporalDep
) -> Response:
    """Cancel the resource's work, then delete it, its context and stored info.

    Requests accepted but not persisted yet are withdrawn: none of them, and no
    late attempt of its running work, can bring the resource back after the `204`.
    """
    check_id(resource_id)
    deleted = await delete_stored(sessions, resource_id, timedelta(minutes=1))
    if not deleted.found:
        raise not_found(resource_id)
    # Nothing that is cancelled here can write any more (fenced in PostgreSQL): the
    # cancellations only stop the work early, so they run together and nobody waits.
    cancelled, not_reached = await cancel_all(client, deleted.workflow_ids)
    log.info(
        "resource deleted",
        extra={
            "resource_id": resource_id,
            "workflows_cancelled": cancelled,
            "workflows_not_reached": not_reached,
        },
    )
    return Response(status_code=204)
