"""Durability on real processes: nothing lost, nothing applied twice.

The module runs a dev stack of its own (`devstack.Stack`) — an embedded PostgreSQL,
the Temporal dev server with its state in a SQLite file (so it can be restarted),
the local enrichment service, the API and one worker, each a separate process — and
breaks one of them in the middle of an ETL: the worker killed with SIGKILL,
Temporal restarted, PostgreSQL stopped for a few seconds, the enrichment service
answering 503s. Each test then checks what PostgreSQL holds (one version, the
complete context, no leftover step outputs) and how often the enrichment
service was asked about each value (`GET /_stats` `by_key`).

The enrichment service is slowed down (`latency_ms`) and the worker sends small
batches, so `enrich` is in the middle of its work when the fault strikes. Every
value is unique to its test, so the counters of one test never mix with another's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from temporalio.client import Client

from devstack import Stack, StackConfig
from tests.helpers import context_records, eventually, wait_for_etl
from upsertflow import temporal
from upsertflow.models import Resource, ResourceContext, ResourceVersion, StepOutput

pytestmark = pytest.mark.e2e

T = TypeVar("T")

#: Values per request to the enrichment service (`UPSERTFLOW_ENRICHMENT__BATCH_SIZE`).
BATCH_SIZE = 2
#: How long the slowed-down enrichment service takes to answer one batch.
LATENCY_MS = 1500
#: Bound of every wait for an ETL to end (the slowest, after a kill, needs about 15 s).
ETL_WITHIN = 60.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """The dev stack, Temporal on a SQLite file so that it can be restarted, in a folder under
    /tmp of its own (not pytest's: as root, PostgreSQL runs as the user `pgserver`, who must
    traverse every parent folder, and every pytest session that starts makes
    /tmp/pytest-of-<user> private again)."""
    config = StackConfig(
        temporal_ui_port=None,
        env={
            "UPSERTFLOW_TASK_QUEUE": f"durability-{uuid.uuid4().hex}",
            "UPSERTFLOW_ENRICHMENT__BATCH_SIZE": str(BATCH_SIZE),
            # One batch at a time: the scenarios time batches against the SDK's heartbeat
            # throttle (batches in flight together: `test_enrich.py`).
            "UPSERTFLOW_ENRICHMENT__CONCURRENCY": "1",
            "UPSERTFLOW_WORKER__GRACEFUL_SHUTDOWN_SECONDS": "1",
        },
    )
    with Stack(config) as servers:
        yield servers


@pytest.fixture(scope="module")
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.api_url, timeout=15, headers=stack.auth_headers()
    ) as http:
        yield http


class EnrichmentAdmin:
    """The enrichment service's fault and counter endpoints."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def reset(self) -> None:
        (await self.http.delete("/_faults")).raise_for_status()
        (await self.http.delete("/_stats")).raise_for_status()

    async def faults(self, **faults: Any) -> None:
        (await self.http.put("/_faults", json=faults)).raise_for_status()

    async def stats(self) -> dict[str, Any]:
        response = await self.http.get("/_stats")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def by_key(self, values: list[str]) -> dict[str, int]:
        """How many times the service answered for each of `values`."""
        counts = (await self.stats())["by_key"]
        return {value: counts.get(value, 0) for value in values}

    async def served(self, values: list[str]) -> dict[str, int] | None:
        """The counts of `values` once every one of them was answered, else None."""
        counts = await self.by_key(values)
        return counts if all(counts.values()) else None


@pytest.fixture(scope="module")
async def service(stack: Stack) -> AsyncIterator[EnrichmentAdmin]:
    async with httpx.AsyncClient(base_url=stack.enrichment_url, timeout=5) as http:
        yield EnrichmentAdmin(http)


@pytest.fixture
async def enrichment(stack: Stack, service: EnrichmentAdmin) -> AsyncIterator[EnrichmentAdmin]:
    """For one test: a running worker, counters and faults reset, faults removed afterwards."""
    if not stack.worker.running:
        stack.worker.start()
    await service.reset()
    try:
        yield service
    finally:
        await service.http.delete("/_faults")


@pytest.fixture(scope="module")
async def client(stack: Stack) -> Client:
    return await temporal.connect(
        env={"TEMPORAL_ADDRESS": stack.temporal_address},
        target_host=stack.temporal_address,
        codec=stack.codec,
    )


# --- resources and what became of them ------------------------------------------------


