"""`UpsertWorkflow`: persist one upsert, then run the ETL pipeline over it."""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    FailureError,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from activities.interceptor import failed_attempt
    from activities.resources import ResourceActivities
    from upsertflow.contracts import (
        ClaimInput,
        EtlEnded,
        EtlProgress,
        EtlStatus,
        OutcomeInput,
        Persisted,
        PersistInput,
        StepInput,
        StepState,
        StepStatus,
        UpsertRequest,
    )
    from upsertflow.naming import ETL_STATUS, RESOURCE_ID, RESOURCE_VERSION, webhook_workflow_id
    from workflows.notify import NotifyWorkflow
    from workflows.pipeline import PIPELINES, Pipeline


@workflow.defn
class UpsertWorkflow:
    """Persist the upsert as a new version, answer the `persisted` update, then run the ETL."""

    @workflow.init
    def __init__(self, request: UpsertRequest) -> None:
        self._request = request
        self._persisted: Persisted | None = None
        self._persist_error: str | None = None
        self._pipeline: Pipeline = PIPELINES[max(PIPELINES)]
        self._progress = EtlProgress(
            resource_id=request.resource_id,
            steps=[StepState(name=step.name) for step in self._pipeline.steps],
        )

    @workflow.run
    async def run(self, request: UpsertRequest) -> EtlProgress:
        self._follow_pipeline(_pipeline_version(request))
        persisted = await self._persist(request)
        progress = self._progress
        progress.version = persisted.version
        if self._pipeline.announce_running:
            self._set_status(EtlStatus.RUNNING)
        else:
            progress.status = EtlStatus.RUNNING
        previous: str | None = None
        #: The outputs the records are in, merged in order (pipeline v6: `enrich` stores
        #: only its additions to `normalize`'s records).
        sources: list[str] = []
        steps = self._pipeline.steps
        last = len(steps) - 1
        for index, (step, state) in enumerate(zip(steps, progress.steps, strict=True)):
            workflow.set_current_details(
                f"Step **{step.name}** ({index + 1}/{len(steps)}) of resource "
                f"`{request.resource_id}` v{persisted.version}"
            )
            state.status = StepStatus.RUNNING
            state.started_at = workflow.now()
            try:
                result = await step.execute(
                    step.activity,
                    StepInput(
                        resource_id=request.resource_id,
                        version=persisted.version,
                        step=step.name,
                        previous_step=previous,
                        pipeline_version=self._pipeline.outputs,
                        steps=(
                            progress.steps
                            if index == last and self._pipeline.last_step_records_success
                            else None
                        ),
                        stores_additions=step.stores_additions,
                        records_from=list(sources) if len(sources) > 1 else None,
                    ),
                    summary=f"{step.name} {request.resource_id} v{persisted.version}",
                )
            except (FailureError, asyncio.CancelledError) as error:
                if _is_cancellation(error):
                    state.status = StepStatus.SKIPPED
                    progress.error = "cancelled"
                    await self._finish(EtlStatus.CANCELLED)
                    raise asyncio.CancelledError() from None
                state.status = StepStatus.FAILED
                state.finished_at = workflow.now()
                state.error = _describe(error)
                state.attempts = failed_attempt(error) or state.attempts
                self._record_step(state, "failed")
                if not step.required:
                    continue
                progress.error = f"step {step.name} failed: {state.error}"
                await self._finish(EtlStatus.FAILED)
                raise ApplicationError(
                    progress.error, type="EtlFailed", non_retryable=True
                ) from None
            state.finished_at = workflow.now()
            state.attempts = result.attempt
            self._record_step(state, "superseded" if result.superseded else "succeeded")
            state.stats = result.stats
            if result.superseded:
                state.status = StepStatus.SKIPPED
                for later in progress.steps[index + 1 :]:
                    later.status = StepStatus.SKIPPED
                progress.error = "a newer version was persisted before this one finished"
                await self._finish(EtlStatus.SUPERSEDED)
                return progress
            state.status = StepStatus.SUCCEEDED
            previous = step.name
            sources = [*sources, step.name] if step.stores_additions else [step.name]
        await self._finish(EtlStatus.SUCCEEDED, recorded=self._pipeline.last_step_records_success)
        return progress

    @workflow.update
    async def persisted(self) -> Persisted:
        """Wait until the upsert is persisted and return its version."""
        await workflow.wait_condition(
            lambda: self._persisted is not None or self._persist_error is not None
        )
        if self._persisted is None:
            raise ApplicationError(self._persist_error or "persist failed", type="PersistFailed")
        return self._persisted

    @workflow.query
    def progress(self) -> EtlProgress:
        """Return the step-by-step state of the ETL."""
        return self._progress

    async def _persist(self, request: UpsertRequest) -> Persisted:
        """Persist the upsert, or take over the ETL of an existing version (a retry)."""
        try:
            if request.retry_of_version is not None:
                workflow.set_current_details(
                    f"Retrying the ETL of resource `{request.resource_id}` "
                    f"v{request.retry_of_version}"
                )
                persisted = await self._pipeline.claim_etl.execute(
                    ResourceActivities.claim_etl,
                    ClaimInput(resource_id=request.resource_id, version=request.retry_of_version),
                    summary=f"claim ETL {request.resource_id} v{request.retry_of_version}",
                )
            else:
                workflow.set_current_details(f"Persisting resource `{request.resource_id}`")
                persisted = await self._pipeline.persist.execute(
                    ResourceActivities.persist,
                    PersistInput(
                        resource_id=request.resource_id,
                        request_id=request.request_id,
                        attributes_digest=request.attributes_digest,
                        info_digest=request.info_digest,
                    ),
                    summary=f"persist {request.resource_id}",
                )
        except (FailureError, asyncio.CancelledError) as error:
            cancelled = _is_cancellation(error)
            self._persist_error = "cancelled" if cancelled else _describe(error)
            self._progress.status = EtlStatus.CANCELLED if cancelled else EtlStatus.FAILED
            self._progress.error = f"persist failed: {self._persist_error}"
            # Let the waiting `persisted` update answer before the workflow closes.
            await workflow.wait_condition(workflow.all_handlers_finished)
            if cancelled:
                raise asyncio.CancelledError() from None
            raise ApplicationError(
                self._progress.error, type="PersistFailed", non_retryable=True
            ) from None
        self._persisted = persisted
        return persisted

    def _follow_pipeline(self, version: int) -> None:
        """Run pipeline `version` (the one this workflow started with)."""
        self._pipeline = PIPELINES[version]
        self._progress.pipeline_version = version
        self._progress.steps = [StepState(name=step.name) for step in self._pipeline.steps]

    def _record_step(self, state: StepState, outcome: str) -> None:
        """Step duration and outcome in the worker's metrics (not re-emitted on replay)."""
        assert state.started_at is not None and state.finished_at is not None
        workflow.metric_meter().create_histogram_timedelta(
            "upsertflow_etl_step_duration",
            "Time an ETL step took, all attempts included, by step and outcome.",
            unit="ms",
        ).record(state.finished_at - state.started_at, {"step": state.name, "outcome": outcome})
        workflow.logger.info(
            "step %s %s after %d attempt(s)",
            state.name,
            outcome,
            state.attempts,
            extra={"resource_id": self._request.resource_id, "step": state.name},
        )

    def _set_status(self, status: EtlStatus) -> None:
        self._progress.status = status
        assert self._progress.version is not None
        workflow.upsert_search_attributes(
            [
                RESOURCE_ID.value_set(self._request.resource_id),
                RESOURCE_VERSION.value_set(self._progress.version),
                ETL_STATUS.value_set(status.value),
            ]
        )

    async def _finish(self, status: EtlStatus, *, recorded: bool = False) -> None:
        """Record the outcome in PostgreSQL (unless the last step did: `recorded`), the
        search attributes and the metrics."""
        self._set_status(status)
        workflow.metric_meter().create_counter(
            "upsertflow_etl_runs", "ETL runs that ended, by outcome."
        ).add(1, {"outcome": status.value})
        assert self._progress.version is not None
        workflow.set_current_details(
            f"ETL of resource `{self._request.resource_id}` v{self._progress.version}: "
            f"**{status.value}**" + (f" — {self._progress.error}" if self._progress.error else "")
        )
        if not recorded:
            await self._record_outcome(status)
        if self._request.notify:
            await self._notify(status)

    async def _record_outcome(self, status: EtlStatus) -> None:
        """Record how the ETL ended in PostgreSQL (if this workflow still owns it)."""
        assert self._progress.version is not None
        await self._pipeline.record_outcome.execute(
            ResourceActivities.record_outcome,
            OutcomeInput(
                resource_id=self._request.resource_id,
                version=self._progress.version,
                workflow_id=workflow.info().workflow_id,
                status=status,
                steps=self._progress.steps,
                error=self._progress.error,
            ),
            summary=f"record {status.value} {self._request.resource_id} v{self._progress.version}",
        )

    async def _notify(self, status: EtlStatus) -> None:
        """Start the delivery of the completion webhook, and leave it to run on its own."""
        assert self._progress.version is not None
        upsert_id = workflow.info().workflow_id
        event = EtlEnded(
            id=webhook_workflow_id(upsert_id),
            resource_id=self._request.resource_id,
            version=self._progress.version,
            status=status,
            error=self._progress.error,
            workflow_id=upsert_id,
            ended_at=workflow.now(),
        )
        try:
            await workflow.start_child_workflow(
                NotifyWorkflow.run,
                event,
                id=event.id,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                static_summary=f"Webhook: {status.value} {self._request.resource_id}",
            )
        except WorkflowAlreadyStartedError:
            pass  # a reset run of this workflow: its event is on its way already


