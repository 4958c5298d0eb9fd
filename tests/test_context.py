"""A resource's context: inline while small, page by page at `/resources/{id}/context` always."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.worker import Worker

from tests.helpers import wait_for_etl
from upsertflow.models import Resource, ResourceContext, ResourceContextChunk
from upsertflow.settings import Limits
from upsertflow.store.versions import chunks_of

INLINE = Limits().max_inline_context_records
PROBLEM = "application/problem+json"


def _large_info(groups: int = 3, per_group: int = 1_000) -> dict[str, Any]:
    """An `info` that normalizes to itself: `group_a.f0000` ... (no enrichment rule matches)."""
    return {
        f"group_{chr(ord('a') + g)}": {f"f{n:04d}": f"value {g} {n}" for n in range(per_group)}
        for g in range(groups)
    }


def _flat(info: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{group}.{key}": value for group, fields in info.items() for key, value in fields.items()
    }


async def read_context(
    http: httpx.AsyncClient, resource_id: str, **params: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Follow `next_cursor` from the first page to the last; return the records and the pages."""
    records: dict[str, Any] = {}
    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await http.get(f"/resources/{resource_id}/context", params=query, timeout=60)
        assert response.status_code == 200, response.text[:2000]
        page = response.json()
        pages.append(page)
        assert not records.keys() & page["records"].keys(), "a record was returned twice"
        records.update(page["records"])
        cursor = page["next_cursor"]
        if cursor is None:
            return records, pages


async def _created(
    api: httpx.AsyncClient, resource_id: str, info: dict[str, Any]
) -> dict[str, Any]:
    created = await api.put(f"/resources/{resource_id}", json={"info": info}, timeout=60)
    assert created.status_code in (200, 201), created.text[:2000]
    done = await wait_for_etl(api, resource_id, created.json()["version"], within=120)
    assert done["etl"]["status"] == "succeeded", done["etl"]
    return done


def _assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem: dict[str, Any] = response.json()
    assert problem["type"] == f"urn:upsertflow:problem:{slug}", problem
    assert problem["status"] == status
    return problem


async def test_a_small_context_is_inline_and_its_page_is_the_same(
    api: httpx.AsyncClient, worker: Worker, resource_id: str
) -> None:
    done = await _created(
        api, resource_id, {"Name": "Ada", "Address": {"City": "Paris"}, "Age": "42"}
    )

    expected = {"address.city": "Paris", "age": 42, "name": "Ada"}
    assert done["context"] == expected
    assert list(done["context"]) == sorted(expected), "inline records are in path order"
    assert done["context_records"] == 3
    assert done["context_version"] == 1
    assert done["context_url"] == f"/resources/{resource_id}/context"
    page = (await api.get(done["context_url"])).json()
    assert page == {
        "resource_id": resource_id,
        "version": 1,
        "record_count": 3,
        "records": expected,
        "next_cursor": None,
    }
    assert list(page["records"]) == sorted(expected)


async def test_a_large_context_is_not_inline_and_pages_completely_in_path_order(
    api: httpx.AsyncClient, worker: Worker, resource_id: str
) -> None:
    info = _large_info()
    expected = _flat(info)
    assert len(expected) > INLINE

    done = await _created(api, resource_id, info)
    records, pages = await read_context(api, resource_id, limit=700)

    assert done["context"] is None
    assert done["context_records"] == len(expected)
    assert done["context_url"] == f"/resources/{resource_id}/context"
    assert records == expected
    assert list(records) == sorted(expected), "pages follow each other in path order"
    assert [len(page["records"]) for page in pages] == [700] * 4 + [200]
    assert {(page["version"], page["record_count"]) for page in pages} == {(1, len(expected))}
    default = (await api.get(f"/resources/{resource_id}/context")).json()
    assert list(default["records"]) == sorted(expected)[:1_000]


