"""The ETL pipeline, declared in one place: ordered steps, each an activity with its policy.

Every step takes a `StepInput` and returns a `StepResult`; it reads the output of
the step before it (the first step reads the raw `info`) from PostgreSQL and
stores its own. The last step loads. To add a step, write the activity and add a
line here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.common import RetryPolicy

from activities.enrich import EnrichActivities
from activities.resources import ResourceActivities
from upsertflow.contracts import StepInput, StepResult


@dataclass(frozen=True)
class Step:
    """One ETL step: its activity and how long and how often it may try."""

    name: str
    activity: Callable[[Any, StepInput], Awaitable[StepResult]]
    start_to_close: timedelta
    retry: RetryPolicy
    schedule_to_close: timedelta | None = None
    heartbeat: timedelta | None = None
    #: A step that is not required may fail without failing the ETL.
    required: bool = True


#: Database work: retry transient failures (a restarting PostgreSQL) for up to an hour.
_DATABASE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)

PIPELINE: tuple[Step, ...] = (
    Step(
        "normalize",
        ResourceActivities.normalize,
        start_to_close=timedelta(minutes=2),
        schedule_to_close=timedelta(hours=1),
        retry=_DATABASE_RETRY,
    ),
    Step(
        "enrich",
        EnrichActivities.enrich,
        # Per attempt; each HTTP request has its own, shorter timeout.
        start_to_close=timedelta(minutes=2),
        # The overall deadline: an outage of the service of up to this long is ridden out;
        # past it the ETL fails, and can be retried through the API.
        schedule_to_close=timedelta(hours=4),
        # A dead worker is noticed within this, and another resumes from the last batch.
        heartbeat=timedelta(seconds=10),
        retry=RetryPolicy(
            initial_interval=timedelta(seconds=1),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=30),
            non_retryable_error_types=["EnrichmentRejected"],
        ),
    ),
    Step(
        "load",
        ResourceActivities.load,
        start_to_close=timedelta(minutes=1),
        schedule_to_close=timedelta(hours=1),
        retry=_DATABASE_RETRY,
    ),
)
