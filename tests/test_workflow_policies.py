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
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from devstack import venv_binary
from upsertflow import temporal
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
from upsertflow.naming import SEARCH_ATTRIBUTES
from upsertflow.settings import Codec
from workflows.pipeline import PIPELINE, Step
from workflows.upsert import UpsertWorkflow


@pytest.fixture
async def env(codec: Codec) -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server per test (a shared one can silently stop skipping), with the
    data converter of the suite's workers: payloads encrypted."""
    async with await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=venv_binary("temporal-test-server"),
        data_converter=temporal.data_converter(codec),
    ) as environment:
        yield environment


@dataclass
class Fakes:
    """Stand-ins for the project's activities, recording what they were asked.

    `behaviour` says what a step's fake does: `ok`, `hang-first` (the first attempt
    never answers), `non-retryable`, `always-fail`, or a timedelta: fail until
    that much server time has passed since its first attempt.
    """

    behaviour: dict[str, str | timedelta] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    first_scheduled: dict[str, datetime] = field(default_factory=dict)
    last_scheduled: dict[str, datetime] = field(default_factory=dict)
    outcomes: list[OutcomeInput] = field(default_factory=list)
    env: WorkflowEnvironment | None = None
    #: How far a hanging attempt moves the clock: just past the timeout that should cut it.
    hang_for: timedelta = timedelta(minutes=3)

    async def _act(self, name: str) -> int:
        info = activity.info()
        self.attempts[name] = info.attempt
        # The server's clock (a local activity's scheduled time is the worker's clock).
        assert self.env is not None
        now = await self.env.get_current_time()
        self.first_scheduled.setdefault(name, now)
        self.last_scheduled[name] = now
        behaviour = self.behaviour.get(name, "ok")
        if isinstance(behaviour, timedelta):
            if now - self.first_scheduled[name] < behaviour:
                raise RuntimeError(f"{name}: dependency unavailable")
        elif behaviour == "hang-first" and info.attempt == 1:
            # Hang past every timeout: move the server's clock from inside the attempt,
            # then never answer (the worker cancels this at shutdown).
            assert self.env is not None
            await self.env.sleep(self.hang_for)
            await asyncio.Event().wait()
        elif behaviour == "non-retryable":
            raise ApplicationError(f"{name}: data not usable", type="Invalid", non_retryable=True)
        elif behaviour == "always-fail":
            raise RuntimeError(f"{name}: still failing")
        return info.attempt

    def activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name="persist")
        async def persist(request: PersistInput) -> Persisted:
            await self._act("persist")
            now = self.last_scheduled["persist"]
            return Persisted(
                resource_id=request.resource_id,
                version=1,
                created=True,
                created_at=now,
                updated_at=now,
            )

        def step_fake(name: str) -> Callable[..., Any]:
            @activity.defn(name=name)
            async def fake(step: StepInput) -> StepResult:
                attempt = await self._act(name)
                if step.steps is not None:  # the last step records the success (v5)
                    workflow_id = activity.info().workflow_id
                    assert workflow_id is not None
                    self.outcomes.append(
                        OutcomeInput(
                            resource_id=step.resource_id,
                            version=step.version,
                            workflow_id=workflow_id,
                            status=EtlStatus.SUCCEEDED,
                            steps=step.succeeded_steps(attempt, {}),
                        )
                    )
                return StepResult(attempt=attempt)

            return fake

        @activity.defn(name="record_outcome")
        async def record_outcome(outcome: OutcomeInput) -> None:
            self.outcomes.append(outcome)

        return [persist, *(step_fake(step.name) for step in PIPELINE), record_outcome]


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
    fakes.env = env
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
    fakes = Fakes(behaviour={"persist": timedelta(hours=2)})

    result = await _run(env, fakes)

    assert isinstance(result, EtlProgress), result
    assert result.status == EtlStatus.SUCCEEDED
    waited = fakes.last_scheduled["persist"] - fakes.first_scheduled["persist"]
    assert waited >= timedelta(hours=2)
    # Backoff 1 s doubling to a 1 min ceiling: 7 attempts in the first 63 s, then one a
    # minute; about 126 attempts in 2 h, not thousands.
    expected = 7 + math.ceil((7200 - 63) / 60)
    assert expected - 2 <= fakes.attempts["persist"] <= expected + 2
    assert fakes.outcomes[-1].status == EtlStatus.SUCCEEDED