async def test_prefix_and_fields_select_records(
    api: httpx.AsyncClient, worker: Worker, resource_id: str
) -> None:
    info = _large_info()
    expected = _flat(info)
    await _created(api, resource_id, info)

    group_b, _ = await read_context(api, resource_id, prefix="group_b.", limit=300)
    chosen = await api.get(
        f"/resources/{resource_id}/context",
        params={"fields": "group_c.f0007,group_a.f0999,group_a.nothing,group_b.f0000"},
    )
    nothing = await api.get(f"/resources/{resource_id}/context", params={"prefix": "zzz"})
    chosen_in_b = await api.get(
        f"/resources/{resource_id}/context",
        params={"fields": "group_c.f0007,group_b.f0001", "prefix": "group_b."},
    )

    assert group_b == {path: v for path, v in expected.items() if path.startswith("group_b.")}
    assert len(group_b) == 1_000
    assert chosen.status_code == 200, chosen.text
    assert list(chosen.json()["records"].items()) == [
        ("group_a.f0999", "value 0 999"),
        ("group_b.f0000", "value 1 0"),
        ("group_c.f0007", "value 2 7"),
    ]
    assert chosen.json()["next_cursor"] is None
    assert nothing.json()["records"] == {} and nothing.json()["next_cursor"] is None
    assert chosen_in_b.json()["records"] == {"group_b.f0001": "value 1 1"}


async def test_a_replaced_context_pages_anew_and_an_old_cursor_is_a_409(
    api: httpx.AsyncClient, worker: Worker, resource_id: str
) -> None:
    await _created(api, resource_id, _large_info(groups=2))
    first = (await api.get(f"/resources/{resource_id}/context", params={"limit": 10})).json()
    replaced = {"group_a": {f"f{n:04d}": f"new {n}" for n in range(1_500)}}
    await _created(api, resource_id, replaced)

    stale = await api.get(
        f"/resources/{resource_id}/context", params={"cursor": first["next_cursor"]}
    )
    records, pages = await read_context(api, resource_id, limit=400)

    problem = _assert_problem(stale, 409, "context-changed")
    assert "version 2" in problem["detail"]
    assert records == _flat(replaced), "nothing of the first context is left"
    assert {(page["version"], page["record_count"]) for page in pages} == {(2, 1_500)}


async def test_deleting_the_resource_deletes_its_context_chunks(
    api: httpx.AsyncClient,
    worker: Worker,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
) -> None:
    await _created(api, resource_id, _large_info())

    async def chunks() -> list[tuple[str, int]]:
        async with sessions() as session:
            rows = await session.execute(
                select(ResourceContextChunk.last_path, ResourceContextChunk.record_count)
                .where(ResourceContextChunk.resource_id == resource_id)
                .order_by(ResourceContextChunk.last_path)
            )
        return [(row.last_path, row.record_count) for row in rows]

    before = await chunks()
    deleted = await api.delete(f"/resources/{resource_id}")

    assert before == [("group_a.f0999", 1_000), ("group_b.f0999", 1_000), ("group_c.f0999", 1_000)]
    assert deleted.status_code == 204
    assert await chunks() == []


