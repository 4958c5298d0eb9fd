"""The `enrich` step against the real local enrichment service."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.enrich import EnrichActivities
from tests.helpers import wait_for_etl
from upsertflow.contracts import EtlStatus, StepInput
from upsertflow.models import Blob, Resource, ResourceVersion
from upsertflow.settings import Enrichment, Settings
from upsertflow.store.steps import StepStore

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
    now = datetime.now(UTC)
    digest = hashlib.sha256(resource_id.encode()).hexdigest()
    async with sessions.begin() as session:
        session.add(Blob(digest=digest, body=b"{}", size_bytes=2))
        session.add(
            Resource(id=resource_id, version=1, attributes={}, created_at=now, updated_at=now)
        )
        await session.flush()
        session.add(
            ResourceVersion(
                resource_id=resource_id,
                version=1,
                request_id=uuid.uuid4().hex,
                blob_digest=digest,
                persisted_at=now,
                etl_status=EtlStatus.RUNNING,
                etl_workflow_id="test",
                etl_run_id="test",
                etl_steps=[],
            )
        )
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


async def assert_each_site_enriched_once(
    sessions: async_sessionmaker[AsyncSession], enrichment: httpx.AsyncClient, step: StepInput
) -> dict[str, Any]:
    """The stored output of `enrich` has every record and every site's country name, and
    the service was asked about each value exactly once; return the service's stats."""
    output = await StepStore(sessions).read(step, "enrich")
    assert output is not None
    assert output["note"] == "kept"
    for n, name in enumerate(SITES.values()):
        assert output[f"site_{n}.country.country_name"] == name
    stats: dict[str, Any] = (await enrichment.get("/_stats")).json()
    assert stats["by_key"] == {code: 1 for code in SITES}
    return stats


async def test_a_retried_attempt_resumes_after_the_last_heartbeat(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    enrichment: httpx.AsyncClient,
    version_with_records: StepInput,
) -> None:
    step = version_with_records
    # One batch at a time, so that "the third request" is the third batch.
    config = Enrichment(url=settings.enrichment.url, batch_size=2, concurrency=1)
    heartbeats: list[int] = []
    admin_url = str(enrichment.base_url)

    def on_heartbeat(*details: object) -> None:
        heartbeats.append(int(details[0]))  # type: ignore[call-overload]
        if heartbeats[-1] == 2:  # two batches done: make the third request fail
            httpx.put(f"{admin_url}/_faults", json={"fail_next": 1, "error_status": 503})

    async with httpx.AsyncClient() as http:
        activities = EnrichActivities(StepStore(sessions), http, config)
        first = ActivityEnvironment()
        first.on_heartbeat = on_heartbeat
        with pytest.raises(ApplicationError, match="503"):
            await first.run(activities.enrich, step)
        assert heartbeats[-1] == 2

        second = ActivityEnvironment()
        second.info = dataclasses.replace(
            second.info, attempt=2, heartbeat_details=[heartbeats[-1]]
        )
        result = await second.run(activities.enrich, step)

    assert result.stats == {
        "selected": 6,
        "enriched_fields": 12,
        "batches": 3,
        "resumed_at_batch": 2,
    }
    # Each value was enriched exactly once: the second attempt did not redo batches 1 and 2.
    stats = await assert_each_site_enriched_once(sessions, enrichment, step)
    assert stats["by_status"] == {"200": 3, "503": 1}


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
    # Progress counts the batches stored, whatever order they were answered in.
    assert heartbeats == [0, 1, 2, 3, 4, 5, 6]
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
