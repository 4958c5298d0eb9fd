"""Every context says which pipeline computed it, and stale ones can be found.

`workflows.pipeline` declares the output version of each pipeline (`Pipeline.outputs`,
bumped with any change that alters outputs); each ETL run records it with the context
it loads; `GET /resources/{id}` shows it and `GET /resources?pipeline_version_lt=N`
lists the resources whose context is older (or of an unknown version).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.worker import Worker

from tests.helpers import wait_for_etl
from upsertflow.contracts import StepInput, StepState, StepStatus
from upsertflow.models import ResourceContext
from workflows import pipeline


async def _processed(api: httpx.AsyncClient, resource_id: str) -> dict[str, Any]:
    created = await api.put(f"/resources/{resource_id}", json={"info": {"Country": "FR"}})
    assert created.status_code == 201, created.text
    return await wait_for_etl(api, resource_id, created.json()["version"])


async def _listed(api: httpx.AsyncClient, prefix: str, below: int) -> set[str]:
    found: set[str] = set()
    cursor = None
    while True:
        params: dict[str, str | int] = {"pipeline_version_lt": below, "limit": 100}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/resources", params=params)).json()
        found |= {item["id"] for item in page["items"] if item["id"].startswith(prefix)}
        cursor = page["next_cursor"]
        if cursor is None:
            return found


async def test_a_context_records_its_pipeline_version_and_stale_ones_are_listed(
    api: httpx.AsyncClient,
    worker: Worker,
    sessions: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = f"pv-{uuid.uuid4().hex[:8]}-"
    old, current = f"{prefix}old", f"{prefix}current"
    for resource_id in (old, current):
        done = await _processed(api, resource_id)
        assert done["context_pipeline_version"] == pipeline.OUTPUT_VERSION
    # `old` as loaded before versions were recorded.
    async with sessions.begin() as session:
        await session.execute(
            update(ResourceContext)
            .where(ResourceContext.resource_id == old)
            .values(pipeline_version=None)
        )

    assert await _listed(api, prefix, pipeline.OUTPUT_VERSION) == {old}
    assert await _listed(api, prefix, pipeline.OUTPUT_VERSION + 1) == {old, current}

    # A change that alters outputs: a new pipeline entry with its output version bumped.
    newest = pipeline.PIPELINES[max(pipeline.PIPELINES)]
    bumped = dataclasses.replace(newest, outputs=newest.outputs + 1)
    monkeypatch.setitem(pipeline.PIPELINES, max(pipeline.PIPELINES) + 1, bumped)
    retried = await api.post(f"/resources/{current}/etl/retry")
    assert retried.status_code == 202, retried.text
    for _ in range(300):  # until the retry has claimed the ETL and ended it
        done = await wait_for_etl(api, current, 1)
        if done["etl"]["workflow_id"] == retried.json()["workflow_id"]:
            break
        await asyncio.sleep(0.05)

    assert done["context_pipeline_version"] == bumped.outputs
    assert await _listed(api, prefix, bumped.outputs) == {old}


async def test_the_filter_is_validated(api: httpx.AsyncClient) -> None:
    for value in ("0", "-1", "x"):
        answer = await api.get("/resources", params={"pipeline_version_lt": value})
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"


def test_only_a_load_may_record_the_success_of_a_pipeline() -> None:
    newest = pipeline.PIPELINES[pipeline.newest()]
    assert newest.last_step_records_success
    enrich_last = tuple(step for step in newest.steps if step.name != "load")
    # Any other last step would leave the ETL running in PostgreSQL after it succeeded.
    with pytest.raises(AssertionError, match="enrich"):
        dataclasses.replace(newest, steps=enrich_last)


def test_a_load_recorded_by_a_worker_whose_clock_is_behind_never_ends_before_it_started() -> None:
    started = datetime.now(UTC) + timedelta(minutes=5)  # the server's clock, ahead
    step = StepInput(
        resource_id="r",
        version=1,
        step="load",
        previous_step="enrich",
        steps=[
            StepState(name="normalize", status=StepStatus.SUCCEEDED, attempts=1),
            StepState(name="load", status=StepStatus.RUNNING, started_at=started),
        ],
    )

    normalize, load = step.succeeded_steps(attempt=2, stats={"records": 3})

    assert normalize == step.steps[0]  # type: ignore[index]
    assert (load.status, load.attempts, load.stats) == (StepStatus.SUCCEEDED, 2, {"records": 3})
    assert load.finished_at == started
