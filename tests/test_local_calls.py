"""Local activity calls keep their declared policy on the real dev server.

Pipeline v2 runs `persist`, `claim_etl` and `record_outcome` as local activities
(`Call(local=True)`). A local activity's deadline (`schedule_to_close`) is checked by
the worker between attempts and its retries wait either in the worker's memory or on a
durable timer; with `LOCAL_RETRY_THRESHOLD` below every initial interval, each retry
waits on a timer (a worker crash loses no wait) and the deadline ends the retries.
The time-skipping server cannot show this (the worker checks the deadline against its
own clock), so it is shown here, with a short policy, on the dev server.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.worker import Worker

from workflows import pipeline

#: A deadline a few attempts long: one each second and more.
SHORT = pipeline.Call(
    local=True,
    start_to_close=timedelta(seconds=1),
    schedule_to_close=timedelta(seconds=4),
    retry=RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=1.0),
)
attempts: list[int] = []


@activity.defn(name="always_down")
async def always_down(_: str) -> None:
    attempts.append(activity.info().attempt)
    raise RuntimeError("the database is down")


@workflow.defn(sandboxed=False)
class LocalCall:
    @workflow.run
    async def run(self, call: str) -> None:
        await SHORT.execute(always_down, call, summary=f"{call}, always down")


async def test_a_local_call_retries_on_timers_until_its_deadline(client: Client) -> None:
    task_queue = f"local-{uuid.uuid4().hex}"
    attempts.clear()
    async with Worker(
        client, task_queue=task_queue, workflows=[LocalCall], activities=[always_down]
    ):
        handle = await client.start_workflow(
            LocalCall.run, "persist", id=f"local-{uuid.uuid4().hex}", task_queue=task_queue
        )
        with pytest.raises(WorkflowFailureError) as failed:
            # Far beyond the deadline: retrying past it would be the bug.
            await asyncio.wait_for(handle.result(), timeout=60)
    history = await handle.fetch_history()

    # The deadline ended it: a handful of attempts, not retries forever.
    assert "timed out" in str(failed.value.cause).lower(), failed.value.cause
    assert 2 <= len(attempts) <= 6, attempts
    # Each retry waited on a durable timer, and the call is one marker in the history.
    types = [event.event_type for event in history.events]
    assert types.count(EventType.EVENT_TYPE_TIMER_STARTED) >= len(attempts) - 1
    assert EventType.EVENT_TYPE_MARKER_RECORDED in types
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED not in types


def test_new_workflows_call_around_the_steps_locally_and_steps_remotely() -> None:
    newest = pipeline.PIPELINES[max(pipeline.PIPELINES)]
    assert newest.persist.local and newest.claim_etl.local and newest.record_outcome.local
    # Steps stay regular activities: enrich heartbeats, and each is its own in the UI.
    assert not any(step.local for step in newest.steps)
    # What every around-call may retry before its deadline is above the local threshold.
    for call in (newest.persist, newest.claim_etl, newest.record_outcome):
        assert call.retry.initial_interval is not None
        assert call.retry.initial_interval > timedelta(milliseconds=500)
