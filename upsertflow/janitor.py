"""Keeping storage bounded and stored statuses true, now and then, in every worker.

Each round (`UPSERTFLOW_JANITOR__INTERVAL_SECONDS`):

1. reconciles ETL statuses that have been in flight for a while with Temporal
   (`upsertflow.reconcile`): a terminated or timed-out workflow leaves no
   resource `running` forever;
2. expires the claims of requests whose workflow is not open — never one whose
   workflow is still running, however long the workers have been down;
3. deletes step outputs and checkpoints of versions whose ETL ended a grace
   period ago (failed, superseded, cancelled: a loaded version's go at once);
4. deletes documents nothing refers to or claims, and expired idempotency keys.

Running it on several workers at once is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from upsertflow.naming import upsert_workflow_id
from upsertflow.reconcile import reconcile_stale
from upsertflow.settings import Janitor
from upsertflow.store.blobs import claims_older_than, delete_unreferenced_blobs, release_claims
from upsertflow.store.idempotency import delete_expired_keys
from upsertflow.store.versions import delete_ended_step_outputs

log = logging.getLogger("upsertflow.janitor")

#: Claims looked at per round: each costs one call to Temporal.
_CLAIMS_PER_ROUND = 500


@dataclass(frozen=True)
class Collected:
    claims: int
    blobs: int
    idempotency_keys: int
    step_outputs: int = 0
    reconciled: int = 0


async def expire_claims(
    sessions: async_sessionmaker[AsyncSession], client: Client, ttl: timedelta
) -> int:
    """Delete claims older than `ttl` whose request's workflow is not open (or never started)."""
    expired = [
        request_id
        for request_id, resource_id in await claims_older_than(sessions, ttl, _CLAIMS_PER_ROUND)
        # Accepted, waiting for a worker: its persist will need the documents.
        if resource_id is None
        or not await _workflow_open(client, upsert_workflow_id(resource_id, request_id))
    ]
    return await release_claims(sessions, expired) if expired else 0


async def _workflow_open(client: Client, workflow_id: str) -> bool:
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return description.status == WorkflowExecutionStatus.RUNNING


async def collect(
    sessions: async_sessionmaker[AsyncSession], client: Client, config: Janitor
) -> Collected:
    """Run one round (see the module docstring); return what it did."""
    collected = Collected(
        reconciled=await reconcile_stale(
            sessions, client, timedelta(seconds=config.reconcile_after_seconds)
        ),
        claims=await expire_claims(sessions, client, timedelta(seconds=config.claim_ttl_seconds)),
        step_outputs=await delete_ended_step_outputs(
            sessions, timedelta(seconds=config.step_output_grace_seconds)
        ),
        blobs=await delete_unreferenced_blobs(
            sessions, timedelta(seconds=config.blob_grace_seconds)
        ),
        idempotency_keys=await delete_expired_keys(sessions),
    )
    if collected != Collected(0, 0, 0):
        log.info("janitor round: %s", collected)
    return collected


async def run_periodically(
    sessions: async_sessionmaker[AsyncSession], client: Client, config: Janitor
) -> None:
    """Run a round every `interval_seconds` until cancelled; a failed round is logged."""
    while True:
        try:
            await collect(sessions, client, config)
        except Exception as error:
            log.warning("janitor round failed: %s", type(error).__name__)
        await asyncio.sleep(config.interval_seconds)
