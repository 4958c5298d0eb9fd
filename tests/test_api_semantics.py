"""What a client can rely on: versions under concurrency, Idempotency-Key, the ETL view,
retry, delete and list — through the API, with a real worker, Temporal and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)

from tests.helpers import TERMINAL, api_client, wait_for_etl
from upsertflow.models import Blob, Resource, ResourceContext, ResourceVersion
from upsertflow.settings import Settings
from worker import build_worker, enrichment_client


def with_api(settings: Settings, **changes: Any) -> Settings:
    """`settings` with some of the API's settings changed."""
    return settings.model_copy(update={"api": settings.api.model_copy(update=changes)})


async def _versions(sessions: async_sessionmaker[AsyncSession], resource_id: str) -> dict[int, str]:
    async with sessions() as session:
        rows = await session.execute(
            select(ResourceVersion.version, ResourceVersion.etl_status).where(
                ResourceVersion.resource_id == resource_id
            )
        )
    return {row.version: row.etl_status for row in rows}


async def _until_quiet(
    sessions: async_sessionmaker[AsyncSession], resource_ids: list[str], within: float = 90
) -> None:
    """Wait until every version of the resources has an ended ETL."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        statuses = [
            status for rid in resource_ids for status in (await _versions(sessions, rid)).values()
        ]
        if statuses and all(status in TERMINAL for status in statuses):
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the ETLs did not end")


async def test_concurrent_puts_get_distinct_versions_and_the_last_one_wins(
    api: httpx.AsyncClient,
    worker: Worker,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
    settings: Settings,
) -> None:
    settings.api.sync_timeout_seconds = 300  # about ordering, not speed
    responses = await asyncio.gather(
        *(api.put(f"/resources/{resource_id}", json={"info": {"n": str(n)}}) for n in range(20))
    )

    assert all(r.status_code in (200, 201) for r in responses), [
        r.text for r in responses if r.status_code not in (200, 201)
    ]
    by_version = {r.json()["version"]: r for r in responses}
    assert sorted(by_version) == list(range(1, 21))
    assert sum(r.status_code == 201 for r in responses) == 1
    assert by_version[1].status_code == 201
    await _until_quiet(sessions, [resource_id])
    final = (await api.get(f"/resources/{resource_id}")).json()
    assert final["version"] == 20
    assert final["etl"]["status"] == "succeeded"
    assert final["context_version"] == 20
    last_n = (await _request_info(sessions, resource_id, 20))["n"]
    assert final["context"] == {"n": int(last_n)}
    statuses = await _versions(sessions, resource_id)
    assert set(statuses.values()) <= {"succeeded", "superseded"}
    assert statuses[20] == "succeeded"


async def _request_info(
    sessions: async_sessionmaker[AsyncSession], resource_id: str, version: int
) -> dict[str, Any]:
    """The raw `info` a version was persisted with."""
    import json

    async with sessions() as session:
        body = await session.scalar(
            select(Blob.body)
            .join(ResourceVersion, ResourceVersion.blob_digest == Blob.digest)
            .where(ResourceVersion.resource_id == resource_id, ResourceVersion.version == version)
        )
    assert body is not None
    value: dict[str, Any] = json.loads(body)
    return value


async def test_200_puts_over_20_resources_at_once(
    api: httpx.AsyncClient,
    worker: Worker,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
    settings: Settings,
) -> None:
    # About ordering, not speed: every PUT waits for its version, however busy the machine.
    settings.api.sync_timeout_seconds = 300
    ids = [f"{resource_id}-{i}" for i in range(20)]

    responses = await asyncio.gather(
        *(
            api.put(f"/resources/{rid}", json={"info": {"round": str(n)}})
            for n in range(10)
            for rid in ids
        )
    )

    assert all(r.status_code in (200, 201) for r in responses), [
        r.text for r in responses if r.status_code not in (200, 201)
    ]
    versions = Counter((r.json()["id"], r.json()["version"]) for r in responses)
    assert set(versions.values()) == {1}
    assert sorted(versions) == sorted((rid, v) for rid in ids for v in range(1, 11))
    await _until_quiet(sessions, ids)
    for rid in ids:
        final = (await api.get(f"/resources/{rid}")).json()
        assert (final["version"], final["context_version"]) == (10, 10)
        expected = (await _request_info(sessions, rid, 10))["round"]
        assert final["context"] == {"round": int(expected)}


class _FailFirstPersistAfterCommit(Interceptor):
    """Let request A's first `persist` commit, wait until B persisted, then fail the attempt."""

    def __init__(self) -> None:
        self.a_persisted = asyncio.Event()
        self.b_persisted = asyncio.Event()
        self.calls = 0

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        outer = self

        class _Inbound(ActivityInboundInterceptor):
            async def execute_activity(self, input: ExecuteActivityInput) -> Any:
                if activity.info().activity_type != "persist":
                    return await super().execute_activity(input)
                outer.calls += 1
                result = await super().execute_activity(input)
                if not outer.a_persisted.is_set():
                    outer.a_persisted.set()
                    await outer.b_persisted.wait()
                    raise RuntimeError("lost the connection after commit")
                if result.version == 2:
                    outer.b_persisted.set()
                return result

        return _Inbound(next)


