"""Starting upsert workflows from the API, and the representations of resources."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from api.body import Document, UpsertBody
from api.observability import WORKFLOWS_STARTED, correlation_id
from api.problems import Problem
from api.schemas import EtlRef, ResourcePublic, UpsertAccepted
from upsertflow.contracts import EtlStatus, Persisted, UpsertRequest
from upsertflow.models import Blob, BlobClaim, Resource, ResourceVersion, persisted_from
from upsertflow.naming import RESOURCE_ID, upsert_workflow_id
from upsertflow.settings import Settings
from upsertflow.temporal import UNREACHABLE
from workflows.upsert import UpsertWorkflow

log = logging.getLogger("upsertflow.api")

RETRY_AFTER_SECONDS = "5"


def ui_url(settings: Settings, namespace: str, workflow_id: str, run_id: str | None) -> str:
    """Return the Temporal Web UI page of a workflow run."""
    base = settings.temporal_ui_url.rstrip("/")
    url = f"{base}/namespaces/{quote(namespace, safe='')}/workflows/{quote(workflow_id, safe='')}"
    return f"{url}/{run_id}/history" if run_id else url


def temporal_unavailable(error: Exception) -> Problem:
    return Problem(
        503,
        "temporal-unavailable",
        "Temporal is unavailable",
        "Temporal could not be reached, so the upsert may or may not have started; "
        "repeat the request later: with the same Idempotency-Key a repeat is safe "
        "(applied at most once), without one it may create another version",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


@dataclass(frozen=True)
class Answer:
    """A response to give (and, with an Idempotency-Key, to replay)."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str]


async def store_documents(
    sessions: async_sessionmaker[AsyncSession], resource_id: str, request_id: str, *docs: Document
) -> None:
    """Store documents by content address (once each), claimed by the request until it persists.

    Nothing else refers to them yet: the claim keeps the janitor away. Should the
    workflow never start (the API died, Temporal was down), the claim expires and
    the janitor collects documents nobody refers to.
    """
    unique = {d.digest: d for d in docs}
    rows = [
        {"digest": d.digest, "body": d.body, "size_bytes": len(d.body)} for d in unique.values()
    ]
    claims = [
        {"request_id": request_id, "digest": digest, "resource_id": resource_id}
        for digest in unique
    ]
    async with sessions.begin() as session:
        statement = pg_insert(Blob).values(rows)
        # Storing known content again renews it, so no collection can take it meanwhile.
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[Blob.digest], set_={"created_at": func.now()}
            )
        )
        await session.execute(pg_insert(BlobClaim).values(claims).on_conflict_do_nothing())


async def start_upsert(
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    resource_id: str,
    body: UpsertBody,
    request_id: str,
    respond_async: bool,
    idempotency_key: str | None,
) -> Answer:
    """Start (or join) the request's workflow; wait for persistence unless asked not to."""
    workflow_id = upsert_workflow_id(resource_id, request_id)
    upsert = UpsertRequest(
        resource_id=resource_id,
        request_id=request_id,
        attributes_digest=body.attributes.digest,
        info_digest=body.info.digest,
        info_bytes=len(body.info.body),
        idempotency_key=idempotency_key,
        correlation_id=correlation_id.get() or None,
    )
    details = (
        f"Request `{request_id}`, correlation id `{upsert.correlation_id}`, "
        f"info {len(body.info.body)} bytes"
    )
    if idempotency_key:
        details += f", Idempotency-Key `{idempotency_key[:80]}`"
    start: dict[str, Any] = {
        "id": workflow_id,
        "task_queue": settings.task_queue,
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        # A request id never gets a second run, even after its workflow closed.
        "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
        "search_attributes": TypedSearchAttributes([SearchAttributePair(RESOURCE_ID, resource_id)]),
        "static_summary": f"Upsert {resource_id}",
        "static_details": details,
    }
    headers = {"X-Request-ID": request_id, "Location": f"/resources/{resource_id}"}
    log.info(
        "upsert",
        extra={"resource_id": resource_id, "request_id": request_id, "workflow_id": workflow_id},
    )
    WORKFLOWS_STARTED.labels("upsert").inc()
    if respond_async:
        return await _accepted(client, settings, upsert, start, headers)
    operation = WithStartWorkflowOperation(UpsertWorkflow.run, upsert, **start)
    try:
        async with asyncio.timeout(settings.sync_timeout_seconds):
            persisted = await client.execute_update_with_start_workflow(
                UpsertWorkflow.persisted, start_workflow_operation=operation, id=request_id
            )
        run_id = (await operation.workflow_handle()).result_run_id or ""
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        # Not persisted within the sync timeout (the SDK reports the cancelled wait its way).
        return await _accepted(client, settings, upsert, start, headers)
    except WorkflowAlreadyStartedError:
        # The request's workflow already closed (a resumed Idempotency-Key).
        found = await persisted_by_request(sessions, request_id)
        if found is None:
            raise Problem(
                422,
                "persist-failed",
                "The resource could not be persisted",
                f"the workflow {workflow_id} of this request ended without persisting it; "
                "see its history",
            ) from None
        persisted, run_id = found
    except WorkflowUpdateFailedError as error:
        raise Problem(
            422,
            "persist-failed",
            "The resource could not be persisted",
            str(getattr(error.cause, "message", error.cause)),
        ) from None
    except UNREACHABLE as error:
        raise temporal_unavailable(error) from None
    resource = ResourcePublic(
        id=persisted.resource_id,
        version=persisted.version,
        attributes=body.attributes.value,
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
    return Answer(201 if persisted.created else 200, resource.model_dump(mode="json"), headers)


async def _accepted(
    client: Client,
    settings: Settings,
    upsert: UpsertRequest,
    start: dict[str, Any],
    headers: dict[str, str],
) -> Answer:
    """Make sure the workflow exists (idempotently, by its id) and answer 202."""
    try:
        handle = await client.start_workflow(UpsertWorkflow.run, upsert, **start)
        run_id = handle.result_run_id
    except WorkflowAlreadyStartedError:
        run_id = None  # it ran already: the work is done or under way
    except UNREACHABLE as error:
        raise temporal_unavailable(error) from None
    accepted = UpsertAccepted(
        id=upsert.resource_id,
        request_id=upsert.request_id,
        workflow_id=start["id"],
        run_id=run_id,
        ui_url=ui_url(settings, client.namespace, start["id"], run_id),
    )
    return Answer(202, accepted.model_dump(mode="json"), headers)


async def persisted_by_request(
    sessions: async_sessionmaker[AsyncSession], request_id: str
) -> tuple[Persisted, str] | None:
    """Return the version a request persisted, and the run that persisted it."""
    async with sessions() as session:
        row = (
            await session.execute(
                select(ResourceVersion, Resource.created_at)
                .join(Resource, Resource.id == ResourceVersion.resource_id)
                .where(ResourceVersion.request_id == request_id)
            )
        ).one_or_none()
    if row is None:
        return None
    version, created_at = row
    return persisted_from(version, created_at), version.etl_run_id
