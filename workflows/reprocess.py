"""`ReprocessWorkflow`: re-run the ETL of every matching resource, a sliding window at a time.

The job pages through the matching resources in id order (`reprocess_page`, a cursor
on the id) and re-runs each one's current version as a child `UpsertWorkflow` with
`retry_of_version` — exactly what `POST /resources/{id}/etl/retry` starts, under the
same id (`etl-retry:…`, one per ended run). Child workflows rather than an activity that
starts workflows: the job's history records each start and each outcome (so a job that
resumes on another worker never starts a re-run twice, and counts every outcome), the
Web UI shows the job with its re-runs as a tree, and nothing polls. The re-run's own
fences keep it from ever loading a stale context: its claim fails (`NotCurrent`) if a
newer version was persisted, and every step after that ends superseded if one is.

- **Window**: at most `concurrency` re-runs in flight; as one ends, the next starts.
- **Continue-as-new** after `items_per_run` re-runs (or when the server suggests it):
  the window drains, then the cursor, the counters and the pause carry over to a new run,
  so the history stays small whatever the number of resources.
- **Pause/resume** (updates): no new re-run starts while paused; those in flight finish.
- **Cancel**: no new re-run starts, those in flight finish and are counted (a re-run cut
  off halfway would end its resource `cancelled`), then the job ends cancelled. The
  children are `ABANDON`ed: not even a terminated job cuts one off.
- **Live traffic first**: the job, its re-runs and their activities run on the reprocess
  task queue (`upsertflow.naming.reprocess_task_queue`), served by workers with their own
  small slots; live upserts never queue behind them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import (
    RetryPolicy,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    FailureError,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from activities.reprocess import ReprocessActivities
    from upsertflow.contracts import EtlProgress, EtlStatus, UpsertRequest
    from upsertflow.jobs import (
        ItemFailure,
        JobState,
        PageInput,
        ReprocessInput,
        ReprocessItem,
        ReprocessProgress,
    )
    from upsertflow.naming import RESOURCE_ID, etl_retry_workflow_id
    from workflows import pipeline
    from workflows.upsert import UpsertWorkflow

A = TypeVar("A")
R = TypeVar("R")
#: How many failures the progress lists (the latest).
_RECENT_FAILURES = 20
#: ETL statuses of a version whose ETL is running: a live upsert's ETL, left alone.
_IN_FLIGHT = (EtlStatus.PENDING, EtlStatus.RUNNING)


@workflow.defn
class ReprocessWorkflow:
    """Re-run the ETL of every resource that matches a filter, with bounded concurrency."""

    @workflow.init
    def __init__(self, job: ReprocessInput) -> None:
        self._job = job
        self._progress = (job.progress or ReprocessProgress()).model_copy(deep=True)
        self._progress.concurrency = job.concurrency
        self._paused = job.paused
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = 0
        self._cancelling = False

    @workflow.run
    async def run(self, job: ReprocessInput) -> ReprocessProgress:
        progress = self._progress
        try:
            if progress.matched is None:
                progress.started_at = workflow.now()
                progress.matched = await _read(
                    ReprocessActivities.count, job.filter, "count matching resources"
                )
            self._set_state()
            more = await self._run_pages(job)
            await self._drain()
        except (asyncio.CancelledError, ActivityError):
            if workflow.cancellation_reason() is None:
                raise
            # Cancelled: start nothing more, let the re-runs in flight end, count them.
            self._cancelling = True
            self._set_state()
            await self._drain()
            progress.finished_at = workflow.now()
            self._set_state()
            raise asyncio.CancelledError() from None
        if more:
            await workflow.wait_condition(workflow.all_handlers_finished)
            workflow.continue_as_new(
                job.model_copy(
                    update={
                        "progress": progress.model_copy(
                            update={"continued": progress.continued + 1}
                        ),
                        "paused": self._paused,
                    }
                )
            )
        progress.finished_at = workflow.now()
        progress.state = JobState.COMPLETED
        self._set_state()
        return progress

    @workflow.query
    def progress(self) -> ReprocessProgress:
        """Return the job's counters, its cursor and its state."""
        return self._progress

    @workflow.update
    def pause(self) -> ReprocessProgress:
        """Start no new re-run until resumed (those in flight finish)."""
        self._paused = True
        self._set_state()
        return self._progress

    @workflow.update
    def resume(self) -> ReprocessProgress:
        """Start re-runs again."""
        self._paused = False
        self._set_state()
        return self._progress

    async def _run_pages(self, job: ReprocessInput) -> bool:
        """Feed the window page by page; True when this run should continue as new."""
        progress = self._progress
        while True:
            page = await _read(
                ReprocessActivities.page,
                PageInput(filter=job.filter, after=progress.cursor, limit=job.page_size),
                f"page after {progress.cursor or 'the start'}",
            )
            for item in page.items:
                await workflow.wait_condition(
                    lambda: not self._paused and len(self._in_flight) < job.concurrency,
                )
                self._start(item)
                progress.cursor = item.resource_id
            if not page.more:
                return False
            if self._started >= job.items_per_run or workflow.info().is_continue_as_new_suggested():
                return True

    def _start(self, item: ReprocessItem) -> None:
        """Start the re-run of one resource in the window (or skip it)."""
        if item.etl_status in _IN_FLIGHT:
            # A live upsert's ETL is running: it produces a current context itself.
            self._progress.skipped += 1
            return
        self._in_flight.add(item.resource_id)
        self._started += 1
        self._set_state()
        task = asyncio.create_task(self._rerun(item))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rerun(self, item: ReprocessItem) -> None:
        progress = self._progress
        try:
            result: EtlProgress = await workflow.execute_child_workflow(
                UpsertWorkflow.run,
                UpsertRequest(
                    resource_id=item.resource_id,
                    request_id=workflow.uuid4().hex,
                    attributes_digest="",
                    info_digest=item.info_digest,
                    retry_of_version=item.version,
                    correlation_id=workflow.info().workflow_id,
                    pipeline_version=pipeline.newest(),
                ),
                id=etl_retry_workflow_id(item.resource_id, item.version, item.etl_run_id),
                task_queue=workflow.info().task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                search_attributes=TypedSearchAttributes(
                    [SearchAttributePair(RESOURCE_ID, item.resource_id)]
                ),
                static_summary=f"Reprocess ETL {item.resource_id} v{item.version}",
                static_details=f"Re-run by job `{workflow.info().workflow_id}`",
            )
        except WorkflowAlreadyStartedError:
            progress.skipped += 1  # this run was retried already, by someone else
        except ChildWorkflowError as error:
            cause = error.cause
            if isinstance(cause, ApplicationError) and cause.type == "PersistFailed":
                progress.skipped += 1  # the claim found a newer version: nothing to re-run
            else:
                progress.failed += 1
                self._remember(item, cause or error)
        else:
            if result.status == EtlStatus.SUCCEEDED:
                progress.done += 1
            elif result.status == EtlStatus.SUPERSEDED:
                progress.skipped += 1
            else:
                progress.failed += 1
                self._remember(item, ApplicationError(result.error or result.status.value))
        # Not in a `finally`: a workflow evicted from the worker's cache closes this
        # coroutine, and must then touch nothing.
        self._in_flight.discard(item.resource_id)
        self._set_state()

    def _remember(self, item: ReprocessItem, error: BaseException) -> None:
        message = error.message if isinstance(error, FailureError) else str(error)
        failures = self._progress.recent_failures
        failures.append(
            ItemFailure(resource_id=item.resource_id, version=item.version, error=message)
        )
        del failures[:-_RECENT_FAILURES]

    async def _drain(self) -> None:
        """Wait until every re-run in flight has ended."""
        await workflow.wait_condition(lambda: not self._in_flight)

    def _set_state(self) -> None:
        """The state, and the same in words in the Web UI (the workflow's current details)."""
        progress = self._progress
        progress.in_flight = len(self._in_flight)
        if progress.state not in (JobState.COMPLETED, JobState.CANCELLED):
            if self._cancelling:
                progress.state = JobState.CANCELLED if not self._in_flight else JobState.CANCELLING
            else:
                progress.state = JobState.PAUSED if self._paused else JobState.RUNNING
        remaining = progress.remaining
        workflow.set_current_details(
            f"Reprocessing ({self._job.filter.describe()}): **{progress.state.value}** — "
            f"{progress.done} done, {progress.failed} failed, {progress.skipped} skipped, "
            f"{progress.in_flight} in flight"
            + (
                f", about {remaining} remaining of {progress.matched}"
                if remaining is not None
                else ""
            )
            + (f"; after `{progress.cursor}`" if progress.cursor else "")
        )


async def _read(activity: Callable[[Any, A], Awaitable[R]], arg: A, summary: str) -> R:
    """Read from PostgreSQL: short work, retried for an hour (a PostgreSQL restart)."""
    return await workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=timedelta(seconds=30),
        schedule_to_close_timeout=timedelta(hours=1),
        retry_policy=RetryPolicy(
            initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
        ),
        summary=summary,
    )