@dataclass(frozen=True)
class Contacts:
    """A resource whose `info` holds `count` e-mail addresses to enrich, unique to it."""

    resource_id: str
    count: int

    @property
    def keys(self) -> list[str]:
        """The records' paths, in the order `enrich` sends them (sorted)."""
        return [f"contacts.c{n:02d}.email" for n in range(self.count)]

    def value(self, n: int) -> str:
        domain = "gmail.com" if n % 2 else "example.org"
        return f"c{n:02d}.{self.resource_id}@{domain}"

    @property
    def values(self) -> list[str]:
        return [self.value(n) for n in range(self.count)]

    @property
    def batches(self) -> list[list[str]]:
        values = self.values
        return [values[i : i + BATCH_SIZE] for i in range(0, len(values), BATCH_SIZE)]

    @property
    def body(self) -> dict[str, Any]:
        contacts = {f"C{n:02d}": {"Email": self.value(n)} for n in range(self.count)}
        return {
            "attributes": {"name": self.resource_id},
            "info": {"Name": self.resource_id, "Contacts": contacts},
        }

    @property
    def context(self) -> dict[str, Any]:
        """The context the ETL must produce: every record, every enriched field."""
        context: dict[str, Any] = {"name": self.resource_id}
        for key, value in zip(self.keys, self.values, strict=True):
            context[key] = value
            context[f"{key}.domain"] = value.rpartition("@")[2]
            context[f"{key}.is_free_provider"] = value.endswith("@gmail.com")
        return context


def contacts(count: int) -> Contacts:
    return Contacts(f"d-{uuid.uuid4().hex[:10]}", count)


async def upsert(api: httpx.AsyncClient, resource: Contacts) -> dict[str, Any]:
    """PUT the resource (version 1); return the API's answer."""
    response = await api.put(f"/resources/{resource.resource_id}", json=resource.body)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["version"] == 1
    return body


async def finished_etl(api: httpx.AsyncClient, stack: Stack, resource: Contacts) -> dict[str, Any]:
    """Wait until the ETL of the resource has ended; return the resource as the API shows it."""
    try:
        return await wait_for_etl(api, resource.resource_id, version=1, within=ETL_WITHIN)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{stack.tails()}") from None


async def recorded_heartbeat(client: Client, workflow_id: str) -> int | None:
    """Batches done per the last `enrich` heartbeat Temporal recorded; None if none running."""
    description = await client.get_workflow_handle(workflow_id).describe()
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name == "enrich" and pending.heartbeat_details.payloads:
            details = await client.data_converter.decode(pending.heartbeat_details.payloads)
            return int(details[0])
    return None


@dataclass(frozen=True)
class Stored:
    """What PostgreSQL holds for a resource."""

    version: int
    versions: list[int]
    context_version: int | None
    context: dict[str, Any] | None
    etl_status: str
    steps: dict[str, dict[str, Any]]
    step_outputs: int