async def test_a_retried_persist_does_not_write_a_stale_version(
    api: httpx.AsyncClient,
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    faults = _FailFirstPersistAfterCommit()
    async with enrichment_client(settings) as http:
        async with build_worker(client, settings, sessions, http, interceptors=[faults]):
            put_a = asyncio.create_task(
                api.put(f"/resources/{resource_id}", json={"attributes": {"who": "A"}})
            )
            await asyncio.wait_for(faults.a_persisted.wait(), 30)
            response_b = await api.put(
                f"/resources/{resource_id}", json={"attributes": {"who": "B"}}
            )
            response_a = await put_a
            await _until_quiet(sessions, [resource_id])

    assert response_a.json()["version"] == 1
    assert response_b.json()["version"] == 2
    assert faults.calls == 3  # A twice (the retry found its version), B once
    final = (await api.get(f"/resources/{resource_id}")).json()
    assert final["version"] == 2
    assert final["attributes"] == {"who": "B"}
    assert await _versions(sessions, resource_id) == {1: "superseded", 2: "succeeded"}


# --- Idempotency-Key ---------------------------------------------------------------------------


async def _workflow_count(client: Client, resource_id: str) -> int:
    return (await client.count_workflows(f'ResourceId="{resource_id}"')).count


async def test_idempotency_key_replays_the_first_response(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    key = {"Idempotency-Key": f"key-{resource_id}"}
    body = {"attributes": {"a": 1}, "info": {"x": "1"}}

    first = await api.put(f"/resources/{resource_id}", json=body, headers=key)
    repeat = await api.put(f"/resources/{resource_id}", json=body, headers=key)

    assert first.status_code == repeat.status_code == 201
    assert repeat.content == first.content  # byte for byte
    assert repeat.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert repeat.headers["x-request-id"] == first.headers["x-request-id"]
    await _until_quiet(sessions, [resource_id])
    assert await _versions(sessions, resource_id) == {1: "succeeded"}
    assert await _workflow_count(client, resource_id) == 1

    other = await api.put(f"/resources/{resource_id}", json={"info": {"x": "2"}}, headers=key)
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert "different request body" in other.json()["detail"]
    assert await _versions(sessions, resource_id) == {1: "succeeded"}


async def test_idempotency_key_in_flight_is_409_then_replays_the_202(
    client: Client, settings: Settings, sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    # No worker: persisting cannot finish, so the first request is in flight for the sync timeout.
    key = {"Idempotency-Key": f"slow-{resource_id}"}
    async with api_client(with_api(settings, sync_timeout_seconds=2.0)) as http:
        first = asyncio.create_task(http.put(f"/resources/{resource_id}", json={}, headers=key))
        await asyncio.sleep(0.5)
        concurrent = await http.put(f"/resources/{resource_id}", json={}, headers=key)
        accepted = await first
        repeat = await http.put(f"/resources/{resource_id}", json={}, headers=key)

    assert concurrent.status_code == 409
    assert concurrent.headers["content-type"] == "application/problem+json"
    assert accepted.status_code == 202
    assert repeat.status_code == 202
    assert repeat.json() == accepted.json()
    assert repeat.headers["idempotent-replayed"] == "true"
    assert await _workflow_count(client, resource_id) == 1
    await client.get_workflow_handle(accepted.json()["workflow_id"]).terminate("test over")


async def test_idempotency_keys_survive_an_api_restart_and_expire(
    worker: Worker, settings: Settings, sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    key = {"Idempotency-Key": f"restart-{resource_id}"}
    short_lived = with_api(settings, idempotency_ttl_seconds=2)

    async def put() -> httpx.Response:
        async with api_client(short_lived) as http:  # a new API process, as far as state goes
            return await http.put(f"/resources/{resource_id}", json={}, headers=key)

    first = await put()
    replayed = await put()
    await asyncio.sleep(2.5)
    after_expiry = await put()

    assert first.status_code == 201
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json()["version"] == 1
    assert after_expiry.status_code == 200
    assert after_expiry.json()["version"] == 2
    assert "idempotent-replayed" not in after_expiry.headers


# --- the ETL view, retry, delete ---------------------------------------------------------------


async def test_etl_view_is_live_while_running_then_from_the_database(
    api: httpx.AsyncClient, worker: Worker, enrichment: httpx.AsyncClient, resource_id: str
) -> None:
    await enrichment.put("/_faults", json={"latency_ms": 1500})
    await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})

    live: dict[str, Any] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        live = (await api.get(f"/resources/{resource_id}/etl")).json()
        if live["live"] and live["steps"][1]["status"] == "running":
            break
        await asyncio.sleep(0.1)
    assert live["live"] is True, live
    steps = {step["name"]: step for step in live["steps"]}
    assert steps["normalize"]["status"] == "succeeded"
    assert steps["enrich"]["status"] == "running"
    assert steps["enrich"]["attempts"] == 1
    assert steps["load"]["status"] == "pending"

    await wait_for_etl(api, resource_id, version=1)
    done = (await api.get(f"/resources/{resource_id}/etl")).json()
    assert done["live"] is False
    assert done["status"] == "succeeded"
    assert [(s["name"], s["status"], s["attempts"]) for s in done["steps"]] == [
        ("normalize", "succeeded", 1),
        ("enrich", "succeeded", 1),
        ("load", "succeeded", 1),
    ]
    assert all(s["started_at"] and s["finished_at"] for s in done["steps"])


async def test_a_load_that_succeeds_records_the_outcome_with_the_context(
    api: httpx.AsyncClient, worker: Worker, client: Client, resource_id: str
) -> None:
    created = await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})
    handle = client.get_workflow_handle(created.json()["etl"]["workflow_id"])
    progress = await handle.result()
    etl = (await api.get(f"/resources/{resource_id}/etl")).json()
    resource = (await api.get(f"/resources/{resource_id}")).json()

    assert (etl["live"], etl["status"], resource["context_version"]) == (False, "succeeded", 1)
    load = etl["steps"][-1]
    assert (load["name"], load["status"], load["attempts"]) == ("load", "succeeded", 1)
    assert load["stats"] == {"records": len(resource["context"])} == progress["steps"][-1]["stats"]
    assert load["started_at"] <= load["finished_at"]
    # The local activities in the history (each a marker, named by its summary): no
    # `record_outcome` after a load that succeeded (pipeline v5).
    summaries = []
    async for event in handle.fetch_history_events():
        if event.HasField("marker_recorded_event_attributes"):
            [summary] = await client.data_converter.decode([event.user_metadata.summary])
            summaries.append(summary)
    assert summaries == [f"persist {resource_id}"] + [
        f"{step} {resource_id} v1" for step in ("normalize", "load")
    ]


