"""Bad input: a clear 4xx problem document, nothing written, no workflow started."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from tests.helpers import api_client
from upsertflow.models import Blob, IdempotencyKey, Resource
from upsertflow.settings import Limits, Settings

LIMITS = Limits(max_body_bytes=4096, max_depth=5, max_info_keys=10)


@pytest.fixture
async def strict_api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API with small limits, so each one is easy to exceed."""
    async with api_client(settings.model_copy(update={"limits": LIMITS})) as http:
        yield http


async def _counts(sessions: async_sessionmaker[AsyncSession]) -> tuple[int, int, int]:
    async with sessions() as session:
        return (
            await session.scalar(select(func.count()).select_from(Blob)) or 0,
            await session.scalar(select(func.count()).select_from(Resource)) or 0,
            await session.scalar(select(func.count()).select_from(IdempotencyKey)) or 0,
        )


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": "x"}
    for _ in range(depth - 1):
        value = {"level": value}
    return value


JSON = {"Content-Type": "application/json"}

BODY_CASES = [
    # (name, raw body, headers, expected status, words the detail must contain)
    ("malformed JSON", b'{"info": {', JSON, 400, "Expecting"),
    ("invalid UTF-8", b'{"info": {"a": "\xff"}}', JSON, 400, "UTF-8"),
    ("not an object", b"[1, 2]", JSON, 422, "object"),
    ("attributes not an object", b'{"attributes": [1]}', JSON, 422, "attributes"),
    ("info not an object", b'{"info": "text"}', JSON, 422, "info"),
    ("unknown field", b'{"infos": {}}', JSON, 422, "infos"),
    ("NaN", b'{"info": {"a": NaN}}', JSON, 422, "NaN"),
    ("Infinity", b'{"info": {"a": -Infinity}}', JSON, 422, "Infinity"),
    ("overflowing number", b'{"info": {"a": 1e400}}', JSON, 422, "overflows"),
    ("integer beyond 2^53", b'{"info": {"a": 9007199254740993}}', JSON, 422, "2^53"),
    ("NUL character", b'{"info": {"a": "x\\u0000y"}}', JSON, 422, "u0000"),
    ("NUL in a key", b'{"info": {"a\\u0000": 1}}', JSON, 422, "u0000"),
    ("lone surrogate", b'{"info": {"a": "\\ud800"}}', JSON, 422, "surrogate"),
    ("duplicate keys", b'{"info": {"a": 1, "a": 2}}', JSON, 422, "duplicate"),
    ("too deep", json.dumps({"info": _nested(6)}).encode(), JSON, 422, "deeper"),
    (
        "too many keys",
        json.dumps({"info": {f"k{n}": n for n in range(11)}}).encode(),
        JSON,
        422,
        "keys",
    ),
    ("too large", json.dumps({"info": {"a": "x" * 5000}}).encode(), JSON, 413, "4096"),
    ("text/plain", b"{}", {"Content-Type": "text/plain"}, 415, "application/json"),
    ("no content type", b"{}", {}, 415, "application/json"),
]


@pytest.mark.parametrize(
    ("raw", "headers", "status", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BODY_CASES],
)
async def test_bad_body_is_refused_and_nothing_happens(
    strict_api: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    resource_id: str,
    raw: bytes,
    headers: dict[str, str],
    status: int,
    words: str,
) -> None:
    before = await _counts(sessions)

    response = await strict_api.put(
        f"/resources/{resource_id}",
        content=raw,
        headers={**headers, "Idempotency-Key": f"k-{resource_id}"},
    )

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert problem["type"].startswith("urn:upsertflow:problem:")
    assert problem["title"]
    assert words in problem["detail"], problem["detail"]
    assert await _counts(sessions) == before
    assert (await strict_api.get(f"/resources/{resource_id}")).status_code == 404
    assert (await client.count_workflows(f'ResourceId="{resource_id}"')).count == 0


@pytest.mark.parametrize(
    "bad_id",
    [
        "x" * 129,
        "",
        "a%2Fb",
        "a/b",
        "a%2Fetl",
        "a%0Ab",
        "%2E%2E",
        "%2E",
        "a b",
        "a%20b",
        "caf%C3%A9",
        "a:b",
    ],
)
async def test_bad_resource_id_is_422(
    strict_api: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], bad_id: str
) -> None:
    before = await _counts(sessions)

    put = await strict_api.put(f"/resources/{bad_id}", json={})
    get = await strict_api.get(f"/resources/{bad_id}")

    assert put.status_code == 422, put.text
    assert get.status_code == 422, get.text
    assert put.json()["errors"][0]["field"] == "path.resource_id"
    assert await _counts(sessions) == before


async def test_a_large_body_is_refused_while_it_is_read(
    strict_api: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"info": {"a": "'
        for _ in range(1000):  # 1 MB in all, with no Content-Length to go by
            sent += 1
            yield b"x" * 1000
        yield b'"}}'

    response = await strict_api.put(f"/resources/{resource_id}", content=chunks(), headers=JSON)

    assert response.status_code == 413
    assert sent < 100, f"the API read {sent} KB of a body over its 4 KB limit"
