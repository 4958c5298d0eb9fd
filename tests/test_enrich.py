"""The `enrich` step against the real local enrichment service."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.abc
import random
import sys
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.enrich import EnrichActivities
from tests.helpers import eventually, owned_version, wait_for_etl
from upsertflow.contracts import StepInput, StepResult
from upsertflow.models import ResourceVersion, StepOutput
from upsertflow.settings import Enrichment, Settings
from upsertflow.store.steps import StepStore
from worker import build_worker, enrichment_client

PERSON = {
    "attributes": {"name": "Ada"},
    "info": {"Contact": {"Email": "Ada@Example.ORG", "Country": "fr"}, "Currency": "EUR"},
}


async def test_upsert_context_is_enriched(
    api: httpx.AsyncClient, worker: Worker, enrichment: httpx.AsyncClient, resource_id: str
) -> None:
    created = await api.put(f"/resources/{resource_id}", json=PERSON)
    assert created.status_code == 201, created.text

    done = await wait_for_etl(api, resource_id, version=1)

    assert done["etl"]["status"] == "succeeded"
    context = done["context"]
    assert context["contact.country"] == "fr"
    assert context["contact.country.country_name"] == "France"
    assert context["contact.country.region"] == "Europe"
    assert context["contact.email.domain"] == "example.org"
    assert context["contact.email.is_free_provider"] is False
    assert context["currency.currency_name"] == "Euro"
    stats = (await enrichment.get("/_stats")).json()
    assert stats["by_key"] == {"fr": 1, "Ada@Example.ORG": 1, "EUR": 1}


async def test_enrichment_503s_are_retried_until_the_service_recovers(
    api: httpx.AsyncClient,
    worker: Worker,
    enrichment: httpx.AsyncClient,
    resource_id: str,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 2, "error_status": 503})

    await api.put(f"/resources/{resource_id}", json=PERSON)
    done = await wait_for_etl(api, resource_id, version=1)

    assert done["etl"]["status"] == "succeeded"
    assert done["context"]["contact.country.country_name"] == "France"
    stats = (await enrichment.get("/_stats")).json()
    assert stats["by_status"] == {"503": 2, "200": 1}
    etl = await _steps(sessions, resource_id)
    assert etl["enrich"]["attempts"] == 3


async def test_enrichment_400_fails_the_etl_at_once_and_keeps_the_resource(
    api: httpx.AsyncClient,
    worker: Worker,
    enrichment: httpx.AsyncClient,
    resource_id: str,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})

    created = await api.put(f"/resources/{resource_id}", json=PERSON)
    done = await wait_for_etl(api, resource_id, version=1)

    assert done["etl"]["status"] == "failed"
    assert "enrich" in done["etl"]["error"]
    assert "400" in done["etl"]["error"]
    assert done["attributes"] == PERSON["attributes"]
    assert done["version"] == created.json()["version"] == 1
    assert done["context"] is None
    stats = (await enrichment.get("/_stats")).json()
    assert stats["requests"] == 1
    etl = await _steps(sessions, resource_id)
    assert etl["enrich"]["status"] == "failed"
    assert etl["enrich"]["attempts"] == 1
    assert etl["load"]["status"] == "pending"


async def _steps(
    sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> dict[str, dict[str, Any]]:
    """The ETL's steps by name, as the workflow recorded them."""
    async with sessions() as session:
        steps = await session.scalar(
            select(ResourceVersion.etl_steps).where(ResourceVersion.resource_id == resource_id)
        )
    assert steps is not None
    return {step["name"]: step for step in steps}


