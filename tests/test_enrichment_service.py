"""Tests for the local enrichment service (enrichment_service): answers, faults, counters."""

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from enrichment_service.__main__ import parse_args
from enrichment_service.app import FaultConfig, create_app, release_hangs
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parent.parent
PROBLEM = "application/problem+json"


def item(kind: str, value: Any, key: str = "k") -> dict[str, Any]:
    return {"key": key, "kind": kind, "value": value}


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://enrich.test")


@pytest.fixture
def app() -> FastAPI:
    return create_app(test_mode=True)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client


async def enrich(client: httpx.AsyncClient, *items: dict[str, Any], **kw: Any) -> httpx.Response:
    return await client.post("/v1/enrich", json={"items": list(items)}, **kw)


async def until(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Wait until `check()` is true (`tests.helpers.eventually`, every 20 ms)."""

    async def probe() -> bool | None:
        return True if await check() else None

    await eventually(probe, "the condition", within, every=0.02)


# --- answers ------------------------------------------------------------------------------------


async def test_answers_every_kind_in_request_order(client: httpx.AsyncClient) -> None:
    response = await enrich(
        client,
        item("country_code", "FR", "address.country"),
        item("country_code", " jp ", "origin"),
        item("email", "Ada@GMail.COM", "contact.email"),
        item("email", "ops@Example.org", "ops"),
        item("currency_code", "eur", "price.currency"),
        item("country_code", "XX", "unknown.country"),
        item("currency_code", "ABC", "unknown.currency"),
        item("email", "not-an-email", "bad.email"),
    )
    assert response.status_code == 200
    assert response.json() == {
        "results": [
            {
                "key": "address.country",
                "found": True,
                "fields": {"country_name": "France", "region": "Europe"},
            },
            {"key": "origin", "found": True, "fields": {"country_name": "Japan", "region": "Asia"}},
            {
                "key": "contact.email",
                "found": True,
                "fields": {"domain": "gmail.com", "is_free_provider": True},
            },
            {
                "key": "ops",
                "found": True,
                "fields": {"domain": "example.org", "is_free_provider": False},
            },
            {"key": "price.currency", "found": True, "fields": {"currency_name": "Euro"}},
            {"key": "unknown.country", "found": False, "fields": {}},
            {"key": "unknown.currency", "found": False, "fields": {}},
            {"key": "bad.email", "found": False, "fields": {}},
        ]
    }


async def test_accepts_500_items(client: httpx.AsyncClient) -> None:
    response = await enrich(client, *[item("currency_code", "USD", f"k{i}") for i in range(500)])
    assert response.status_code == 200
    assert len(response.json()["results"]) == 500


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"items": [item("phone", "+33")]}, 422, "items[0].kind"),
        ({"items": [item("email", 42)]}, 422, "items[0].value: Input should be a valid string"),
        ({"items": []}, 422, "at least 1 item"),
        ({}, 422, "items: Field required"),
        ({"items": [item("email", "a@b.c")] * 501}, 422, "at most 500 items"),
        ({"items": [item("email", "a@b.c") | {"extra": 1}]}, 422, "items[0].extra"),
        ([1, 2], 422, "body: Input should be"),
        (b'{"items": [', 400, "not JSON"),
        (b"\xff", 400, "not JSON"),
    ],
    ids=["unknown-kind", "value-not-string", "no-items", "missing-items", "501-items", "extra",
         "not-object", "malformed", "not-utf8"],
)  # fmt: skip
async def test_rejects_invalid_requests(
    client: httpx.AsyncClient, body: Any, status: int, detail: str
) -> None:
    if isinstance(body, bytes):
        response = await client.post("/v1/enrich", content=body)
    else:
        response = await client.post("/v1/enrich", json=body)
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status
    assert problem["type"].startswith("urn:upsertflow:enrichment:")
    assert problem["title"]
    assert detail in problem["detail"]


async def test_unknown_paths_are_problems(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/enrich")
    assert (response.status_code, response.headers["content-type"]) == (404, PROBLEM)


# --- faults -------------------------------------------------------------------------------------


async def test_fault_settings_can_be_read_replaced_and_reset(client: httpx.AsyncClient) -> None:
    none = {
        "latency_ms": 0,
        "error_rate": 0.0,
        "error_status": 503,
        "hang": False,
        "fail_next": 0,
        "seed": 0,
        "forget": False,
    }
    assert (await client.get("/_faults")).json() == none

    response = await client.put("/_faults", json={"error_rate": 0.25, "seed": 7})
    assert response.status_code == 200
    assert response.json() == none | {"error_rate": 0.25, "seed": 7}
    response = await client.put("/_faults", json={"fail_next": 1})  # PUT replaces everything
    assert (await client.get("/_faults")).json() == none | {"fail_next": 1}

    response = await client.put("/_faults", json={"error_rate": 2, "latency_ms": "5"})
    assert (response.status_code, response.headers["content-type"]) == (422, PROBLEM)
    assert "error_rate" in response.json()["detail"]
    assert "latency_ms" in response.json()["detail"]
    assert (await client.get("/_faults")).json() == none | {"fail_next": 1}

    assert (await client.delete("/_faults")).json() == none
    assert (await client.get("/_faults")).json() == none


async def test_fail_next_fails_the_next_requests(client: httpx.AsyncClient) -> None:
    await client.put("/_faults", json={"fail_next": 2, "error_status": 500})
    statuses = [(await enrich(client, item("email", "a@b.c"))).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert (await client.get("/_faults")).json()["fail_next"] == 0

    await client.put("/_faults", json={"fail_next": 1})
    response = await enrich(client, item("email", "a@b.c"))
    assert (response.status_code, response.headers["retry-after"]) == (503, "1")
    assert response.headers["content-type"] == PROBLEM
    assert "fail_next" in response.json()["detail"]


async def test_fault_status_header(client: httpx.AsyncClient) -> None:
    for status in (429, 503):
        response = await enrich(
            client, item("email", "a@b.c"), headers={"X-Fault-Status": str(status)}
        )
        assert (response.status_code, response.headers["retry-after"]) == (status, "1")
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["status"] == status
    response = await enrich(client, item("email", "a@b.c"), headers={"X-Fault-Status": "500"})
    assert response.status_code == 500
    assert "retry-after" not in response.headers

    for header, value in [
        ("X-Fault-Status", "200"),
        ("X-Fault-Status", "soon"),
        ("X-Fault-Latency-Ms", "-1"),
        ("X-Fault-Hang", "maybe"),
    ]:
        response = await enrich(client, item("email", "a@b.c"), headers={header: value})
        assert (response.status_code, response.headers["content-type"]) == (400, PROBLEM)
        assert header in response.json()["detail"]


async def test_latency(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await enrich(client, item("email", "a@b.c"), headers={"X-Fault-Latency-Ms": "100"})
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.1

    await client.put("/_faults", json={"latency_ms": 50})
    started = time.monotonic()
    assert (await enrich(client, item("email", "a@b.c"))).status_code == 200
    assert time.monotonic() - started >= 0.05


async def error_statuses(client: httpx.AsyncClient, n: int = 200) -> list[int]:
    return [(await enrich(client, item("email", "a@b.c"))).status_code for _ in range(n)]


async def test_forget_answers_every_value_as_unknown(client: httpx.AsyncClient) -> None:
    item = {"key": "c", "kind": "country_code", "value": "FR"}
    await client.put("/_faults", json={"forget": True})
    forgotten = await client.post("/v1/enrich", json={"items": [item]})
    await client.delete("/_faults")
    known = await client.post("/v1/enrich", json={"items": [item]})

    assert forgotten.json()["results"] == [{"key": "c", "found": False, "fields": {}}]
    assert known.json()["results"][0]["fields"]["country_name"] == "France"


async def test_error_rate_is_deterministic_for_a_seed(client: httpx.AsyncClient) -> None:
    await client.put("/_faults", json={"error_rate": 0.5, "seed": 1})
    first = await error_statuses(client)
    assert set(first) == {200, 503}
    assert 70 <= first.count(503) <= 130

    await client.put("/_faults", json={"error_rate": 0.5, "seed": 1})
    assert await error_statuses(client) == first

    async with client_for(create_app(FaultConfig(error_rate=0.5, seed=1), test_mode=True)) as other:
        assert await error_statuses(other) == first

    await client.put("/_faults", json={"error_rate": 0.5, "seed": 2})
    assert await error_statuses(client) != first


async def test_hang_ends_when_the_client_gives_up(client: httpx.AsyncClient) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await enrich(client, item("email", "a@b.c"), headers={"X-Fault-Hang": "1"})
    stats = (await client.get("/_stats")).json()
    assert (stats["requests"], stats["faults"], stats["in_flight"]) == (1, 1, 0)


async def test_hang_is_released_at_shutdown(app: FastAPI, client: httpx.AsyncClient) -> None:
    await client.put("/_faults", json={"hang": True})
    hanging = asyncio.create_task(enrich(client, item("email", "a@b.c")))
    await until(async_stat(client, "in_flight", 1))
    assert not hanging.done()

    second = asyncio.create_task(enrich(client, item("email", "a@b.c")))
    await until(async_stat(client, "in_flight", 2))
    await client.delete("/_stats")  # the two in flight are still counted

    release_hangs(app)
    responses = await asyncio.wait_for(asyncio.gather(hanging, second), 5)
    for response in responses:
        assert (response.status_code, response.headers["retry-after"]) == (503, "1")
    stats = (await client.get("/_stats")).json()
    assert (stats["in_flight"], stats["peak_in_flight"]) == (0, 2)


def async_stat(client: httpx.AsyncClient, name: str, value: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool((await client.get("/_stats")).json()[name] == value)

    return check


async def test_apps_do_not_share_state(client: httpx.AsyncClient) -> None:
    await client.put("/_faults", json={"fail_next": 5})
    async with client_for(create_app(test_mode=True)) as other:
        assert (await enrich(other, item("email", "a@b.c"))).status_code == 200
        assert (await other.get("/_faults")).json()["fail_next"] == 0
    assert (await client.get("/_stats")).json()["requests"] == 0


# --- stats --------------------------------------------------------------------------------------


async def test_stats_count_requests_items_faults_and_values(client: httpx.AsyncClient) -> None:
    await enrich(client, item("country_code", "FR", "a"), item("email", "a@b.c", "b"))
    await enrich(client, item("country_code", "FR", "a"))
    await enrich(client, item("country_code", "DE", "a"), headers={"X-Fault-Status": "503"})
    await enrich(client, item("kind?", "FR"))
    assert (await client.get("/_stats")).json() == {
        "requests": 4,
        "items": 3,
        "faults": 1,
        "in_flight": 0,
        "peak_in_flight": 1,
        "by_status": {"200": 2, "503": 1, "422": 1},
        "by_key": {"FR": 2, "a@b.c": 1},
    }
    await client.get("/healthz")
    await client.get("/_faults")
    assert (await client.get("/_stats")).json()["requests"] == 4

    empty = {
        "requests": 0,
        "items": 0,
        "faults": 0,
        "in_flight": 0,
        "peak_in_flight": 0,
        "by_status": {},
        "by_key": {},
    }
    assert (await client.delete("/_stats")).json() == empty
    assert (await client.get("/_stats")).json() == empty


# --- without test mode --------------------------------------------------------------------------


async def test_without_test_mode_no_caller_can_inject_faults_or_read_counters() -> None:
    async with client_for(create_app()) as client:
        for method in ("GET", "PUT", "DELETE"):
            response = await client.request(method, "/_faults", json={"fail_next": 5})
            assert response.status_code == 404, (method, response.text)
        for method in ("GET", "DELETE"):
            assert (await client.request(method, "/_stats")).status_code == 404
        faulty = {"X-Fault-Status": "503", "X-Fault-Latency-Ms": "5000", "X-Fault-Hang": "1"}
        response = await enrich(client, item("country_code", "FR"), headers=faulty, timeout=2)
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["fields"]["country_name"] == "France"


async def test_faults_given_at_start_apply_without_test_mode() -> None:
    async with client_for(create_app(FaultConfig(fail_next=1, error_status=500))) as client:
        assert (await enrich(client, item("country_code", "FR"))).status_code == 500
        assert (await enrich(client, item("country_code", "FR"))).status_code == 200


# --- command line -------------------------------------------------------------------------------


def test_command_line_reads_flags_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse_args([])
    assert (args.host, args.port, args.faults) == ("127.0.0.1", 8300, FaultConfig())
    assert args.test_mode is False
    assert parse_args(["--test-mode"]).test_mode is True
    monkeypatch.setenv("ENRICHMENT_TEST_MODE", "1")
    assert parse_args([]).test_mode is True

    monkeypatch.setenv("ENRICHMENT_PORT", "9000")
    monkeypatch.setenv("ENRICHMENT_ERROR_RATE", "0.2")
    monkeypatch.setenv("ENRICHMENT_SEED", "3")
    args = parse_args(["--port", "9001", "--latency-ms", "20", "--error-status", "500"])
    assert args.port == 9001
    assert args.faults == FaultConfig(latency_ms=20, error_rate=0.2, error_status=500, seed=3)

    for argv in (["--error-rate", "1.5"], ["--error-status", "200"], ["--port", "x"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


# --- the real server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_real_server_over_http(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "enrichment.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "enrichment_service", "--port", str(port), "--test-mode",
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    hanging: asyncio.Task[httpx.Response] | None = None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            async def healthy() -> bool:
                assert proc.returncode is None, log.read_text()
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await until(healthy, within=10)

            response = await enrich(client, item("country_code", "de", "country"))
            assert response.status_code == 200
            assert response.json()["results"][0]["fields"]["country_name"] == "Germany"

            with pytest.raises(httpx.ReadTimeout):
                await enrich(
                    client, item("email", "a@b.c"), headers={"X-Fault-Hang": "1"}, timeout=0.5
                )
            # The server notices that the client went away, and stops hanging.
            await until(async_stat(client, "in_flight", 0))

            # A hanging request does not hold the shutdown back: it is answered with a 503.
            hanging = asyncio.create_task(
                enrich(client, item("email", "a@b.c"), headers={"X-Fault-Hang": "1"})
            )
            await until(async_stat(client, "in_flight", 1))
            proc.terminate()
            assert (await asyncio.wait_for(hanging, 5)).status_code == 503
            returncode = await asyncio.wait_for(proc.wait(), 5)
            assert returncode in (0, -signal.SIGTERM), log.read_text()
    finally:
        if hanging is not None and not hanging.done():
            hanging.cancel()
            await asyncio.gather(hanging, return_exceptions=True)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
