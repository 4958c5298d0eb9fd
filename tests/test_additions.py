"""Pipeline v6: `enrich` stores only the records it adds, and the load merges them into the
records of `normalize` — from this worker's handoff, or from PostgreSQL when another
worker stored them (`StepInput.stores_additions`, `StepInput.records_from`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.resources import ResourceActivities
from tests.helpers import context_records, owned_version, step_inputs
from upsertflow.models import StepOutput
from upsertflow.store.steps import StepStore
from workflows import pipeline

RECORDS = {"contact.country": "FR", "contact.country.country_name": "stale", "n": 1}
ADDITIONS = {"contact.country.country_name": "France", "contact.country.region": "Europe"}
#: What the load makes of them: the additions replace what the records held.
CONTEXT = {**RECORDS, **ADDITIONS}


async def test_the_load_merges_the_additions_into_the_records_the_step_before_read(
    sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    await owned_version(sessions, resource_id)
    normalize, enrich, load = step_inputs(resource_id, additions=True)
    store = StepStore(sessions)
    env = ActivityEnvironment()

    assert await env.run(store.write, normalize, RECORDS)
    begun = await env.run(store.begin, enrich)
    assert begun is not None and begun.input is RECORDS  # handed over, and left for the load
    assert await env.run(store.write, enrich, ADDITIONS)
    loaded = await env.run(ResourceActivities(sessions, store).load, load)

    assert loaded.stats == {"records": len(CONTEXT)}
    async with sessions() as session:
        assert await context_records(session, resource_id) == {resource_id: CONTEXT}
    # The load took both: nothing of this version is held any longer.
    assert store.handoff.take(resource_id, 1, "normalize") is None
    assert store.handoff.take(resource_id, 1, "enrich") is None


async def test_a_load_merges_what_it_holds_with_what_another_worker_stored(
    sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    """`enrich`, a regular activity, may run on another worker than the workflow's: the load
    reads its additions from PostgreSQL, and takes `normalize`'s records from its handoff."""
    await owned_version(sessions, resource_id)
    normalize, enrich, load = step_inputs(resource_id, additions=True)
    store, other_worker = StepStore(sessions), StepStore(sessions)
    env = ActivityEnvironment()

    assert await env.run(store.write, normalize, RECORDS)
    begun = await env.run(other_worker.begin, enrich)
    assert begun is not None and begun.input == RECORDS and begun.input is not RECORDS
    assert await env.run(other_worker.write, enrich, ADDITIONS)
    loaded = await env.run(ResourceActivities(sessions, store).load, load)

    assert loaded.stats == {"records": len(CONTEXT)}
    async with sessions() as session:
        assert await context_records(session, resource_id) == {resource_id: CONTEXT}


@pytest.mark.parametrize("gone", ["normalize", "enrich"])
async def test_a_load_missing_either_output_fails_for_good_saying_which(
    sessions: async_sessionmaker[AsyncSession], resource_id: str, gone: str
) -> None:
    await owned_version(sessions, resource_id)
    normalize, enrich, load = step_inputs(resource_id, additions=True)
    env = ActivityEnvironment()
    store = StepStore(sessions)
    assert await env.run(store.write, normalize, RECORDS)
    assert await env.run(store.write, enrich, ADDITIONS)
    async with sessions.begin() as session:  # deleted by an operator, say
        await session.execute(
            delete(StepOutput).where(StepOutput.resource_id == resource_id, StepOutput.step == gone)
        )

    with pytest.raises(ApplicationError) as failed:
        await env.run(ResourceActivities(sessions, StepStore(sessions)).load, load)

    assert failed.value.type == "StepOutputMissing" and failed.value.non_retryable
    assert failed.value.message == f"the output of step {gone!r} for {resource_id} v1 is missing"
    async with sessions() as session:
        assert await context_records(session, resource_id) == {}


def test_only_the_load_may_follow_a_step_that_stores_its_additions() -> None:
    """Any other step would read the additions as if they were all the records."""
    newest = pipeline.PIPELINES[pipeline.newest()]
    normalize, enrich, load = newest.steps
    assert enrich.stores_additions and load.activity is ResourceActivities.load

    with pytest.raises(AssertionError):
        replace(newest, steps=(normalize, enrich, replace(load, activity=normalize.activity)))
