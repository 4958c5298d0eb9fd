"""Large `info` maps travel by reference; stored documents nobody picked up are collected."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from tests.helpers import wait_for_etl
from tests.test_context import read_context
from upsertflow.janitor import collect
from upsertflow.models import Blob, BlobClaim, IdempotencyKey
from upsertflow.settings import Janitor
from workflows.upsert import UpsertWorkflow

PAYLOAD_WARNING_BYTES = 256 * 1024


async def test_a_6_mib_info_is_processed_without_large_payloads(
    api: httpx.AsyncClient, worker: Worker, client: Client, resource_id: str
) -> None:
    info = {
        f"Section {s}": {f"Field {f}": f"{'v' * 90}{s:04d}{f:03d}" for f in range(200)}
        for s in range(300)
    }
    body = json.dumps({"info": info}).encode()
    assert len(body) >= 6 * 1024 * 1024

    created = await api.put(
        f"/resources/{resource_id}",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )

    assert created.status_code == 201, created.text
    done = await wait_for_etl(api, resource_id, version=1, within=120)
    assert done["etl"]["status"] == "succeeded"
    assert (done["context"], done["context_records"]) == (None, 300 * 200)  # too big to inline
    context, _ = await read_context(api, resource_id, limit=10_000)
    assert len(context) == 300 * 200
    assert context["section_7.field_11"] == f"{'v' * 90}0007011"
    handle = client.get_workflow_handle_for(UpsertWorkflow.run, done["etl"]["workflow_id"])
    history = await handle.fetch_history()
    largest = max(event.ByteSize() for event in history.events)
    assert largest < PAYLOAD_WARNING_BYTES, f"a history event of {largest} bytes"
    result = await handle.result()
    assert next(s for s in result.steps if s.name == "normalize").stats["records"] == 60_000


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_janitor_collects_what_nobody_refers_to(
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    api: httpx.AsyncClient,
    worker: Worker,
    resource_id: str,
) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=3)
    orphan, abandoned, fresh = (
        _digest(f"{resource_id}-{n}") for n in ("orphan", "abandoned", "fresh")
    )
    async with sessions.begin() as session:
        for digest in (orphan, abandoned, fresh):
            session.add(Blob(digest=digest, body=b"{}", size_bytes=2))
        await session.flush()
        # The API died after storing `abandoned` for a request: its claim is old.
        session.add(BlobClaim(request_id=f"dead-{resource_id}", digest=abandoned))
        await session.flush()
        await session.execute(
            update(Blob).where(Blob.digest.in_([orphan, abandoned])).values(created_at=long_ago)
        )
        await session.execute(
            update(BlobClaim)
            .where(BlobClaim.request_id == f"dead-{resource_id}")
            .values(created_at=long_ago)
        )
        session.add(
            IdempotencyKey(
                key=f"old-{resource_id}",
                scope="PUT /resources/x",
                fingerprint="f",
                request_id="r",
                created_at=long_ago,
                locked_until=long_ago,
                expires_at=long_ago + timedelta(days=1),
            )
        )
    # A live resource: its info is referenced by its version and must stay.
    await api.put(f"/resources/{resource_id}", json={"info": {"keep": "me"}})
    kept = await wait_for_etl(api, resource_id, version=1)
    assert kept["etl"]["status"] == "succeeded"

    collected = await collect(sessions, client, Janitor(claim_ttl_seconds=2 * 86400))

    assert collected.claims >= 1 and collected.blobs >= 2 and collected.idempotency_keys >= 1
    async with sessions() as session:
        left = set(await session.scalars(select(Blob.digest)))
        keys = set(await session.scalars(select(IdempotencyKey.key)))
    assert orphan not in left
    assert abandoned not in left
    assert fresh in left  # stored just now: a request may be about to claim it
    info_digest = hashlib.sha256(b'{"keep":"me"}').hexdigest()
    assert info_digest in left
    assert f"old-{resource_id}" not in keys
    again = await api.get(f"/resources/{resource_id}")
    assert again.json()["context"] == {"keep": "me"}