STEPS = [pytest.param(step, id=step.name) for step in PIPELINE]
#: The steps whose timeouts the server enforces. A local step's (`load`) are
#: the worker's, against its own clock, which this server's time skipping does not move:
#: `test_local_calls` shows them in real time, with a short policy.
REGULAR_STEPS = [pytest.param(step, id=step.name) for step in PIPELINE if not step.local]


@pytest.mark.parametrize("step", STEPS)
async def test_step_failing_for_a_while_is_retried_then_succeeds(
    env: WorkflowEnvironment, step: Step
) -> None:
    assert step.schedule_to_close is not None, f"{step.name} must have a deadline"
    outage = step.schedule_to_close * 0.8
    fakes = Fakes(behaviour={step.name: outage})

    result = await _run(env, fakes)

    assert isinstance(result, EtlProgress), result
    assert result.status == EtlStatus.SUCCEEDED
    state = next(s for s in result.steps if s.name == step.name)
    assert state.attempts == fakes.attempts[step.name] > 1
    assert fakes.last_scheduled[step.name] - fakes.first_scheduled[step.name] >= outage
    # The backoff ceiling keeps attempts sparse: never more than one per maximum interval.
    ceiling = step.retry.maximum_interval
    assert ceiling is not None
    assert state.attempts <= outage / ceiling + 12


@pytest.mark.parametrize("step", REGULAR_STEPS)
async def test_hanging_step_is_cut_by_its_timeout_and_retried(
    env: WorkflowEnvironment, step: Step
) -> None:
    # Cut by the heartbeat timeout where the step heartbeats, else by start-to-close.
    cut_after = step.heartbeat or step.start_to_close
    fakes = Fakes(
        behaviour={step.name: "hang-first"}, env=env, hang_for=cut_after + timedelta(seconds=5)
    )

    result = await _run(env, fakes)

    assert isinstance(result, EtlProgress), result
    assert result.status == EtlStatus.SUCCEEDED
    assert fakes.attempts[step.name] == 2
    state = next(s for s in result.steps if s.name == step.name)
    assert state.attempts == 2
    assert state.started_at is not None and state.finished_at is not None
    assert state.finished_at - state.started_at >= cut_after


@pytest.mark.parametrize("step", STEPS)
async def test_non_retryable_error_fails_the_etl_at_once(
    env: WorkflowEnvironment, step: Step
) -> None:
    fakes = Fakes(behaviour={step.name: "non-retryable"})

    result = await _run(env, fakes)

    assert isinstance(result, WorkflowFailureError)
    assert isinstance(result.cause, ApplicationError)
    assert result.cause.type == "EtlFailed"
    assert f"step {step.name} failed" in str(result.cause)
    assert "data not usable" in str(result.cause)
    assert fakes.attempts[step.name] == 1
    outcome = fakes.outcomes[-1]
    assert outcome.status == EtlStatus.FAILED
    statuses = {state.name: state.status for state in outcome.steps}
    assert statuses[step.name] == StepStatus.FAILED
    later = [s.name for s in PIPELINE[[p.name for p in PIPELINE].index(step.name) + 1 :]]
    assert all(statuses[name] == StepStatus.PENDING for name in later)


@pytest.mark.parametrize("step", REGULAR_STEPS)
async def test_step_deadline_ends_retries_and_fails_the_etl(
    env: WorkflowEnvironment, step: Step
) -> None:
    fakes = Fakes(behaviour={step.name: "always-fail"})

    result = await _run(env, fakes)

    assert isinstance(result, WorkflowFailureError)
    assert f"step {step.name} failed" in str(result.cause)
    assert fakes.outcomes[-1].status == EtlStatus.FAILED
    assert step.schedule_to_close is not None
    elapsed = _step_duration(fakes.outcomes[-1], step.name)
    assert step.schedule_to_close - timedelta(minutes=1) <= elapsed
    assert elapsed <= step.schedule_to_close + timedelta(minutes=1)
