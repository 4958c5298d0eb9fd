"""`/resources`: upsert, read, list and delete resources."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.body import check_content_type, parse_upsert_body, read_limited
from api.deps import SessionDep, SessionsDep, SettingsDep, TemporalDep
from api.idempotency import REPLAY_HEADER, Claim, check_key, claim_key, store_response, unlock_key
from api.paths import ID_PATTERN, ResourceIdPath, check_id
from api.problems import Problem, problem_response, problem_responses
from api.schemas import (
    EtlRef,
    ResourceList,
    ResourcePublic,
    ResourceSummary,
    ResourceUpsert,
    UpsertAccepted,
)
from api.upserts import start_upsert, store_documents, ui_url
from upsertflow.contracts import EtlStatus
from upsertflow.models import Resource, ResourceContext, ResourceVersion, is_current_version
from upsertflow.reconcile import IN_FLIGHT, reconcile_version
from upsertflow.settings import Settings
from upsertflow.store.deletion import delete_resource as delete_stored
from upsertflow.temporal import UNREACHABLE

log = logging.getLogger("upsertflow.api")

router = APIRouter(prefix="/resources", tags=["resources"])


@router.put(
    "/{resource_id:resource_id}",
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
        **problem_responses(400, 409, 413, 415, 422, 503),
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
    if idempotency_key is not None:
        check_key(idempotency_key)
    raw = await read_limited(request, settings.limits.max_body_bytes)
    body = await asyncio.to_thread(parse_upsert_body, raw, settings.limits)
    respond_async = prefer is not None and "respond-async" in prefer.lower()
    request_id = uuid.uuid4().hex
    scope = f"PUT /resources/{resource_id}"
    if idempotency_key is not None:
        fingerprint = hashlib.sha256(
            f"{body.attributes.digest}:{body.info.digest}".encode()
        ).hexdigest()
        state = await claim_key(
            sessions,
            idempotency_key,
            scope,
            fingerprint,
            ttl=timedelta(seconds=settings.idempotency_ttl_seconds),
            lock_for=timedelta(seconds=settings.sync_timeout_seconds + 30),
        )
        if state.claim is Claim.REPLAY:
            assert state.status_code is not None and state.body is not None
            return Response(
                state.body,
                status_code=state.status_code,
                headers={**(state.headers or {}), REPLAY_HEADER: "true"},
                media_type="application/json",
            )
        request_id = state.request_id
    try:
        await store_documents(sessions, resource_id, request_id, body.attributes, body.info)
        answer = await start_upsert(
            client,
            sessions,
            settings,
            resource_id,
            body,
            request_id,
            respond_async,
            idempotency_key,
        )
    except Problem as problem:
        if idempotency_key is not None:
            if problem.status == 422:  # the data cannot be persisted: final, replay it
                refused = problem_response(problem)
                await store_response(sessions, idempotency_key, scope, 422, bytes(refused.body), {})
            else:
                await unlock_key(sessions, idempotency_key, scope)
        raise
    except BaseException:
        if idempotency_key is not None:
            await unlock_key(sessions, idempotency_key, scope)
        raise
    response = JSONResponse(answer.body, status_code=answer.status_code, headers=answer.headers)
    if idempotency_key is not None:
        await store_response(
            sessions,
            idempotency_key,
            scope,
            answer.status_code,
            bytes(response.body),
            answer.headers,
        )
    return response


@router.get(
    "",
    operation_id="listResources",
    summary="List resources, page by page",
    response_model=ResourceList,
    responses=problem_responses(400, 422),
)
async def list_resources(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    etl_status: Annotated[
        EtlStatus | None, Query(description="Only resources whose latest ETL has this status.")
    ] = None,
) -> ResourceList:
    """Return resources in id order; follow `next_cursor` for the next page.

    Pages are keyed by id, so resources created while paging never shift them.
    """
    query = (
        select(Resource.id, Resource.version, Resource.updated_at, ResourceVersion.etl_status)
        .join(ResourceVersion, is_current_version())
        .order_by(Resource.id)
        .limit(limit + 1)
    )
    if cursor is not None:
        query = query.where(Resource.id > _decode_cursor(cursor))
    if etl_status is not None:
        query = query.where(ResourceVersion.etl_status == etl_status)
    rows = (await session.execute(query)).all()
    items = [
        ResourceSummary(
            id=row.id,
            version=row.version,
            updated_at=row.updated_at,
            etl_status=EtlStatus(row.etl_status),
        )
        for row in rows[:limit]
    ]
    more = len(rows) > limit
    return ResourceList(items=items, next_cursor=_encode_cursor(items[-1].id) if more else None)


def _encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    """The last id of the previous page; anything that is not one is a 400."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        last_id = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        last_id = ""
    if not ID_PATTERN.fullmatch(last_id):
        raise Problem(
            400, "invalid-cursor", "Invalid cursor", "use the `next_cursor` of a previous page"
        )
    return last_id


@router.get(
    "/{resource_id:resource_id}",
    operation_id="getResource",
    summary="Read a resource with its context and ETL state",
    response_model=ResourcePublic,
    responses=problem_responses(404, 422),
)
async def get_resource(
    resource_id: ResourceIdPath,
    session: SessionDep,
    sessions: SessionsDep,
    client: TemporalDep,
    settings: SettingsDep,
) -> ResourcePublic:
    """Return the resource's latest version, its context and the state of its ETL."""
    check_id(resource_id)
    return await load_resource(session, sessions, client, settings, resource_id)


async def load_resource(
    session: AsyncSession,
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    settings: Settings,
    resource_id: str,
) -> ResourcePublic:
    row = (
        await session.execute(
            select(Resource, ResourceVersion, ResourceContext)
            .join(ResourceVersion, is_current_version())
            .outerjoin(ResourceContext, ResourceContext.resource_id == Resource.id)
            .where(Resource.id == resource_id)
        )
    ).one_or_none()
    if row is None:
        raise not_found(resource_id)
    resource, version, context = row
    if version.etl_status in IN_FLIGHT:
        with contextlib.suppress(*UNREACHABLE):  # Temporal down: say what PostgreSQL says
            version = await reconcile_version(sessions, client, version)
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


def not_found(resource_id: str) -> Problem:
    return Problem(404, "not-found", "Resource not found", f"no resource {resource_id!r}")


@router.delete(
    "/{resource_id:resource_id}",
    operation_id="deleteResource",
    summary="Cancel a resource's work and delete it",
    status_code=204,
    response_class=Response,
    responses=problem_responses(404, 422, 503),
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
    outcomes = await asyncio.gather(
        *(_cancel(client, workflow_id) for workflow_id in deleted.workflow_ids),
        return_exceptions=True,
    )
    failed = sum(1 for outcome in outcomes if isinstance(outcome, BaseException))
    log.info(
        "resource deleted",
        extra={
            "resource_id": resource_id,
            "workflows_cancelled": len(outcomes) - failed,
            "workflows_not_reached": failed,
        },
    )
    return Response(status_code=204)


async def _cancel(client: Client, workflow_id: str) -> None:
    """Ask a workflow to cancel; one that has ended (or never started) needs nothing."""
    try:
        await client.get_workflow_handle(workflow_id).cancel()
    except RPCError as error:
        if error.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
            raise
