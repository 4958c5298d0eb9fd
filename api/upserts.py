"""Applying an upsert: store its documents, start (or join) its workflow, say how it went."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.exceptions import WorkflowAlreadyStartedError

from api.body import UpsertBody
from api.idempotency import Answer
from api.observability import WORKFLOWS_STARTED, correlation_id
from api.schemas import EtlRef, ResourcePublic, UpsertAccepted
from api.workflows import (
    StartOptions,
    persist_failed,
    start,
    start_and_wait_persisted,
    ui_url,
    upsert_options,
)
from upsertflow.contracts import EtlStatus, Persisted, UpsertRequest
from upsertflow.settings import Settings
from upsertflow.store.blobs import store_documents
from upsertflow.store.resources import persisted_by_request
from workflows import pipeline

log = logging.getLogger("upsertflow.api")


@dataclass(frozen=True)
class Upsert:
    """An upsert the API accepted: what to apply, and how to answer."""

    resource_id: str
    body: UpsertBody
    respond_async: bool
    idempotency_key: str | None

    def request(self, request_id: str, *, notify: bool = False) -> UpsertRequest:
        """The workflow's input: the documents by reference; `notify`: call the webhook."""
        return UpsertRequest(
            resource_id=self.resource_id,
            request_id=request_id,
            attributes_digest=self.body.attributes.digest,
            info_digest=self.body.info.digest,
            info_bytes=len(self.body.info.body),
            idempotency_key=self.idempotency_key,
            correlation_id=correlation_id.get() or None,
            notify=notify,
            pipeline_version=pipeline.newest(),
        )


async def apply_upsert(
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    upsert: Upsert,
    request_id: str,
) -> Answer:
    """Store the documents, start (or join) the request's workflow, wait unless asked not to.

    `201`/`200` with the resource once persisted; `202` for `Prefer: respond-async` or
    when persisting takes longer than the sync timeout.
    """
    await store_documents(
        sessions, upsert.resource_id, request_id, upsert.body.attributes, upsert.body.info
    )
    request = upsert.request(request_id, notify=bool(settings.webhooks.url))
    options = upsert_options(settings, request)
    headers = {"X-Request-ID": request_id, "Location": f"/resources/{upsert.resource_id}"}
    log.info(
        "upsert",
        extra={
            "resource_id": upsert.resource_id,
            "request_id": request_id,
            "workflow_id": options["id"],
        },
    )
    WORKFLOWS_STARTED.labels("upsert").inc()
    persisted = None
    if not upsert.respond_async:
        persisted = await _persisted(client, sessions, settings, request, options)
    if persisted is None:
        return await _accepted(client, settings, request, options, headers)
    return _persisted_answer(client, settings, upsert, options, headers, *persisted)


def _persisted_answer(
    client: Client,
    settings: Settings,
    upsert: Upsert,
    options: StartOptions,
    headers: dict[str, str],
    version: Persisted,
    run_id: str,
) -> Answer:
    """`201` (created) or `200` (updated) with the resource; its ETL is pending."""
    resource = ResourcePublic(
        id=version.resource_id,
        version=version.version,
        attributes=upsert.body.attributes.value,
        created_at=version.created_at,
        updated_at=version.updated_at,
        etl=EtlRef(
            status=EtlStatus.PENDING,
            version=version.version,
            workflow_id=options["id"],
            run_id=run_id,
            ui_url=ui_url(settings, client.namespace, options["id"], run_id),
        ),
    )
    return Answer(201 if version.created else 200, resource.model_dump(mode="json"), headers)


async def _persisted(
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    request: UpsertRequest,
    options: StartOptions,
) -> tuple[Persisted, str] | None:
    """The version the request persisted and its run; None if not within the sync timeout."""
    try:
        return await start_and_wait_persisted(
            client, request, options, settings.api.sync_timeout_seconds
        )
    except WorkflowAlreadyStartedError:
        # The request's workflow already closed (a resumed Idempotency-Key).
        found = await persisted_by_request(sessions, request.request_id)
        if found is None:
            raise persist_failed(
                f"the workflow {options['id']} of this request ended without persisting it; "
                "see its history"
            ) from None
        return found


async def _accepted(
    client: Client,
    settings: Settings,
    request: UpsertRequest,
    options: StartOptions,
    headers: dict[str, str],
) -> Answer:
    """Make sure the workflow exists (idempotently, by its id) and answer 202."""
    try:
        run_id = (await start(client, request, options)).result_run_id
    except WorkflowAlreadyStartedError:
        run_id = None  # it ran already: the work is done or under way
    accepted = UpsertAccepted(
        id=request.resource_id,
        request_id=request.request_id,
        workflow_id=options["id"],
        run_id=run_id,
        ui_url=ui_url(settings, client.namespace, options["id"], run_id),
    )
    return Answer(202, accepted.model_dump(mode="json"), headers)