async def test_failed_etl_can_be_retried(
    api: httpx.AsyncClient, worker: Worker, enrichment: httpx.AsyncClient, resource_id: str
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})
    await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})
    failed = await wait_for_etl(api, resource_id, version=1)
    assert failed["etl"]["status"] == "failed"

    await enrichment.put("/_faults", json={"latency_ms": 1000})
    retried, at_once = await asyncio.gather(
        api.post(f"/resources/{resource_id}/etl/retry"),
        api.post(f"/resources/{resource_id}/etl/retry"),
    )

    if retried.status_code != 202:
        retried, at_once = at_once, retried
    assert retried.status_code == 202, retried.text
    assert retried.headers["location"] == f"/resources/{resource_id}/etl"
    assert retried.json()["version"] == 1
    retry_id = retried.json()["workflow_id"]
    # Two retries of the same failed run start one workflow: the other joins it, or is
    # told that it is running already.
    if at_once.status_code == 202:
        assert at_once.json()["workflow_id"] == retry_id
    else:
        assert at_once.status_code == 409
    deadline = time.monotonic() + 20
    body: dict[str, Any] = {}
    conflict = None
    while time.monotonic() < deadline:
        body = (await api.get(f"/resources/{resource_id}")).json()
        if body["etl"]["workflow_id"] == retry_id:
            if body["etl"]["status"] in TERMINAL:
                break
            if conflict is None:
                conflict = await api.post(f"/resources/{resource_id}/etl/retry")
        await asyncio.sleep(0.1)
    assert conflict is not None and conflict.status_code == 409
    assert body["etl"]["status"] == "succeeded", body
    assert body["version"] == 1
    assert body["context"]["country.country_name"] == "France"


