"""Retries and timeouts of `UpsertWorkflow`, in Temporal's time-skipping test server.

The activities are replaced by same-named fakes: these tests are about the
workflow's policies (how often, how long), not about the database.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from upsertflow.contracts import (
    EtlProgress,
    EtlStatus,
    OutcomeInput,
    Persisted,
    PersistInput,
    StepInput,
    StepResult,
    StepStatus,
    UpsertRequest,
)
from upsertflow.embedded import venv_binary
from workflows import SEARCH_ATTRIBUTES
from workflows.upsert import UpsertWorkflow


@pytest.fixture
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server per test: a shared one can silently stop skipping."""
    async with await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    ) as environment:
        yield environment


@dataclass
class Fakes:
    """Stand-ins for the project's activities, recording what they were asked."""

    persist_fails_for: timedelta = timedelta(0)
    normalize_behaviour: str = "ok"  # ok | hang-first | non-retryable | always-fail
    attempts: dict[str, int] = field(default_factory=dict)
    outcomes: list[OutcomeInput] = field(default_factory=list)
    first_scheduled: datetime | None = None
    last_scheduled: datetime | None = None
    env: WorkflowEnvironment | None = None

    def _count(self, name: str) -> int:
        self.attempts[name] = activity.info().attempt
        return activity.info().attempt

    def activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name="persist")
        async def persist(request: PersistInput) -> Persisted:
            self._count("persist")
            info = activity.info()
            now = info.current_attempt_scheduled_time
            if self.first_scheduled is None:
                self.first_scheduled = now
            self.last_scheduled = now
            if now - self.first_scheduled < self.persist_fails_for:
                raise RuntimeError("database unavailable")
            return Persisted(
                resource_id=request.resource_id,
                version=1,
                created=True,
                created_at=now,
                updated_at=now,
            )

        @activity.defn(name="normalize")
        async def normalize(step: StepInput) -> StepResult:
            attempt = self._count("normalize")
            if self.normalize_behaviour == "hang-first" and attempt == 1:
                # Hang past the timeout: move the server's clock from inside the attempt,
                # then never answer (the worker cancels this at shutdown).
                assert self.env is not None
                await self.env.sleep(timedelta(minutes=3))
                await asyncio.Event().wait()
            if self.normalize_behaviour == "non-retryable":
                raise ApplicationError("info is not usable", type="InvalidInfo", non_retryable=True)
            if self.normalize_behaviour == "always-fail":
                raise RuntimeError("still failing")
            return StepResult(attempt=attempt, stats={"records": 3})

        @activity.defn(name="enrich")
        async def enrich(step: StepInput) -> StepResult:
            return StepResult(attempt=self._count("enrich"))

        @activity.defn(name="load")
        async def load(step: StepInput) -> StepResult:
            return StepResult(attempt=self._count("load"), stats={"records": 3})

        @activity.defn(name="record_outcome")
        async def record_outcome(outcome: OutcomeInput) -> None:
            self.outcomes.append(outcome)

        return [persist, normalize, enrich, load, record_outcome]


def _request() -> UpsertRequest:
    return UpsertRequest(
        resource_id="r1",
        request_id=uuid.uuid4().hex,
        attributes_digest="a" * 64,
        info_digest="b" * 64,
    )


async def _register_search_attributes(env: WorkflowEnvironment) -> None:
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest

    kinds = {"Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD}
    kinds["Int"] = IndexedValueType.INDEXED_VALUE_TYPE_INT
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={name: kinds[kind] for name, kind in SEARCH_ATTRIBUTES.items()},
        )
    )


async def _run(env: WorkflowEnvironment, fakes: Fakes) -> EtlProgress | WorkflowFailureError:
    """Run one UpsertWorkflow with the fakes; return its result or its failure."""
    await _register_search_attributes(env)
    task_queue = f"tq-{uuid.uuid4().hex}"
    async with Worker(
        env.client, task_queue=task_queue, workflows=[UpsertWorkflow], activities=fakes.activities()
    ):
        handle = await env.client.start_workflow(
            UpsertWorkflow.run,
            _request(),
            id=f"upsert:r1:{uuid.uuid4().hex}",
            task_queue=task_queue,
        )
        try:
            return await handle.result()
        except WorkflowFailureError as error:
            return error


def _step_duration(outcome: OutcomeInput, name: str) -> timedelta:
    """How long a step took in workflow time, from its first start to its end."""
    step = next(step for step in outcome.steps if step.name == name)
    assert step.started_at is not None and step.finished_at is not None
    return step.finished_at - step.started_at


async def test_persist_retries_with_backoff_for_hours_then_succeeds(
    env: WorkflowEnvironment,
) -> None:
    fakes = Fakes(persist_fails_for=timedelta(hours=2))

    result = await _run(env, fakes)

    assert isinstance(result, EtlProgress), result
    assert result.status == EtlStatus.SUCCEEDED
    assert fakes.last_scheduled is not None and fakes.first_scheduled is not None
    assert fakes.last_scheduled - fakes.first_scheduled >= timedelta(hours=2)
    # Backoff 1 s doubling to a 1 min ceiling: 7 attempts in the first 63 s, then one a
    # minute; about 126 attempts in 2 h, not thousands.
    expected = 7 + math.ceil((7200 - 63) / 60)
    assert expected - 2 <= fakes.attempts["persist"] <= expected + 2
    assert fakes.outcomes[-1].status == EtlStatus.SUCCEEDED


async def test_start_to_close_timeout_cuts_a_hanging_step_and_retries_it(
    env: WorkflowEnvironment,
) -> None:
    fakes = Fakes(normalize_behaviour="hang-first")

    fakes.env = env

    result = await _run(env, fakes)

    assert isinstance(result, EtlProgress), result
    assert result.status == EtlStatus.SUCCEEDED
    assert fakes.attempts["normalize"] == 2
    normalize = result.steps[0]
    assert (normalize.name, normalize.attempts) == ("normalize", 2)
    # The first attempt was cut by normalize's 2-minute start-to-close timeout.
    assert _step_duration(fakes.outcomes[-1], "normalize") >= timedelta(minutes=2)


async def test_non_retryable_error_fails_the_etl_at_once(env: WorkflowEnvironment) -> None:
    fakes = Fakes(normalize_behaviour="non-retryable")

    result = await _run(env, fakes)

    assert isinstance(result, WorkflowFailureError)
    assert isinstance(result.cause, ApplicationError)
    assert result.cause.type == "EtlFailed"
    assert "info is not usable" in str(result.cause)
    assert fakes.attempts["normalize"] == 1
    assert "load" not in fakes.attempts
    outcome = fakes.outcomes[-1]
    assert outcome.status == EtlStatus.FAILED
    assert [step.status for step in outcome.steps] == [
        StepStatus.FAILED,
        StepStatus.PENDING,
        StepStatus.PENDING,
    ]
    assert outcome.error is not None and "info is not usable" in outcome.error


async def test_step_deadline_ends_retries_and_fails_the_etl(env: WorkflowEnvironment) -> None:
    fakes = Fakes(normalize_behaviour="always-fail")

    result = await _run(env, fakes)

    assert isinstance(result, WorkflowFailureError)
    assert "normalize" in str(result.cause)
    elapsed = _step_duration(fakes.outcomes[-1], "normalize")
    assert timedelta(minutes=59) <= elapsed <= timedelta(hours=1, minutes=1)
    assert fakes.attempts["normalize"] > 10
    assert fakes.outcomes[-1].status == EtlStatus.FAILED
