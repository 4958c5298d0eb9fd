"""What the API asks of Temporal about reprocessing jobs: start, read, pause, resume, cancel.

A job is one `ReprocessWorkflow` whose id comes from its filter (`reprocess:{digest}`):
a start while it runs joins it, a start after it ended begins a new job under that id.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode
from temporalio.workflow import UpdateMethodMultiParam

from api.problems import Problem
from api.workflows import temporal_unavailable
from upsertflow.jobs import ReprocessFilter, ReprocessInput, ReprocessProgress
from upsertflow.naming import reprocess_job_id, reprocess_task_queue
from upsertflow.settings import Settings
from upsertflow.temporal import UNREACHABLE
from workflows.reprocess import ReprocessWorkflow

_JOB_ID = re.compile(r"^reprocess:[0-9a-f]{16}$")
_ASK_TIMEOUT_SECONDS = 5.0


async def start_job(
    client: Client, settings: Settings, where: ReprocessFilter, concurrency: int | None
) -> WorkflowHandle[ReprocessWorkflow, ReprocessProgress]:
    """Start the job of `where`, or join the one that runs."""
    job = ReprocessInput(filter=where)
    if concurrency is not None:
        job.concurrency = concurrency
    try:
        return await client.start_workflow(
            ReprocessWorkflow.run,
            job,
            id=reprocess_job_id(where.digest()),
            task_queue=reprocess_task_queue(settings.task_queue),
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            static_summary=f"Reprocess ETL: {where.describe()}"[:400],
            static_details=f"Filter `{where.model_dump_json(exclude_none=True)}`",
        )
    except UNREACHABLE:
        raise temporal_unavailable() from None


async def read_job(
    client: Client, job_id: str
) -> tuple[WorkflowExecutionStatus, ReprocessProgress | None, bool]:
    """The job's status, its progress (None if no worker answered), and whether it runs."""
    handle = _handle(client, job_id)
    status = await _status(handle)
    progress: ReprocessProgress | None = None
    try:
        async with asyncio.timeout(_ASK_TIMEOUT_SECONDS):
            if status == WorkflowExecutionStatus.COMPLETED:
                progress = await handle.result()
            else:  # running, or ended otherwise: its query answers from its history
                progress = await handle.query(ReprocessWorkflow.progress)
    except (TimeoutError, RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
        pass
    return status, progress, status == WorkflowExecutionStatus.RUNNING


async def update_job(
    client: Client,
    job_id: str,
    update: UpdateMethodMultiParam[[ReprocessWorkflow], ReprocessProgress],
) -> ReprocessProgress:
    """Pause or resume the running job; its progress after."""
    handle = _handle(client, job_id)
    if await _status(handle) != WorkflowExecutionStatus.RUNNING:
        raise _ended(job_id)
    try:
        async with asyncio.timeout(_ASK_TIMEOUT_SECONDS):
            progress: ReprocessProgress = await handle.execute_update(update)
    except TimeoutError:
        raise _no_worker() from None
    except WorkflowUpdateFailedError:
        raise _ended(job_id) from None
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise _ended(job_id) from None
        raise temporal_unavailable() from None
    return progress


async def cancel_job(client: Client, job_id: str) -> None:
    """Ask the running job to cancel: it starts nothing more, lets its re-runs end, stops."""
    handle = _handle(client, job_id)
    if await _status(handle) != WorkflowExecutionStatus.RUNNING:
        raise _ended(job_id)
    try:
        await handle.cancel()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise _ended(job_id) from None
        raise temporal_unavailable() from None


def _handle(client: Client, job_id: str) -> WorkflowHandle[ReprocessWorkflow, ReprocessProgress]:
    if not _JOB_ID.match(job_id):
        raise _unknown(job_id)
    return client.get_workflow_handle_for(ReprocessWorkflow.run, job_id)


async def _status(handle: WorkflowHandle[Any, Any]) -> WorkflowExecutionStatus:
    try:
        description = await handle.describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise _unknown(handle.id) from None
        raise temporal_unavailable() from None
    except UNREACHABLE:
        raise temporal_unavailable() from None
    assert description.status is not None
    return description.status


def _unknown(job_id: str) -> Problem:
    return Problem(
        404, "job-not-found", "No such job", f"there is no reprocessing job {job_id[:80]}"
    )


def _ended(job_id: str) -> Problem:
    return Problem(
        409, "job-ended", "The job has ended", f"the reprocessing job {job_id} is not running"
    )


def _no_worker() -> Problem:
    return Problem(
        503,
        "job-unanswered",
        "The job did not answer",
        "no reprocessing worker answered in time; try again",
        headers={"Retry-After": "5"},
    )