@pytest.fixture
async def version_with_records(
    sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> StepInput:
    """A persisted version whose `normalize` output has six records to enrich."""
    await owned_version(sessions, resource_id)
    step = StepInput(resource_id=resource_id, version=1, step="enrich", previous_step="normalize")
    records = {f"site_{n}.country": code for n, code in enumerate(SITES)}
    # As the workflow that owns the version's ETL ("test", as in every ActivityEnvironment).
    await ActivityEnvironment().run(
        StepStore(sessions).write, step, {**records, "note": "kept"}, "normalize"
    )
    return step


#: The six records of `version_with_records`, by country code, and their names.
SITES = {
    "FR": "France",
    "DE": "Germany",
    "IT": "Italy",
    "ES": "Spain",
    "PT": "Portugal",
    "NL": "Netherlands",
}


async def enrich_output(
    sessions: async_sessionmaker[AsyncSession], step: StepInput
) -> dict[str, Any]:
    """What `enrich` stored as its output for the step's version."""
    async with sessions() as session:
        body = await session.scalar(
            select(StepOutput.body).where(
                StepOutput.resource_id == step.resource_id,
                StepOutput.version == step.version,
                StepOutput.step == "enrich",
            )
        )
    assert body is not None
    output: dict[str, Any] = orjson.loads(body)
    return output


async def assert_each_site_enriched_once(
    sessions: async_sessionmaker[AsyncSession], enrichment: httpx.AsyncClient, step: StepInput
) -> dict[str, Any]:
    """The stored output of `enrich` has every record and every site's country name, and
    the service was asked about each value exactly once; return the service's stats."""
    output = await enrich_output(sessions, step)
    assert output["note"] == "kept"
    for n, name in enumerate(SITES.values()):
        assert output[f"site_{n}.country.country_name"] == name
    stats: dict[str, Any] = (await enrichment.get("/_stats")).json()
    assert stats["by_key"] == {code: 1 for code in SITES}
    return stats


@dataclasses.dataclass
class Resumed:
    """An `enrich` interrupted at its third request (a 503) and a second attempt resumed
    from its last heartbeat (`interrupted_then_resumed`)."""

    heartbeats: list[int]  # the first attempt's
    resumed_heartbeats: list[object]  # the second's
    result: StepResult  # the second's


async def interrupted_then_resumed(
    sessions: async_sessionmaker[AsyncSession],
    enrichment: httpx.AsyncClient,
    step: StepInput,
    first: Enrichment,
    second: Enrichment | None = None,
) -> Resumed:
    """Run `enrich` under `first` until its third request fails with a 503 (the service is
    told so once two batches are stored), then again as attempt 2, resuming from the last
    heartbeat, under `second` (a worker configured otherwise) or `first`."""
    admin_url = str(enrichment.base_url)
    heartbeats: list[int] = []
    resumed_heartbeats: list[object] = []

    def on_heartbeat(*details: object) -> None:
        heartbeats.append(int(details[0]))  # type: ignore[call-overload]
        if heartbeats[-1] == 2:  # two batches stored: make the third request fail
            httpx.put(f"{admin_url}/_faults", json={"fail_next": 1, "error_status": 503})

    async with httpx.AsyncClient() as http:
        interrupted = ActivityEnvironment()
        interrupted.on_heartbeat = on_heartbeat
        activities = EnrichActivities(StepStore(sessions), http, first)
        with pytest.raises(ApplicationError, match="503"):
            await interrupted.run(activities.enrich, step)
        resumed = ActivityEnvironment()
        resumed.info = dataclasses.replace(
            resumed.info, attempt=2, heartbeat_details=[heartbeats[-1]]
        )
        resumed.on_heartbeat = lambda *details: resumed_heartbeats.append(details[0])
        if second is not None:
            activities = EnrichActivities(StepStore(sessions), http, second)
        result = await resumed.run(activities.enrich, step)
    return Resumed(heartbeats, resumed_heartbeats, result)


async def test_a_retried_attempt_resumes_after_the_last_heartbeat(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    enrichment: httpx.AsyncClient,
    version_with_records: StepInput,
) -> None:
    step = version_with_records
    # One batch at a time, so that "the third request" is the third batch.
    config = Enrichment(url=settings.enrichment.url, batch_size=2, concurrency=1)
    run = await interrupted_then_resumed(sessions, enrichment, step, config)
    assert run.heartbeats[-1] == 2

    assert run.result.stats == {
        "selected": 6,
        "enriched_fields": 12,
        "batches": 3,
        "resumed_at_batch": 2,
    }
    # It said where it resumed (the last batch is stored with the output: no heartbeat).
    assert run.resumed_heartbeats == [2]
    # Each value was enriched exactly once: the second attempt did not redo batches 1 and 2.
    stats = await assert_each_site_enriched_once(sessions, enrichment, step)
    assert stats["by_status"] == {"200": 3, "503": 1}


async def test_a_step_that_stores_its_additions_stores_every_field_it_added_and_nothing_else(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    enrichment: httpx.AsyncClient,
    version_with_records: StepInput,
) -> None:
    """Pipeline v6: `enrich` stores the fields it added, not the records it read — those of
    the batches an earlier attempt stored included — and the load merges them back."""
    step = version_with_records.model_copy(update={"stores_additions": True})
    config = Enrichment(url=settings.enrichment.url, batch_size=2, concurrency=1)
    result = (await interrupted_then_resumed(sessions, enrichment, step, config)).result

    assert result.stats["resumed_at_batch"] == 2
    assert await enrich_output(sessions, step) == {
        **{f"site_{n}.country.country_name": name for n, name in enumerate(SITES.values())},
        **{f"site_{n}.country.region": "Europe" for n in range(len(SITES))},  # all six
    }


async def test_a_step_whose_input_is_gone_fails_for_good_and_asks_nothing(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    enrichment: httpx.AsyncClient,
    version_with_records: StepInput,
) -> None:
    """No retry can bring back a missing input (`normalize`'s output deleted, say by an
    operator): the step fails at once, non-retryable, saying what is missing — and the
    enrichment service is not asked anything."""
    step = version_with_records
    async with sessions.begin() as session:
        await session.execute(delete(StepOutput).where(StepOutput.resource_id == step.resource_id))

    async with httpx.AsyncClient() as http:
        activities = EnrichActivities(StepStore(sessions), http, settings.enrichment)
        with pytest.raises(ApplicationError) as failed:
            await ActivityEnvironment().run(activities.enrich, step)

    assert failed.value.type == "StepOutputMissing"
    assert failed.value.non_retryable
    assert failed.value.message == (
        f"the output of step 'normalize' for {step.resource_id} v1 is missing"
    )
    assert (await enrichment.get("/_stats")).json()["requests"] == 0


async def test_an_attempt_retried_with_another_batch_size_asks_again_skipping_nothing(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    enrichment: httpx.AsyncClient,
    version_with_records: StepInput,
) -> None:
    """Checkpoints belong to the batches of one batch size and set of rules: a retry on a
    worker configured otherwise (a deploy between attempts) cannot take its batch 0 for the
    stored batch 0 of another size and skip values that were never asked for."""
    step = version_with_records
    small = Enrichment(url=settings.enrichment.url, batch_size=2, concurrency=1)
    large = Enrichment(url=settings.enrichment.url, batch_size=4, concurrency=1)
    # Batches of 2: values 0-3 stored, then the third request fails.
    result = (await interrupted_then_resumed(sessions, enrichment, step, small, large)).result

    assert result.stats == {
        "selected": 6,
        "enriched_fields": 12,
        "batches": 2,
        "resumed_at_batch": 0,
    }
    output = await enrich_output(sessions, step)
    assert {output[f"site_{n}.country.country_name"] for n in range(6)} == set(SITES.values())
    stats = (await enrichment.get("/_stats")).json()
    # Values 0-3 were asked for twice (once per configuration), 4 and 5 once: none skipped.
    assert sorted(stats["by_key"].values()) == [1, 1, 2, 2, 2, 2]


async def test_batches_in_flight_together_ask_for_each_value_once_and_merge_all(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    enrichment: httpx.AsyncClient,
    version_with_records: StepInput,
) -> None:
    step = version_with_records
    config = Enrichment(url=settings.enrichment.url, batch_size=1, concurrency=4)
    heartbeats: list[int] = []
    async with httpx.AsyncClient() as http:
        activities = EnrichActivities(StepStore(sessions), http, config)
        environment = ActivityEnvironment()
        environment.on_heartbeat = lambda *details: heartbeats.append(int(str(details[0])))
        result = await environment.run(activities.enrich, step)

    assert result.stats == {
        "selected": 6,
        "enriched_fields": 12,
        "batches": 6,
        "resumed_at_batch": 0,
    }
    # Progress counts the batches stored, whatever order they were answered in; the last
    # one's answers are stored with the output (no checkpoint, no heartbeat), and an
    # attempt that resumes nothing has nothing to report at its start.
    assert heartbeats == [1, 2, 3, 4, 5]
    stats = await assert_each_site_enriched_once(sessions, enrichment, step)
    assert stats["by_status"] == {"200": 6}


async def test_half_the_enrichment_requests_failing_still_ends_succeeded(
    api: httpx.AsyncClient,
    worker: Worker,
    enrichment: httpx.AsyncClient,
    resource_id: str,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # Seed 7 makes the first two requests fail: the step is retried, visibly.
    await enrichment.put("/_faults", json={"error_rate": 0.5, "error_status": 503, "seed": 7})

    await api.put(f"/resources/{resource_id}", json=PERSON)
    done = await wait_for_etl(api, resource_id, version=1, within=60)

    assert done["etl"]["status"] == "succeeded"
    assert done["context"]["contact.country.country_name"] == "France"
    stats = (await enrichment.get("/_stats")).json()
    assert stats["by_status"]["200"] == 1
    etl = await _steps(sessions, resource_id)
    assert etl["enrich"]["attempts"] == stats["requests"] > 1


def _worker_client(settings: Settings, max_connections: int) -> httpx.AsyncClient:
    """The worker's HTTP client (`worker.enrichment_client`) with a pool of `max_connections`."""
    enrichment = settings.enrichment.model_copy(update={"max_connections": max_connections})
    return enrichment_client(settings.model_copy(update={"enrichment": enrichment}))


async def _ask(http: httpx.AsyncClient, url: str, **kwargs: Any) -> httpx.Response:
    items = [{"key": "site", "kind": "country_code", "value": "FR"}]
    return await http.post(f"{url}/v1/enrich", json={"items": items}, **kwargs)


async def test_cancelled_requests_never_leave_the_worker_unable_to_reach_the_service(
    settings: Settings, enrichment: httpx.AsyncClient
) -> None:
    # The worker cancels requests all the time (deadlines passed, a batch's failure
    # cancelling the others). httpcore alone loses a pool slot to some of them
    # (encode/httpcore#1093): a few hundred like these and every request failed with a
    # pool timeout while the service was idle.
    url = settings.enrichment.url
    await enrichment.put("/_faults", json={"latency_ms": 2})
    rounds = random.Random(1)
    async with _worker_client(settings, max_connections=2) as http:
        for _ in range(150):
            asks = [asyncio.ensure_future(_ask(http, url)) for _ in range(rounds.randint(1, 8))]
            await asyncio.sleep(rounds.random() * 0.01)
            for ask in asks:
                ask.cancel()
            await asyncio.gather(*asks, return_exceptions=True)

        answers = await asyncio.gather(*(_ask(http, url, timeout=2.0) for _ in range(20)))

    assert [answer.status_code for answer in answers] == [200] * 20
    assert answers[0].json()["results"][0]["fields"]["country_name"] == "France"


class _ImportsSeen(importlib.abc.MetaPathFinder):
    """Every module the interpreter looks for that is not imported yet."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        self.names.append(fullname)


async def test_the_worker_s_requests_look_for_no_module(
    settings: Settings, enrichment: httpx.AsyncClient
) -> None:
    # httpcore looks for sniffio on every lock and cancellation shield of a request; were it
    # not installed, each look would be a failed import, searching the whole path again
    # (~0.1 ms each, encode/httpcore#1103): a tenth of the worker's time on a large input.
    url = settings.enrichment.url
    async with _worker_client(settings, max_connections=2) as http:
        assert (await _ask(http, url)).status_code == 200  # whatever a first request imports
        seen = _ImportsSeen()
        sys.meta_path.insert(0, seen)
        try:
            answers = await asyncio.gather(*(_ask(http, url) for _ in range(10)))
        finally:
            sys.meta_path.remove(seen)
    assert [answer.status_code for answer in answers] == [200] * 10
    assert seen.names == []


async def test_a_request_that_finds_every_connection_busy_waits_at_most_its_pool_timeout(
    settings: Settings, enrichment: httpx.AsyncClient
) -> None:
    url = settings.enrichment.url
    async with _worker_client(settings, max_connections=1) as http:
        hanging = asyncio.ensure_future(_ask(http, url, headers={"X-Fault-Hang": "1"}, timeout=1.0))

        async def in_flight() -> int | None:
            return (await enrichment.get("/_stats")).json()["in_flight"] or None

        await eventually(in_flight, "the hanging request at the service", 10)
        with pytest.raises(httpx.PoolTimeout):
            await _ask(http, url, timeout=httpx.Timeout(5.0, pool=0.2))
        hanging.cancel()
        # The hanging exchange still holds the connection (its caller is gone, it is not):
        # it ends by its own read timeout, then the connection serves again.
        answer = await _ask(http, url, timeout=httpx.Timeout(5.0, pool=10.0))
    assert answer.status_code == 200


async def test_a_worker_runs_no_more_enrich_attempts_at_once_than_its_activity_slots(
    api: httpx.AsyncClient,
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    # The rest wait on the server (scheduled, in the UI) for a slot, however many upserts
    # come in: what one worker takes on is bounded (UPSERTFLOW_WORKER__MAX_CONCURRENT_*).
    one_slot = settings.model_copy(
        update={
            "worker": settings.worker.model_copy(update={"max_concurrent_activities": 1}),
            "enrichment": settings.enrichment.model_copy(update={"concurrency": 1}),
        }
    )
    await enrichment.put("/_faults", json={"latency_ms": 300})
    ids = [f"{resource_id}-{n}" for n in range(4)]
    async with enrichment_client(one_slot) as http:
        async with build_worker(client, one_slot, sessions, http):
            for each in ids:
                assert (await api.put(f"/resources/{each}", json=PERSON)).status_code == 201
            ended = [await wait_for_etl(api, each, version=1, within=60) for each in ids]

    assert [done["etl"]["status"] for done in ended] == ["succeeded"] * 4
    stats = (await enrichment.get("/_stats")).json()
    assert (stats["requests"], stats["peak_in_flight"]) == (4, 1)
