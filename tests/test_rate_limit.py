"""Writes per caller: a token bucket per token subject; `429` with `Retry-After` beyond it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.main import create_app
from api.ratelimit import MAX_TRACKED_CALLERS, TokenBuckets
from tests.helpers import auth_headers
from upsertflow.models import Resource
from upsertflow.settings import Auth, RateLimit, Settings

PROBLEM = "application/problem+json"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert buckets.take("b") == 0.0  # every caller its own bucket
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.5)
    clock.now += 60  # refilled, never beyond the burst
    assert [buckets.take("a") for _ in range(4)][-1] == pytest.approx(0.5)


def test_a_rate_of_zero_is_unlimited_and_idle_callers_are_forgotten() -> None:
    assert all(TokenBuckets(rate=0, burst=1).take("a") == 0.0 for _ in range(1000))
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=1, clock=clock)
    for n in range(MAX_TRACKED_CALLERS):
        buckets.take(f"caller-{n}")
    clock.now += 5  # all of them full again: as good as new
    buckets.take("one more")
    assert len(buckets._buckets) == 1


@pytest.fixture
def clock() -> Clock:
    return Clock()


def on_clock(app: FastAPI, clock: Clock) -> FastAPI:
    """`app` with its write buckets on `clock`: a slow request must not refill a bucket."""
    rate = app.state.write_buckets
    app.state.write_buckets = TokenBuckets(rate.rate, rate.burst, clock=clock)
    return app


@pytest.fixture
async def limited(
    settings: Settings, clock: Clock
) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    """The API allowing 2 writes at once and 1 per second per caller; its client has no token."""
    limited = settings.model_copy(update={"rate_limit": RateLimit(writes_per_second=1.0, burst=2)})
    app = on_clock(create_app(limited), clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield http, limited


async def test_writes_beyond_the_rate_are_429_with_retry_after_per_caller(
    limited: tuple[httpx.AsyncClient, Settings],
    clock: Clock,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    http, settings = limited
    alice, bob = (auth_headers(settings, subject=name) for name in ("alice", "bob"))

    # DELETE of a missing resource: a write (404) that needs no worker.
    for _ in range(2):
        response = await http.delete(f"/resources/{resource_id}", headers=alice)
        assert response.status_code == 404
    refused = [
        await http.delete(f"/resources/{resource_id}", headers=alice),
        await http.post(f"/resources/{resource_id}/etl/retry", headers=alice),
        await http.put(f"/resources/{resource_id}", json={"info": {"a": 1}}, headers=alice),
    ]
    for response in refused:
        assert response.status_code == 429, response.text
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["retry-after"] == "1"
        problem = response.json()
        assert problem["type"] == "urn:upsertflow:problem:rate-limited"
        assert "1 per second" in problem["detail"]
    async with sessions() as session:
        assert await session.scalar(select(Resource).where(Resource.id == resource_id)) is None

    # Another caller is not held back, and nobody's reads are.
    assert (await http.delete(f"/resources/{resource_id}", headers=bob)).status_code == 404
    assert (await http.get(f"/resources/{resource_id}", headers=alice)).status_code == 404

    clock.now += 1.0  # one token back
    assert (await http.delete(f"/resources/{resource_id}", headers=alice)).status_code == 404
    assert (await http.delete(f"/resources/{resource_id}", headers=alice)).status_code == 429


async def test_a_refused_token_takes_nothing_from_the_callers_bucket(
    limited: tuple[httpx.AsyncClient, Settings], resource_id: str
) -> None:
    http, settings = limited
    read_only = auth_headers(settings, "resources:read", subject="alice")
    for _ in range(5):
        response = await http.delete(f"/resources/{resource_id}", headers=read_only)
        assert response.status_code == 403
    alice = auth_headers(settings, subject="alice")
    assert (await http.delete(f"/resources/{resource_id}", headers=alice)).status_code == 404


async def test_with_auth_disabled_callers_are_told_apart_by_address(
    settings: Settings, clock: Clock, resource_id: str
) -> None:
    disabled = settings.model_copy(
        update={"auth": Auth(disabled=True), "rate_limit": RateLimit(writes_per_second=1, burst=1)}
    )
    app = on_clock(create_app(disabled), clock)
    async with app.router.lifespan_context(app):
        for address, statuses in (("10.0.0.1", [404, 429]), ("10.0.0.2", [404])):
            transport = httpx.ASGITransport(app=app, client=(address, 1234))
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                got = [
                    (await http.delete(f"/resources/{resource_id}")).status_code for _ in statuses
                ]
                assert got == statuses, address
