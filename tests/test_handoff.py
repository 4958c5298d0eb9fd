"""A step's output passes to the next step in the same worker without being read back and
decoded (`upsertflow.store.steps.Handoff`), and only while PostgreSQL's row still holds
that write: what another worker stored since is what the next step gets."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.testing import ActivityEnvironment

from activities.resources import ResourceActivities
from tests.helpers import context_records, owned_version, step_inputs
from upsertflow.store.steps import Handoff, Held, StepStore


async def test_the_next_step_in_this_worker_takes_the_output_without_reading_it_once(
    sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    await owned_version(sessions, resource_id)
    normalize, enrich, _ = step_inputs(resource_id)
    store = StepStore(sessions)
    records = {"contact.country": "FR", "n": 1}
    env = ActivityEnvironment()

    assert await env.run(store.write, normalize, records)
    begun = await env.run(store.begin, enrich)
    again = await env.run(store.begin, enrich)  # a second attempt of the step, say

    assert begun is not None and again is not None
    assert begun.input is records  # handed over: the very value, not a decoded copy
    assert begun.input_bytes == len(b'{"contact.country":"FR","n":1}')
    # Taken once: the next attempt reads what is stored.
    assert again.input == records and again.input is not records


async def test_an_output_another_worker_stored_since_is_read_not_handed_over(
    sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    await owned_version(sessions, resource_id)
    normalize, enrich, load = step_inputs(resource_id)
    store, other_worker = StepStore(sessions), StepStore(sessions)
    env = ActivityEnvironment()

    # The same step written again elsewhere (a retried attempt on another worker), to a
    # body of the very same size: only the write that stored it tells them apart.
    assert await env.run(store.write, normalize, {"a": "first"})
    assert await env.run(other_worker.write, normalize, {"a": "again"})
    begun = await env.run(store.begin, enrich)
    assert begun is not None
    assert begun.input == {"a": "again"}

    # The load too: it loads what the row holds.
    assert await env.run(store.write, enrich, {"a": "first", "a.x": 1})
    assert await env.run(other_worker.write, enrich, {"a": "again", "a.x": 2})
    loaded = await env.run(ResourceActivities(sessions, store).load, load)
    assert loaded.stats == {"records": 2}
    async with sessions() as session:
        assert await context_records(session, resource_id) == {
            resource_id: {"a": "again", "a.x": 2}
        }


def _held(value: dict[str, Any], at: float | None = None) -> Held:
    return Held(stored_as="1:2", value=value, size=2, at=time.monotonic() if at is None else at)


def test_the_handoff_holds_a_bounded_number_of_records_for_a_bounded_time() -> None:
    handoff = Handoff(max_records=5)
    normalize = [step_inputs(f"r{n}")[0] for n in range(4)]
    handoff.keep(normalize[0], _held({"a": 1, "b": 2}))
    handoff.keep(normalize[1], _held({"a": 1, "b": 2}))
    handoff.keep(normalize[2], _held({"a": 1, "b": 2}))  # 6 records: the oldest goes
    handoff.keep(normalize[3], _held(dict.fromkeys("abcdef", 0)))  # larger than it all: never

    assert handoff.take("r0", 1, "normalize") is None
    assert handoff.take("r1", 1, "normalize") is not None
    assert handoff.take("r2", 1, "normalize") is not None
    assert handoff.take("r3", 1, "normalize") is None
    # Held too long: not handed over (the row's writer id could, in time, come round again).
    handoff.keep(normalize[0], _held({"a": 1}, at=time.monotonic() - Handoff.TTL_SECONDS - 1))
    assert handoff.take("r0", 1, "normalize") is None
