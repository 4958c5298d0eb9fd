"""Bring the stored ETL status of a version in line with its workflow in Temporal.

The workflow records how its ETL ended (its `load` when it succeeded, from pipeline v5;
`record_outcome` otherwise). When it cannot — an
operator terminated it in the UI or CLI, it timed out, its last activity ran out
of its deadline — PostgreSQL would say `pending`/`running` forever. Whoever
reads such a status (the API, and the janitor now and then) asks Temporal how
the recorded run ended and stores that, so the status always comes to agree
with Temporal and an ended ETL can always be retried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from upsertflow.contracts import IN_FLIGHT, EtlProgress, EtlStatus
from upsertflow.logs import bounded
from upsertflow.models import ResourceVersion
from upsertflow.store.versions import finish_in_flight, in_flight_since

log = logging.getLogger("upsertflow.reconcile")

_CLOSED_WITHOUT_RESULT = {
    WorkflowExecutionStatus.TERMINATED: "the workflow was terminated in Temporal",
    WorkflowExecutionStatus.TIMED_OUT: "the workflow timed out in Temporal",
    WorkflowExecutionStatus.CANCELED: "the workflow was cancelled",
}


@dataclass(frozen=True)
class Outcome:
    """How a closed workflow ended its ETL."""

    status: EtlStatus
    error: str | None
    steps: list[dict[str, Any]] | None = field(default=None)


async def workflow_outcome(client: Client, workflow_id: str) -> Outcome | None:
    """Return how the workflow's latest run ended, or None while it is still running.

    The latest run, not the recorded one: a workflow reset in the UI goes on in a
    new run, and the run it was reset from shows as terminated.
    """
    handle = client.get_workflow_handle(workflow_id, result_type=EtlProgress)
    try:
        description = await handle.describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return Outcome(EtlStatus.FAILED, "the workflow no longer exists in Temporal")
        raise
    status = description.status
    if status in (None, WorkflowExecutionStatus.RUNNING, WorkflowExecutionStatus.CONTINUED_AS_NEW):
        return None
    if status in _CLOSED_WITHOUT_RESULT:
        closed = EtlStatus.CANCELLED if status == WorkflowExecutionStatus.CANCELED else None
        return Outcome(closed or EtlStatus.FAILED, _CLOSED_WITHOUT_RESULT[status])
    try:
        progress = await handle.result()
    except WorkflowFailureError as failure:
        cause = failure.cause
        message = getattr(cause, "message", None) or str(cause or failure)
        return Outcome(EtlStatus.FAILED, bounded(f"the workflow failed: {message}"))
    return Outcome(
        progress.status,
        progress.error,
        [step.model_dump(mode="json") for step in progress.steps],
    )


async def reconcile_version(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    version: ResourceVersion,
) -> ResourceVersion:
    """Store how the version's recorded ETL run ended, if it ended unrecorded.

    Return the version as it now stands (the same object, updated). Only a status
    still in flight, of the same run, is changed: a concurrent `record_outcome`
    or a retry that claimed the ETL meanwhile wins.
    """
    if version.etl_status not in IN_FLIGHT:
        return version
    outcome = await workflow_outcome(client, version.etl_workflow_id)
    if outcome is None:
        return version
    values: dict[str, Any] = {"etl_status": outcome.status, "etl_error": outcome.error}
    if outcome.steps is not None:
        values["etl_steps"] = outcome.steps
    changed = await finish_in_flight(sessions, version, values)
    if changed is not None:
        log.info(
            "reconciled the ETL of %s v%d with Temporal: %s",
            version.resource_id,
            version.version,
            outcome.status.value,
            extra={"resource_id": version.resource_id, "workflow_id": version.etl_workflow_id},
        )
        version.etl_status = outcome.status
        version.etl_error = outcome.error
        version.etl_finished_at = changed
        if outcome.steps is not None:
            version.etl_steps = outcome.steps
    return version


async def reconcile_stale(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    older_than: timedelta,
    limit: int = 200,
) -> int:
    """Reconcile up to `limit` versions whose ETL has been in flight for `older_than`."""
    repaired = 0
    for version in await in_flight_since(sessions, datetime.now(UTC) - older_than, limit):
        status = version.etl_status
        try:
            if (await reconcile_version(sessions, client, version)).etl_status != status:
                repaired += 1
        except RPCError as error:
            log.warning(
                "could not reconcile %s v%d: %s", version.resource_id, version.version, error.status
            )
    return repaired