async def test_delete_cancels_running_work_and_removes_everything(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    enrichment: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    await enrichment.put("/_faults", json={"latency_ms": 3000})
    created = await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})
    workflow_id = created.json()["etl"]["workflow_id"]

    deleted = await api.delete(f"/resources/{resource_id}")

    assert deleted.status_code == 204
    assert (await api.get(f"/resources/{resource_id}")).status_code == 404
    # Cancelled, not waited for: nothing it does from now on can write (its steps are fenced).
    for _ in range(100):
        description = await client.get_workflow_handle(workflow_id).describe()
        if description.status != WorkflowExecutionStatus.RUNNING:
            break
        await asyncio.sleep(0.1)
    assert description.status == WorkflowExecutionStatus.CANCELED
    async with sessions() as session:
        for column in (Resource.id, ResourceVersion.resource_id, ResourceContext.resource_id):
            assert await session.scalar(select(func.count()).where(column == resource_id)) == 0
    assert (await api.delete(f"/resources/{resource_id}")).status_code == 404


async def test_list_pages_with_a_stable_cursor_and_filters_by_status(
    api: httpx.AsyncClient, worker: Worker, enrichment: httpx.AsyncClient, resource_id: str
) -> None:
    ids = [f"{resource_id}-{n}" for n in (1, 3, 5, 7, 9)]
    for rid in ids:
        await api.put(f"/resources/{rid}", json={})
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})
    await api.put(f"/resources/{resource_id}-failed", json={"info": {"country": "FR"}})
    for rid in ids:
        await wait_for_etl(api, rid, version=1)
    await wait_for_etl(api, f"{resource_id}-failed", version=1)

    seen: list[str] = []
    everything: list[str] = []
    cursor = None
    inserted = False
    for _ in range(10_000):  # the suite's database holds other tests' resources too
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        body = (await api.get("/resources", params=params)).json()
        everything += [item["id"] for item in body["items"]]
        seen += [item["id"] for item in body["items"] if item["id"].startswith(resource_id)]
        if seen and not inserted:
            # Created while paging: before the cursor (never shown) and after it (shown).
            await api.put(f"/resources/{resource_id}-0", json={})
            await api.put(f"/resources/{resource_id}-99", json={})
            inserted = True
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert everything == sorted(everything)
    assert len(everything) == len(set(everything))
    assert f"{resource_id}-0" not in seen
    mine = [rid for rid in seen if rid != f"{resource_id}-failed"]
    assert mine == sorted(mine)
    assert set(ids) <= set(mine)
    assert f"{resource_id}-99" in mine
    failed = (await api.get("/resources", params={"etl_status": "failed", "limit": 100})).json()
    assert f"{resource_id}-failed" in [item["id"] for item in failed["items"]]
    assert all(item["etl_status"] == "failed" for item in failed["items"])
    assert (await api.get("/resources", params={"limit": 0})).status_code == 422
    assert (await api.get("/resources", params={"cursor": "!!"})).status_code == 400


@pytest.fixture
async def unreachable_api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API pointed at a Temporal address where nothing listens."""
    import os

    from devstack import free_port

    address = os.environ["TEMPORAL_ADDRESS"]
    os.environ["TEMPORAL_ADDRESS"] = f"127.0.0.1:{free_port()}"
    try:
        async with api_client(with_api(settings, sync_timeout_seconds=1.0)) as http:
            yield http
    finally:
        os.environ["TEMPORAL_ADDRESS"] = address


async def test_temporal_unreachable_is_503_with_retry_after(
    unreachable_api: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    response = await unreachable_api.put(f"/resources/{resource_id}", json={"info": {"a": "1"}})

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"].isdigit()
    assert await _versions(sessions, resource_id) == {}
    ready = await unreachable_api.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == "ok"


async def test_a_keyed_request_refused_with_503_can_be_repeated_once_temporal_is_back(
    api: httpx.AsyncClient,
    unreachable_api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    key = {"Idempotency-Key": f"outage-{resource_id}"}

    refused = await unreachable_api.put(f"/resources/{resource_id}", json={}, headers=key)
    repeated = await api.put(f"/resources/{resource_id}", json={}, headers=key)

    assert refused.status_code == 503
    assert repeated.status_code == 201, repeated.text
    assert "idempotent-replayed" not in repeated.headers
    await _until_quiet(sessions, [resource_id])
    assert await _versions(sessions, resource_id) == {1: "succeeded"}
    assert await _workflow_count(client, resource_id) == 1