async def stored(stack: Stack, resource_id: str) -> Stored:
    """Read the resource straight from PostgreSQL, on a connection of its own."""
    engine = create_async_engine(stack.database_url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            version = await connection.scalar(
                select(Resource.version).where(Resource.id == resource_id)
            )
            versions = (
                await connection.execute(
                    select(
                        ResourceVersion.version,
                        ResourceVersion.etl_status,
                        ResourceVersion.etl_steps,
                    )
                    .where(ResourceVersion.resource_id == resource_id)
                    .order_by(ResourceVersion.version)
                )
            ).all()
            context = await connection.scalar(
                select(ResourceContext.version).where(ResourceContext.resource_id == resource_id)
            )
            records = (await context_records(connection, resource_id)).get(resource_id)
            step_outputs = await connection.scalar(
                select(func.count()).where(StepOutput.resource_id == resource_id)
            )
    finally:
        await engine.dispose()
    assert version is not None and versions, f"resource {resource_id} is not stored"
    return Stored(
        version=version,
        versions=[row.version for row in versions],
        context_version=context,
        context=records,
        etl_status=versions[-1].etl_status,
        steps={step["name"]: step for step in versions[-1].etl_steps},
        step_outputs=step_outputs or 0,
    )


async def assert_processed_once(stack: Stack, resource: Contacts, done: dict[str, Any]) -> Stored:
    """The ETL succeeded, exactly one version exists, its context is complete, nothing is left."""
    assert done["etl"]["status"] == "succeeded", f"{done}\n{stack.tails()}"
    assert (done["version"], done["context_version"]) == (1, 1)
    assert done["context"] == resource.context
    row = await stored(stack, resource.resource_id)
    assert row.versions == [1], "the upsert was persisted more than once"
    assert row.version == row.context_version == 1
    assert row.context == resource.context
    assert row.etl_status == "succeeded"
    assert {name: step["status"] for name, step in row.steps.items()} == {
        "normalize": "succeeded",
        "enrich": "succeeded",
        "load": "succeeded",
    }
    assert row.step_outputs == 0, "load left step outputs (or checkpoints) behind"
    return row


def values_of(resource: Contacts, batches: slice) -> list[str]:
    return [value for batch in resource.batches[batches] for value in batch]


# --- 1. the worker killed with SIGKILL in the middle of `enrich` ----------------------------


@dataclass(frozen=True)
class KilledMidEnrich:
    """Two ETLs in `enrich` when the worker was killed, and what became of them.

    The SDK sends an activity's first heartbeat at once and holds later ones back,
    sending the latest every 8 s (80 % of enrich's 10 s heartbeat timeout). `late`
    had run for longer than that: Temporal had recorded a heartbeat saying how many
    batches were done. `early` had answers for its first batches, but Temporal only
    its first heartbeat (0 batches done).
    """

    late: Contacts
    early: Contacts
    #: Batches done per the last heartbeat Temporal had recorded when the worker died.
    recorded: dict[str, int]
    #: The values the service had answered (and the worker stored) before the kill.
    answered_before_kill: dict[str, list[str]]
    done: dict[str, dict[str, Any]]
    rows: dict[str, Stored]
    #: How often the service was asked about each value, in the end.
    counts: dict[str, int]


@pytest.fixture(scope="module")
async def killed_mid_enrich(
    stack: Stack, api: httpx.AsyncClient, service: EnrichmentAdmin, client: Client
) -> AsyncIterator[KilledMidEnrich]:
    """Run two slow ETLs, SIGKILL the worker in the middle of both, start a new worker."""
    if not stack.worker.running:
        stack.worker.start()
    await service.reset()
    await service.faults(latency_ms=LATENCY_MS)
    late, early = contacts(16), contacts(8)  # 8 and 4 batches
    try:
        late_id = (await upsert(api, late))["etl"]["workflow_id"]
        await eventually(
            lambda: service.served(values_of(late, slice(0, 3))), "3 batches of `late`", 30
        )
        early_id = (await upsert(api, early))["etl"]["workflow_id"]

        async def both_in_progress() -> int | None:
            recorded = await recorded_heartbeat(client, late_id)
            if recorded and await service.served(early.batches[0]):
                return recorded
            return None

        await eventually(both_in_progress, "a heartbeat of `late` and a batch of `early`", 30)
        counts = await service.by_key(early.values + late.values)
        answered = {
            r.resource_id: [value for value in r.values if counts[value]] for r in (late, early)
        }
        await asyncio.sleep(0.5)  # the worker stores the answers it got (milliseconds)
        recorded = {
            late.resource_id: await recorded_heartbeat(client, late_id) or 0,
            early.resource_id: await recorded_heartbeat(client, early_id) or 0,
        }
        stack.worker.kill()
        stack.worker.start()

        done = {r.resource_id: await finished_etl(api, stack, r) for r in (late, early)}
        rows = {r.resource_id: await stored(stack, r.resource_id) for r in (late, early)}
        yield KilledMidEnrich(
            late=late,
            early=early,
            recorded=recorded,
            answered_before_kill=answered,
            done=done,
            rows=rows,
            counts=await service.by_key(late.values + early.values),
        )
    finally:
        await service.http.delete("/_faults")


async def test_worker_killed_mid_enrich_the_new_worker_resumes_from_its_checkpoints(
    stack: Stack, killed_mid_enrich: KilledMidEnrich
) -> None:
    run = killed_mid_enrich
    for resource in (run.late, run.early):
        await assert_processed_once(stack, resource, run.done[resource.resource_id])
        enrich = run.rows[resource.resource_id].steps["enrich"]
        assert enrich["attempts"] == 2, f"the kill did not interrupt enrich: {enrich}"
        # At least once, at most twice: a batch is asked again only if its answers were not
        # stored (checkpointed) before the kill.
        assert {run.counts[value] for value in resource.values} <= {1, 2}, run.counts

    early_answers = run.answered_before_kill[run.early.resource_id]
    assert set(run.early.batches[0]) <= set(early_answers), "killed before `early` had answers"
    assert run.recorded[run.early.resource_id] < len(run.early.batches)

    late = run.late
    recorded = run.recorded[late.resource_id]
    assert 1 <= recorded < len(late.batches)
    assert run.rows[late.resource_id].steps["enrich"]["stats"]["resumed_at_batch"] >= recorded
    not_repeated = {value: run.counts[value] for value in values_of(late, slice(0, recorded))}
    assert not_repeated == dict.fromkeys(not_repeated, 1)


async def test_worker_killed_mid_enrich_batches_answered_before_the_kill_are_not_asked_again(
    killed_mid_enrich: KilledMidEnrich,
) -> None:
    run = killed_mid_enrich
    for resource in (run.late, run.early):
        answered = run.answered_before_kill[resource.resource_id]
        assert answered, f"nothing of {resource.resource_id} was answered before the kill"
        counts = {value: run.counts[value] for value in answered}
        assert counts == dict.fromkeys(answered, 1), (
            f"answered before the kill and asked again after it; Temporal had recorded "
            f"{run.recorded[resource.resource_id]} batches done: {counts}"
        )


# --- 2. Temporal stopped and restarted on the same SQLite file --------------------------


async def test_temporal_restarted_mid_etl_the_etl_completes_once(
    stack: Stack, api: httpx.AsyncClient, enrichment: EnrichmentAdmin
) -> None:
    await enrichment.faults(latency_ms=LATENCY_MS)
    resource = contacts(8)
    accepted = await upsert(api, resource)
    await eventually(lambda: enrichment.served(resource.batches[0]), "a first batch", 30)
    assert await enrichment.served(resource.values) is None, "enrich ended before the restart"

    stack.temporal.stop()  # SIGTERM
    try:
        assert stack.temporal.db_file is not None and stack.temporal.db_file.stat().st_size > 0
        await asyncio.sleep(1)
    finally:
        stack.temporal.start()

    done = await finished_etl(api, stack, resource)
    row = await assert_processed_once(stack, resource, done)
    assert done["etl"]["run_id"] == accepted["etl"]["run_id"], "a new workflow run was started"
    assert row.steps["enrich"]["attempts"] == 1
    assert await enrichment.by_key(resource.values) == dict.fromkeys(resource.values, 1)


# --- 3. PostgreSQL stopped while `enrich` waits for the enrichment service ----------------


async def test_postgres_stopped_mid_etl_the_etl_completes_once(
    stack: Stack, api: httpx.AsyncClient, enrichment: EnrichmentAdmin
) -> None:
    await enrichment.faults(latency_ms=LATENCY_MS)
    resource = contacts(8)
    await upsert(api, resource)

    async def next_batch_in_flight() -> list[str] | None:
        """The values answered so far, once at least one batch is and the next one is asked."""
        stats = await enrichment.stats()
        answered = [value for value in resource.values if stats["by_key"].get(value)]
        return answered if answered and stats["in_flight"] else None

    # The worker asks for the next batch only after storing the answers to the previous ones.
    answered_before = await eventually(next_batch_in_flight, "a second request in flight", 30)
    stack.postgres.pause()
    try:
        await asyncio.sleep(3)
    finally:
        stack.postgres.resume()

    done = await finished_etl(api, stack, resource)
    row = await assert_processed_once(stack, resource, done)
    assert row.steps["enrich"]["attempts"] >= 2, "the outage did not reach enrich"
    assert row.steps["enrich"]["stats"]["resumed_at_batch"] >= 1
    counts = await enrichment.by_key(resource.values)
    # Only the batch whose answers could not be stored during the outage is asked twice.
    assert set(counts.values()) <= {1, 2}, counts
    assert {value: counts[value] for value in answered_before} == dict.fromkeys(answered_before, 1)
    assert sum(counts.values()) <= len(resource.values) + BATCH_SIZE, counts


# --- 4. the enrichment service answering 503 for a while --------------------------------


async def test_enrichment_503s_mid_enrich_are_retried_without_asking_twice(
    stack: Stack, api: httpx.AsyncClient, enrichment: EnrichmentAdmin
) -> None:
    await enrichment.faults(latency_ms=500)
    resource = contacts(6)
    await upsert(api, resource)
    await eventually(lambda: enrichment.served(resource.batches[0]), "a first batch", 30)
    # Applied to the request in flight too: the service reads its faults after the latency.
    await enrichment.faults(latency_ms=500, fail_next=3, error_status=503)

    done = await finished_etl(api, stack, resource)
    row = await assert_processed_once(stack, resource, done)
    assert row.steps["enrich"]["attempts"] == 4
    assert row.steps["enrich"]["stats"]["resumed_at_batch"] >= 1
    stats = await enrichment.stats()
    assert stats["by_status"].get("503") == 3
    # A 503 answers nothing; each retry resumed after the last stored batch.
    assert await enrichment.by_key(resource.values) == dict.fromkeys(resource.values, 1)
