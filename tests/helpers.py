"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from api.main import create_app
from api.security import Scope
from api.tokens import mint
from upsertflow.contracts import EtlStatus, StepInput
from upsertflow.models import Blob, Resource, ResourceContext, ResourceVersion
from upsertflow.settings import Settings
from upsertflow.store.contexts import ALL_RECORDS

TERMINAL = {"succeeded", "failed", "superseded", "cancelled"}
T = TypeVar("T")


def auth_headers(settings: Settings, *scopes: str, subject: str = "test") -> dict[str, str]:
    """`Authorization: Bearer <token>` for an API of `settings`: every scope unless `scopes`."""
    token = mint(settings.auth, subject=subject, scopes=scopes or tuple(Scope))
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API of `settings`, in-process with its lifespan run, over httpx, authorized."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api", headers=auth_headers(settings)
        ) as http:
            yield http


def ended_etl(response: httpx.Response, version: int | None) -> dict[str, Any] | None:
    """The resource of a `GET /resources/{id}` answer once the ETL of `version` (or any) ended."""
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    etl = body["etl"]
    if etl["status"] in TERMINAL and version in (None, etl["version"]):
        return body
    return None


async def eventually(
    probe: Callable[[], Awaitable[T | None]], what: str, within: float, every: float = 0.05
) -> T:
    """Poll `probe` until it returns something other than None; fail after `within` s."""
    deadline = time.monotonic() + within
    while (result := await probe()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(every)
    return result


def eventually_sync(
    probe: Callable[[], T | None], what: str, within: float, every: float = 0.05
) -> T:
    """`eventually` for tests that are not async."""
    deadline = time.monotonic() + within
    while (result := probe()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(every)
    return result


def _etl_ended(
    response: httpx.Response | httpx.TransportError, version: int | None, seen: list[object]
) -> dict[str, Any] | None:
    """The resource once its ETL ended; else None, keeping what was seen for the failure.
    An API that does not answer for a while (restarting) is asked again."""
    if isinstance(response, httpx.TransportError):
        seen[:] = [response]
        return None
    seen[:] = [response.text]
    return ended_etl(response, version)


async def wait_for_etl(
    http: httpx.AsyncClient, resource_id: str, version: int | None = None, within: float = 30.0
) -> dict[str, Any]:
    """Poll `GET /resources/{id}` until the ETL of `version` (or of the current version) has
    ended; return the resource."""
    seen: list[object] = []

    async def probe() -> dict[str, Any] | None:
        try:
            response: httpx.Response | httpx.TransportError = await http.get(
                f"/resources/{resource_id}"
            )
        except httpx.TransportError as error:
            response = error
        return _etl_ended(response, version, seen)

    try:
        return await eventually(probe, f"the ETL of {resource_id} v{version} to end", within)
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}; last seen: {seen}") from None


def wait_for_etl_sync(
    http: httpx.Client, resource_id: str, version: int | None = None, within: float = 30.0
) -> dict[str, Any]:
    """`wait_for_etl` for tests that are not async."""
    seen: list[object] = []

    def probe() -> dict[str, Any] | None:
        try:
            response: httpx.Response | httpx.TransportError = http.get(f"/resources/{resource_id}")
        except httpx.TransportError as error:
            response = error
        return _etl_ended(response, version, seen)

    try:
        return eventually_sync(probe, f"the ETL of {resource_id} v{version} to end", within)
    except AssertionError as timeout:
        raise AssertionError(f"{timeout}; last seen: {seen}") from None


async def context_records(
    connection: AsyncConnection | AsyncSession, *resource_ids: str
) -> dict[str, dict[str, Any]]:
    """The records of the resources' contexts as stored, by resource (those with one)."""
    rows = await connection.execute(
        select(ResourceContext.resource_id, ALL_RECORDS).where(
            ResourceContext.resource_id.in_(resource_ids)
        )
    )
    return {resource_id: records for resource_id, records in rows}


async def owned_version(sessions: async_sessionmaker[AsyncSession], resource_id: str) -> None:
    """Version 1 of `resource_id`, persisted (an empty `info`), its ETL running and owned by
    workflow "test": the workflow of every `ActivityEnvironment`, whose steps it fences in."""
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


def step_inputs(resource_id: str, *, additions: bool = False) -> tuple[StepInput, ...]:
    """The inputs of normalize, enrich and load of version 1, each reading the one before;
    with `additions`, as pipeline v6 calls them (`enrich` storing only what it adds, the
    load merging it into `normalize`'s records)."""
    return (
        StepInput(resource_id=resource_id, version=1, step="normalize"),
        StepInput(
            resource_id=resource_id,
            version=1,
            step="enrich",
            previous_step="normalize",
            stores_additions=additions,
        ),
        StepInput(
            resource_id=resource_id,
            version=1,
            step="load",
            previous_step="enrich",
            records_from=["normalize", "enrich"] if additions else None,
        ),
    )
