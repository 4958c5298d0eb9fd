"""Local activity calls keep their declared policy on the real dev server.

Pipeline v2 runs `persist`, `claim_etl` and `record_outcome` as local activities
(`Call(local=True)`), v3 also the `load` step, v4 `normalize` too. A local activity's
timeouts (`start_to_close` per attempt, `schedule_to_close` overall) are enforced by the
worker, against its own clock, and its retries wait either in the worker's memory or on a
durable timer; with `LOCAL_RETRY_THRESHOLD` below every initial interval, each retry
waits on a timer (a worker crash loses no wait) and the deadline ends the retries.
The time-skipping server cannot show this (it moves its own clock, not the worker's), so
it is shown here, with a short policy, on the dev server; `test_workflow_policies` shows
the declared backoffs of the local steps there.
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


@activity.defn(name="hangs_once")
async def hangs_once(_: str) -> int:
    attempt = activity.info().attempt
    attempts.append(attempt)
    if attempt == 1:
        await asyncio.sleep(3600)  # until the worker cancels it at its start-to-close
    return attempt


@workflow.defn(sandboxed=False)
class HangingLocalCall:
    @workflow.run
    async def run(self, call: str) -> int:
        return await SHORT.execute(hangs_once, call, summary=f"{call}, hangs once")


async def test_a_hanging_local_call_is_cut_by_its_timeout_and_retried(client: Client) -> None:
    task_queue = f"local-{uuid.uuid4().hex}"
    attempts.clear()
    async with Worker(
        client, task_queue=task_queue, workflows=[HangingLocalCall], activities=[hangs_once]
    ):
        handle = await client.start_workflow(
            HangingLocalCall.run, "load", id=f"local-{uuid.uuid4().hex}", task_queue=task_queue
        )
        result = await asyncio.wait_for(handle.result(), timeout=60)
    history = await handle.fetch_history()

    # The first attempt was cut at its start-to-close (1 s), the second answered.
    assert result == 2 and attempts == [1, 2]
    types = [event.event_type for event in history.events]
    assert types.count(EventType.EVENT_TYPE_TIMER_STARTED) == 1  # the backoff between them
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED not in types  # all in the worker


def test_new_workflows_run_database_work_locally_and_enrich_remotely() -> None:
    newest = pipeline.PIPELINES[max(pipeline.PIPELINES)]
    steps = {step.name: step for step in newest.steps}
    # Short work runs in the workflow's worker: the calls around the steps, normalize, load.
    local = [
        newest.persist,
        newest.claim_etl,
        newest.record_outcome,
        steps["normalize"],
        steps["load"],
    ]
    assert all(call.local for call in local)
    # enrich is a regular activity: it calls another service, heartbeats, retries for hours.
    assert not steps["enrich"].local and steps["enrich"].heartbeat is not None
    for call in local:
        assert call.heartbeat is None  # a local activity cannot heartbeat
        # A deadline ends its retries, and each retry waits on a durable timer: every
        # initial interval is above the threshold under which a retry waits in memory.
        assert call.schedule_to_close is not None
        assert call.retry.initial_interval is not None
        assert call.retry.initial_interval > pipeline.LOCAL_RETRY_THRESHOLD