async def test_pages_and_selections_match_a_model_of_the_context(
    api: httpx.AsyncClient, sessions: async_sessionmaker[AsyncSession], resource_id: str
) -> None:
    """Paths of many scripts, in UTF-8 byte order (Python's `str` order) across chunks."""
    rng = random.Random(20261201)
    alphabet = ["a", "b", "z", "A", "Z", "0", "9", ".", "_", "-", "é", "ß", "中", "😀", "~"]
    paths = {"".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(6_000)}
    context = {path: n for n, path in enumerate(sorted(paths, key=lambda _: rng.random()))}
    await _store_context(sessions, resource_id, context)
    in_order = sorted(context)

    for limit in (37, 999, 1_000, 1_001, 10_000):
        records, pages = await read_context(api, resource_id, limit=limit)
        assert list(records.items()) == [(path, context[path]) for path in in_order], limit
        assert len(pages) == -(-len(context) // limit)
    for prefix in ("a", "é", "中", "😀~", "zz", "a.b", "nothing"):
        records, _ = await read_context(api, resource_id, prefix=prefix, limit=250)
        assert list(records) == [path for path in in_order if path.startswith(prefix)], prefix
    chosen = [*rng.sample(in_order, 300), "missing", "a" * 7]
    records, pages = await read_context(api, resource_id, fields=",".join(chosen), limit=100)
    assert list(records) == sorted(set(chosen) & set(context))
    assert len(pages) == 3


async def _store_context(
    sessions: async_sessionmaker[AsyncSession], resource_id: str, records: dict[str, Any]
) -> None:
    """A resource and its context as a load stores them (in the worker's chunks), without
    an ETL."""
    now = datetime.now(UTC)
    async with sessions.begin() as session:
        session.add(
            Resource(id=resource_id, version=1, attributes={}, created_at=now, updated_at=now)
        )
        await session.flush()
        session.add(
            ResourceContext(
                resource_id=resource_id, version=1, loaded_at=now, record_count=len(records)
            )
        )
        await session.flush()
        chunks = chunks_of(records)
        session.add_all(
            ResourceContextChunk(
                resource_id=resource_id,
                last_path=last_path,
                record_count=count,
                records=orjson.loads(part),
            )
            for last_path, count, part in zip(
                chunks.last_paths, chunks.counts, chunks.records, strict=True
            )
        )


async def test_no_context_yet_and_no_resource_are_404s(
    api: httpx.AsyncClient, worker: Worker, enrichment: httpx.AsyncClient, resource_id: str
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})
    created = await api.put(f"/resources/{resource_id}", json={"info": {"email": "a@b.example"}})
    done = await wait_for_etl(api, resource_id, created.json()["version"])

    missing = await api.get(f"/resources/{resource_id}/context")
    unknown = await api.get(f"/resources/{resource_id}-unknown/context")

    assert done["etl"]["status"] == "failed"
    assert (done["context"], done["context_records"], done["context_url"]) == (None, None, None)
    _assert_problem(missing, 404, "context-not-found")
    _assert_problem(unknown, 404, "not-found")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("params", "status", "slug"),
    [
        ({"cursor": "not a cursor"}, 400, "invalid-cursor"),
        ({"cursor": _b64("r1")}, 400, "invalid-cursor"),  # a cursor of the resource list
        ({"cursor": _b64("1.2")}, 400, "invalid-cursor"),
        ({"cursor": _b64("1.2.")}, 400, "invalid-cursor"),
        ({"cursor": _b64("1.2.a\x00b")}, 400, "invalid-cursor"),
        ({"cursor": _b64(f"{2**40}.2.a")}, 400, "invalid-cursor"),
        ({"cursor": _b64(f"1.{10**18}.a")}, 400, "invalid-cursor"),
        ({"limit": 0}, 422, "validation"),
        ({"limit": 10_001}, 422, "validation"),
        ({"limit": "many"}, 422, "validation"),
        ({"prefix": "a\x00"}, 422, "validation"),
        ({"fields": ""}, 422, "validation"),
        ({"fields": "a,,b"}, 422, "validation"),
        ({"fields": "a\x00"}, 422, "validation"),
        ({"fields": ",".join(["a"] * 10_001)}, 422, "validation"),
    ],
    ids=lambda value: str(value)[:40],
)
async def test_bad_queries_are_problems(
    api: httpx.AsyncClient, resource_id: str, params: dict[str, Any], status: int, slug: str
) -> None:
    """Refused before anything is read: whether the resource exists or not."""
    response = await api.get(f"/resources/{resource_id}/context", params=params)

    _assert_problem(response, status, slug)


async def test_context_route_does_not_take_ids_or_other_methods(
    api: httpx.AsyncClient, resource_id: str
) -> None:
    put = await api.put(f"/resources/{resource_id}/context", json={})
    invalid = await api.get("/resources/a%20b/context")

    _assert_problem(put, 422, "invalid-id")  # the resource route's, with id `…/context`
    _assert_problem(invalid, 422, "invalid-id")