def _pipeline_version(request: UpsertRequest) -> int:
    """The pipeline version of this run: the one its starter asked for (from v3 on), or,
    for a workflow started without one, the one recorded with a patch marker.

    A version asked for is in the workflow's input, the same on every replay, and costs
    the server nothing (a patch marker also upserts the `TemporalChangeVersion` search
    attribute: a visibility write per workflow). A worker that does not know it fails the
    workflow task, which is retried until a worker that does picks it up: deploy workers
    before the API that asks for their new version (or use Worker Versioning).
    """
    if request.pipeline_version is not None:
        if request.pipeline_version not in PIPELINES:
            raise RuntimeError(
                f"pipeline version {request.pipeline_version} is unknown to this worker "
                f"(it knows {sorted(PIPELINES)}): deploy the workers that define it"
            )
        return request.pipeline_version
    # Started without one (by an API before v3, or a test): the newest for a new run; on
    # replay, the one it started with, each version after the first a patch marker.
    versions = sorted(PIPELINES, reverse=True)
    for version in versions[:-1]:
        if workflow.patched(f"pipeline-v{version}"):
            return version
    return versions[-1]


def _is_cancellation(error: BaseException) -> bool:
    """Whether the activity ended because the workflow was cancelled."""
    if isinstance(error, ActivityError):
        error = error.cause or error
    return isinstance(error, asyncio.CancelledError | CancelledError)


def _describe(error: BaseException) -> str:
    """Say why an activity failed, in one line a person can act on.

    A regular activity's failure is an `ActivityError` whose cause says why; a local
    activity's may be that cause itself.
    """
    cause = error.cause if isinstance(error, ActivityError) else error
    if cause is None:
        return str(error)
    message = getattr(cause, "message", "") or str(cause)
    return f"{type(cause).__name__}: {message}"
