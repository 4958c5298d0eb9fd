"""Every activity call of the workflows, with its policy, declared in one place.

`PIPELINES` holds each version of the pipeline: the ETL steps in order — each an
activity with its own timeouts and retry policy — and the calls around them
(`persist`, `claim_etl`, `record_outcome`). A running workflow keeps the version
it started with (in its input from v3 on, `UpsertRequest.pipeline_version`; before,
recorded with `workflow.patched`), so a change here never breaks it; new workflows run
the newest (`newest()`, which the API asks for).

Every step takes a `StepInput` and returns a `StepResult`; it reads the output of
the step before it (the first step reads the raw `info`) from PostgreSQL and
stores its own: the whole map of records, or (`Step.stores_additions`, from v6)
only the records it adds or replaces. The last step loads, merging the outputs
back into one map (`StepInput.records_from`).

To change the pipeline — add, remove or reorder a step, change what a step
computes or how it runs — write the activity (a method of a class in
`activities/`), then add an entry `N+1` to `PIPELINES`, and keep the old entries
while workflows that started on them may still run. The worker registers every
activity the entries name (`ACTIVITIES`). Changing only a step's timeouts or
retry policy in place is safe for running workflows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy

from activities.enrich import EnrichActivities
from activities.resources import ResourceActivities
from activities.webhooks import WebhookActivities
from upsertflow.contracts import StepInput, StepResult

R = TypeVar("R")


#: A local activity whose next retry is further off than this waits on a durable timer
#: in the workflow rather than in the worker's memory. Below every initial interval
#: here: each retry of a local call is a timer, so its deadline (`schedule_to_close`,
#: which the worker checks between attempts) holds, and a crashed worker loses no wait.
LOCAL_RETRY_THRESHOLD = timedelta(milliseconds=500)


@dataclass(frozen=True, kw_only=True)
class Call:
    """One activity call: how long and how often it may try, and where it is scheduled.

    A regular call goes through the server's task queue to any worker. A `local` one runs
    in the worker that runs the workflow, its result recorded in the history as a marker:
    no task queue round trip, no extra workflow task — for short database work that needs
    no heartbeat. The Web UI shows it in the event history as a local activity.
    """

    start_to_close: timedelta
    retry: RetryPolicy
    schedule_to_close: timedelta | None = None
    heartbeat: timedelta | None = None
    local: bool = False

    async def execute(self, activity: Callable[..., Awaitable[R]], arg: Any, summary: str) -> R:
        """Run the activity method with this policy, from workflow code."""
        if self.local:
            assert self.heartbeat is None, "a local activity cannot heartbeat"
            return await workflow.execute_local_activity_method(
                activity,
                arg,
                start_to_close_timeout=self.start_to_close,
                schedule_to_close_timeout=self.schedule_to_close,
                retry_policy=self.retry,
                local_retry_threshold=LOCAL_RETRY_THRESHOLD,
                summary=summary,
            )
        return await workflow.execute_activity_method(
            activity,
            arg,
            start_to_close_timeout=self.start_to_close,
            schedule_to_close_timeout=self.schedule_to_close,
            heartbeat_timeout=self.heartbeat,
            retry_policy=self.retry,
            summary=summary,
        )


@dataclass(frozen=True, kw_only=True)
class Step(Call):
    """One ETL step: its name, its activity, and its policy."""

    name: str
    activity: Callable[[Any, StepInput], Awaitable[StepResult]]
    #: A step that is not required may fail without failing the ETL.
    required: bool = True
    #: The step stores only the records it adds or replaces (`StepInput.stores_additions`),
    #: and the load merges them into the records it read: only the load may follow it.
    stores_additions: bool = False


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    """Everything an `UpsertWorkflow` calls: the steps, and the calls around them."""

    persist: Call
    claim_etl: Call
    record_outcome: Call
    steps: tuple[Step, ...]
    #: The version of what the steps compute, recorded on every context they load: bump it
    #: (in a new entry) with any change that alters outputs — a new enrichment field, a
    #: fixed normalization rule, a new step — so `GET /resources?pipeline_version_lt=N`
    #: finds the contexts to reprocess. A change of how calls run (v2, v3) keeps it.
    outputs: int = 1
    #: Upsert the `ResourceVersion` and `EtlStatus` search attributes when the steps
    #: start (`running`), not only when the ETL ends. Each upsert is a visibility write
    #: on the server; v3 drops this one (a running workflow is listed as Running).
    announce_running: bool = True
    #: The last step records the ETL's success itself, in its own transaction (it gets the
    #: run's steps, `StepInput.steps`): no `record_outcome` after a load that succeeded.
    last_step_records_success: bool = False

    def __post_init__(self) -> None:
        for step, after in zip(self.steps, self.steps[1:], strict=False):
            # A step after it would read its additions as if they were all the records.
            assert not step.stores_additions or after.activity is ResourceActivities.load, step
        if self.last_step_records_success:
            # Only `load` records the outcome with its work: any other last step would
            # leave the ETL running in PostgreSQL until the reconciler looked.
            assert self.steps[-1].activity is ResourceActivities.load, self.steps[-1].name

    def activities(self) -> list[Callable[..., Any]]:
        """The activity methods this pipeline calls."""
        return [
            ResourceActivities.persist,
            ResourceActivities.claim_etl,
            ResourceActivities.record_outcome,
            *(step.activity for step in self.steps),
        ]


#: Database work: retry transient failures (a restarting PostgreSQL) for up to an hour.
_DATABASE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)

#: The client was already told "accepted": persisting must outlive a PostgreSQL outage.
_PERSIST_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)

#: The calls around the pipeline: short database work.
_AROUND = Call(
    start_to_close=timedelta(seconds=30),
    schedule_to_close=timedelta(hours=24),
    retry=_PERSIST_RETRY,
)
#: The same, run as local activities.
_AROUND_LOCAL = replace(_AROUND, local=True)

_NORMALIZE = Step(
    name="normalize",
    activity=ResourceActivities.normalize,
    # A worker that died mid-attempt is noticed after this (no heartbeat): short, yet far
    # above the largest accepted input's ~2 s (`make bench`).
    start_to_close=timedelta(seconds=30),
    schedule_to_close=timedelta(hours=1),
    retry=_DATABASE_RETRY,
)
_ENRICH = Step(
    name="enrich",
    activity=EnrichActivities.enrich,
    # Per attempt; each HTTP request has its own, shorter timeout.
    start_to_close=timedelta(minutes=2),
    # The overall deadline: an outage of the service of up to this long is ridden out;
    # past it the ETL fails, and can be retried through the API.
    schedule_to_close=timedelta(hours=4),
    # A dead worker is noticed within this; another resumes from its checkpoint.
    heartbeat=timedelta(seconds=10),
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        non_retryable_error_types=["EnrichmentRejected"],
    ),
)
_LOAD = Step(
    name="load",
    activity=ResourceActivities.load,
    start_to_close=timedelta(seconds=30),
    schedule_to_close=timedelta(hours=1),
    retry=_DATABASE_RETRY,
)

PIPELINES: dict[int, Pipeline] = {
    # Every call a regular activity.
    1: Pipeline(
        persist=_AROUND,
        claim_etl=_AROUND,
        record_outcome=_AROUND,
        steps=(_NORMALIZE, _ENRICH, _LOAD),
    ),
    # The calls around the steps are local activities: a PUT is answered without a task
    # queue round trip, and an upsert costs the server two activity tasks fewer. The
    # steps stay regular activities: they heartbeat (enrich), may run for minutes, and
    # each is its own activity in the Web UI.
    2: Pipeline(
        persist=_AROUND_LOCAL,
        claim_etl=_AROUND_LOCAL,
        record_outcome=_AROUND_LOCAL,
        steps=(_NORMALIZE, _ENRICH, _LOAD),
    ),
    # `load` runs locally too: short database work, no heartbeat, its retries on durable
    # timers (backoff above `LOCAL_RETRY_THRESHOLD`) within its deadline. `normalize`
    # stays a regular activity: the update's answer leaves with the workflow task that
    # schedules it, where a local call would hold that task (and the client) until it
    # ended. `enrich` stays one: it calls an external service, heartbeats, may retry for
    # hours, and an operator sees it pending in the Web UI with its last failure. An
    # upsert costs the server 2 activity tasks, and one search attribute upsert, when the
    # ETL ends.
    3: Pipeline(
        persist=_AROUND_LOCAL,
        claim_etl=_AROUND_LOCAL,
        record_outcome=_AROUND_LOCAL,
        steps=(_NORMALIZE, _ENRICH, replace(_LOAD, local=True)),
        announce_running=False,
    ),
    # `normalize` runs locally too: CPU work over the stored `info` and two statements,
    # no heartbeat, bounded by the input limits (~2 s for the largest accepted input).
    # It runs in the workflow task that persists, so the update's answer leaves when
    # normalize ends: a few milliseconds more for a small `info` (a large one is answered
    # 202 past the sync timeout, as before). In exchange an upsert costs the server one
    # activity task and one workflow task fewer: `enrich` is its only regular activity.
    4: Pipeline(
        persist=_AROUND_LOCAL,
        claim_etl=_AROUND_LOCAL,
        record_outcome=_AROUND_LOCAL,
        steps=(replace(_NORMALIZE, local=True), _ENRICH, replace(_LOAD, local=True)),
        announce_running=False,
    ),
    # `load` records the ETL's success in its own transaction: the run's context and its
    # `succeeded` are committed together (no window between them for a crash or a
    # terminate), and a succeeded upsert costs one local activity, one PostgreSQL
    # transaction and one worker activation fewer. `record_outcome` records every other
    # ending.
    5: Pipeline(
        persist=_AROUND_LOCAL,
        claim_etl=_AROUND_LOCAL,
        record_outcome=_AROUND_LOCAL,
        steps=(replace(_NORMALIZE, local=True), _ENRICH, replace(_LOAD, local=True)),
        announce_running=False,
        last_step_records_success=True,
    ),
    # `enrich` stores only the fields it adds, not the records it read with them: the load
    # merges them into `normalize`'s records. For the bench's 5 MiB `info` its output is
    # 1.8 MB instead of 7.7 MB: ~6 MB fewer encoded, written and deleted per upsert (and
    # read, when `enrich` ran on another worker than the load).
    6: Pipeline(
        persist=_AROUND_LOCAL,
        claim_etl=_AROUND_LOCAL,
        record_outcome=_AROUND_LOCAL,
        steps=(
            replace(_NORMALIZE, local=True),
            replace(_ENRICH, stores_additions=True),
            replace(_LOAD, local=True),
        ),
        announce_running=False,
        last_step_records_success=True,
    ),
}


def newest() -> int:
    """The newest pipeline version: what a new workflow asks for (`UpsertRequest`)."""
    return max(PIPELINES)


#: The newest pipeline version: what new workflows run.
PIPELINE_VERSION = newest()
PIPELINE = PIPELINES[PIPELINE_VERSION].steps
#: The version of what new workflows compute: what a context loaded today records.
OUTPUT_VERSION = PIPELINES[PIPELINE_VERSION].outputs

#: A completion notification (`NotifyWorkflow`): a receiver down for a day is ridden out.
WEBHOOK = Call(
    start_to_close=timedelta(seconds=30),
    schedule_to_close=timedelta(hours=24),
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(minutes=5),
        non_retryable_error_types=["WebhookRejected"],
    ),
)

#: Every activity the workflows call: what a worker must register.
ACTIVITIES: tuple[Callable[..., Any], ...] = tuple(
    {a: None for p in PIPELINES.values() for a in (*p.activities(), WebhookActivities.deliver)}
)
