"""No payload data in logs, failures, histories or problems; one log line per event.

A record value (`SECRET`, `SECRET_NAME`) must never reach the worker's log, an
activity failure, the Temporal history or `GET /resources/{id}/etl`; a failed
attempt is one log line; every API error is problem+json.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http import HTTPStatus
from typing import Any

import httpx
import pytest
from fastapi import Depends
from google.protobuf.message import Message
from prometheus_client import REGISTRY
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as sqlalchemy_async_engine
from temporalio import activity
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)

from activities.enrich import (
    MAX_RETRY_AFTER,
    EnrichActivities,
    _failure,
    declared_backoff,
    retry_delay,
)
from activities.interceptor import AttemptInterceptor
from api.main import create_app
from devstack import REPO_ROOT, free_port, stop_process, wait_for_port
from tests.conftest import SIGNING_KEY
from tests.helpers import api_client, auth_headers, wait_for_etl
from upsertflow.db import create_engine
from upsertflow.logs import (
    ERROR_TEXT_LIMIT,
    TRUNCATION_MARKER,
    bounded,
    build_formatter,
    describe_exception,
)
from upsertflow.settings import Auth, Enrichment, Settings
from upsertflow.store.steps import StepStore
from worker import build_worker, enrichment_client
from workflows.pipeline import PIPELINE

SECRET = "secret.person@example.com"
SECRET_NAME = "Jane Secretname"
#: What a database error's text must not bring along.
SQL_MARKERS = ("[SQL", "[parameters", "SELECT CAST", "invalid input syntax")

PERSON = {
    "attributes": {"name": SECRET_NAME},
    "info": {"contact": {"email": SECRET, "name": SECRET_NAME, "country": "FR"}},
}


_ENRICH_STEP = next(step for step in PIPELINE if step.name == "enrich")


# --- capturing what the process logs -------------------------------------------------


@dataclass
class Captured:
    """Every log record of the process, rendered as text and as JSON lines by our formatter."""

    text: io.StringIO
    json: io.StringIO

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.json.getvalue().splitlines() if line.strip()]

    def everything(self) -> str:
        return self.text.getvalue() + self.json.getvalue()


@pytest.fixture
def logs() -> Iterator[Captured]:
    captured = Captured(io.StringIO(), io.StringIO())
    handlers = []
    for log_format, stream in (("text", captured.text), ("json", captured.json)):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(build_formatter(log_format))
        handlers.append(handler)
    root = logging.getLogger()
    level = root.level
    # As `configure_logging` sets it: the tests' own HTTP clients log their URLs.
    httpx_logger = logging.getLogger("httpx")
    httpx_level = httpx_logger.level
    httpx_logger.setLevel(logging.WARNING)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield captured
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(level)
        httpx_logger.setLevel(httpx_level)


def _assert_one_line_per_record(captured: Captured) -> None:
    """The text rendering has exactly as many lines as there were records (JSON lines)."""
    assert len(captured.text.getvalue().splitlines()) == len(captured.lines())


async def _history_bytes(client: Client, workflow_id: str) -> bytes:
    """The workflow's whole history as serialized protobuf, with every payload also decoded
    (payloads and failure messages are encrypted: this is what someone with the keys reads,
    so what must hold no values)."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    payloads = [payload for event in history.events for payload in _payloads(event)]
    codec = client.data_converter.payload_codec
    decoded = await codec.decode(payloads) if codec is not None else payloads
    return b"".join(
        [*(event.SerializeToString() for event in history.events), *(p.data for p in decoded)]
    )


def _payloads(message: Message) -> Iterator[Payload]:
    """Every `Payload` in a protobuf message, at any depth."""
    if isinstance(message, Payload):
        yield message
        return
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if isinstance(value, Message):
            values = [value]
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            values = value.values()
        else:  # repeated
            values = value
        for item in values:
            if isinstance(item, Message):
                yield from _payloads(item)


# --- (a) failed activity attempts: one bounded line each, no values --------------------


async def test_failed_attempts_log_one_line_each_without_record_values(
    api: httpx.AsyncClient,
    worker: Worker,
    enrichment: httpx.AsyncClient,
    resource_id: str,
    logs: Captured,
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 2, "error_status": 503})

    await api.put(f"/resources/{resource_id}", json=PERSON)
    done = await wait_for_etl(api, resource_id, version=1, within=60)

    assert done["etl"]["status"] == "succeeded"
    lines = logs.lines()
    failures = [line for line in lines if line["event"].startswith("Completing activity as failed")]
    assert [line["attempt"] for line in failures] == [1, 2]
    for line in failures:
        assert line["error_type"] == "EnrichmentUnavailable"
        assert line["error"].startswith("the enrichment service answered 503")
        assert "exc_info" not in line and "exception" not in line
        assert len(json.dumps(line)) < 2000
    # At most a few lines per failed attempt: the SDK's "Completing activity as failed".
    for attempt in (1, 2):
        of_attempt = [
            line
            for line in lines
            if line.get("attempt") == attempt
            and "enrich" in (line.get("activity"), line.get("activity_type"))
        ]
        assert 1 <= len(of_attempt) <= 2, of_attempt
    _assert_one_line_per_record(logs)
    assert "Traceback" not in logs.everything()
    assert SECRET not in logs.everything()
    assert SECRET_NAME not in logs.everything()


async def test_a_rejected_enrichment_fails_at_once_without_values(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    enrichment: httpx.AsyncClient,
    resource_id: str,
    logs: Captured,
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})

    await api.put(f"/resources/{resource_id}", json=PERSON)
    done = await wait_for_etl(api, resource_id, version=1, within=60)
    etl = (await api.get(f"/resources/{resource_id}/etl")).json()

    assert done["etl"]["status"] == "failed"
    enrich = next(step for step in etl["steps"] if step["name"] == "enrich")
    assert enrich["attempts"] == 1
    assert "400 Bad Request" in enrich["error"] and "not retried" in enrich["error"]
    assert len(enrich["error"]) <= ERROR_TEXT_LIMIT + 40
    assert SECRET not in json.dumps(etl) and SECRET_NAME not in json.dumps(etl)
    history = await _history_bytes(client, etl["workflow_id"])
    assert b"400 Bad Request" in history
    assert SECRET.encode() not in history and SECRET_NAME.encode() not in history
    failures = [line for line in logs.lines() if "Completing activity as failed" in line["event"]]
    assert len(failures) == 1
    assert failures[0]["error_type"] == "EnrichmentRejected"
    assert SECRET not in logs.everything() and SECRET_NAME not in logs.everything()


def test_a_logged_exception_renders_neither_traceback_nor_locals() -> None:
    def fail(email: str) -> None:
        raise ValueError(f"first line\n{email} on the second line")

    try:
        fail(SECRET)
    except ValueError as error:
        record = logging.LogRecord(
            "temporalio.activity",
            logging.WARNING,
            __file__,
            1,
            "failed",
            None,
            (type(error), error, error.__traceback__),
        )
    for log_format in ("text", "json"):
        quiet = build_formatter(log_format).format(record)
        assert quiet.count("\n") == 0, quiet
        assert "ValueError" in quiet and "first line" in quiet
        assert SECRET not in quiet and "Traceback" not in quiet
        # With the level at DEBUG: a plain traceback, still without the locals.
        debug = build_formatter(log_format, tracebacks=True).format(record)
        assert "Traceback" in debug
        assert SECRET not in debug.split("Traceback", 1)[1].split("ValueError: first line")[0]
        assert "╭" not in debug and f"email = '{SECRET}'" not in debug  # rich's locals


def test_bounded_text() -> None:
    assert bounded("a\nb") == "a"
    assert bounded("\n  \nsecond") == "second"
    assert bounded("a\nb", first_line=False) == "a b"
    assert bounded("tab\there\x00") == "tab here?"
    long = bounded("x" * 10_000)
    assert len(long) == ERROR_TEXT_LIMIT and long.endswith(TRUNCATION_MARKER)
    assert bounded("postgresql+asyncpg://user:hunter2@db/x") == "postgresql+asyncpg://user:***@db/x"


# --- (b) database errors: class and SQLSTATE only, in failures, histories, /etl --------


@pytest.fixture
async def leaky_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine built the way ours was before: bound parameters shown in its errors."""
    engine = sqlalchemy_async_engine(database_url)
    yield engine
    await engine.dispose()


async def _refused_value(engine: AsyncEngine) -> DBAPIError:
    """A real PostgreSQL error whose text quotes the value, the SQL and its parameters."""
    async with engine.connect() as connection:
        try:
            # PostgreSQL's message quotes the value: `invalid input syntax for type integer: "…"`
            await connection.execute(
                text("SELECT CAST(CAST(:value AS text) AS integer)"), {"value": SECRET}
            )
        except DBAPIError as error:
            return error
    raise AssertionError("PostgreSQL accepted the value")


async def test_our_engine_hides_parameters(database_url: str) -> None:
    engine = create_engine(Settings(database_url=database_url))
    try:
        error = await _refused_value(engine)
    finally:
        await engine.dispose()
    assert engine.sync_engine.hide_parameters
    assert "SQL parameters hidden" in str(error)


async def test_a_database_error_is_described_by_class_and_sqlstate(
    leaky_engine: AsyncEngine,
) -> None:
    error = await _refused_value(leaky_engine)
    assert SECRET in str(error)  # what would have leaked

    error_type, message = describe_exception(error)

    assert error_type == "DBAPIError"
    assert message == (
        "DBAPIError (asyncpg InvalidTextRepresentationError, SQLSTATE 22P02: data exception)"
    )


class _NextRaises(ActivityInboundInterceptor):
    """The rest of an activity's interceptor chain: raises the given exception."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        raise self.error


async def _through_interceptor(error: BaseException, attempt: int = 1) -> ApplicationError:
    """The failure the `AttemptInterceptor` makes of an exception leaving an activity."""
    inbound = AttemptInterceptor().intercept_activity(_NextRaises(error))

    async def run() -> None:
        await inbound.execute_activity(
            ExecuteActivityInput(fn=run, args=[], executor=None, headers={})
        )

    environment = ActivityEnvironment()
    environment.info = replace(environment.info, attempt=attempt)
    with pytest.raises(ApplicationError) as raised:
        await environment.run(run)
    return raised.value


async def test_the_interceptor_bounds_failure_messages(leaky_engine: AsyncEngine) -> None:
    database = await _through_interceptor(await _refused_value(leaky_engine), attempt=3)
    assert database.type == "DBAPIError"
    assert database.message.startswith("DBAPIError (asyncpg InvalidTextRepresentationError")
    assert database.details[-1] == {"attempt": 3}
    assert database.__cause__ is None  # Temporal would serialize a cause's full text

    refused = await _refused_value(leaky_engine)
    ours = ApplicationError(
        f"PostgreSQL refused the resource's data: {refused.orig}",
        type="InvalidData",
        non_retryable=True,
    )
    ours.__cause__ = refused
    scrubbed = await _through_interceptor(ours)
    assert scrubbed.message == (
        "PostgreSQL refused the resource's data: DBAPIError (asyncpg "
        "InvalidTextRepresentationError, SQLSTATE 22P02: data exception)"
    )
    assert scrubbed.non_retryable and scrubbed.type == "InvalidData"

    unexpected = await _through_interceptor(KeyError(f"{'k' * 500}\n{SECRET}"))
    assert unexpected.type == "KeyError"
    assert len(unexpected.message) == ERROR_TEXT_LIMIT
    assert unexpected.message.endswith(TRUNCATION_MARKER) and SECRET not in unexpected.message

    long = await _through_interceptor(
        ApplicationError("y" * 5000, type="Ours", next_retry_delay=timedelta(seconds=7))
    )
    assert len(long.message) == ERROR_TEXT_LIMIT
    assert long.type == "Ours" and long.next_retry_delay == timedelta(seconds=7)


class _RefuseLoad(Interceptor):
    """Makes the `load` activity hit a real database error quoting a record value:
    raised as is on attempt 1, wrapped in our own non-retryable failure on attempt 2."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        engine = self.engine

        class Inbound(ActivityInboundInterceptor):
            async def execute_activity(self, input: ExecuteActivityInput) -> Any:
                if activity.info().activity_type == "load":
                    error = await _refused_value(engine)
                    if activity.info().attempt == 1:
                        raise error
                    raise ApplicationError(
                        f"PostgreSQL refused the resource's data: {error.orig}",
                        type="InvalidData",
                        non_retryable=True,
                    ) from error
                return await super().execute_activity(input)

        return Inbound(next)


async def test_database_error_text_reaches_neither_history_nor_etl(
    api: httpx.AsyncClient,
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    enrichment: httpx.AsyncClient,
    leaky_engine: AsyncEngine,
    resource_id: str,
    logs: Captured,
) -> None:
    async with (
        enrichment_client(settings) as http,
        build_worker(client, settings, sessions, http, [_RefuseLoad(leaky_engine)]),
    ):
        await api.put(f"/resources/{resource_id}", json=PERSON)
        done = await wait_for_etl(api, resource_id, version=1, within=60)
    etl = (await api.get(f"/resources/{resource_id}/etl")).json()

    assert done["etl"]["status"] == "failed"
    load = next(step for step in etl["steps"] if step["name"] == "load")
    assert load["attempts"] == 2
    assert "SQLSTATE 22P02" in load["error"]
    history = await _history_bytes(client, etl["workflow_id"])
    assert b"SQLSTATE 22P02" in history
    for leaked in (SECRET, SECRET_NAME, *SQL_MARKERS):
        assert leaked not in json.dumps(etl), leaked
        assert leaked.encode() not in history, leaked
        assert leaked not in logs.everything(), leaked
    failures = [line for line in logs.lines() if "Completing activity as failed" in line["event"]]
    assert [line["error_type"] for line in failures] == ["DBAPIError", "InvalidData"]


# --- (c) whatever the enrichment service answers, a clear failure ----------------------

_BATCH = [{"key": "contact.email", "kind": "email", "value": SECRET}]
_ECHO = json.dumps({"detail": f"rejected {SECRET} ({SECRET_NAME})"})


def _answer(
    status: int, body: bytes | str, content_type: str = "application/json"
) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else body
    return httpx.Response(status, content=content, headers={"content-type": content_type})


_ERROR_BODIES: list[tuple[str, bytes | str, str]] = [
    (
        "problem",
        json.dumps({"title": "Invalid request", "detail": f"got {SECRET}"}),
        "application/problem+json",
    ),
    (
        "problem with a long title",
        json.dumps({"title": f"{SECRET} " * 20, "detail": "x"}),
        "application/problem+json",
    ),
    (
        "problem with a control character title",
        json.dumps({"title": "bad\nline\x07"}),
        "application/problem+json",
    ),
    ("object echoing values", _ECHO, "application/json"),
    ("array", json.dumps([SECRET, SECRET_NAME]), "application/json"),
    ("number", "42", "application/json"),
    ("string", json.dumps(SECRET), "application/json"),
    ("null", "null", "application/json"),
    ("title not a string", json.dumps({"title": [SECRET]}), "application/problem+json"),
    ("html", f"<html><body>{SECRET}</body></html>", "text/html"),
    ("empty", "", "application/json"),
    ("invalid json", "{" + SECRET, "application/json"),
    ("not utf-8", b"\xff\xfe\x00{" + SECRET.encode(), "application/json"),
    ("deeply nested", "[" * 100_000 + "]" * 100_000, "application/json"),
    ("large", json.dumps({"title": "t", "detail": SECRET * 100_000}), "application/problem+json"),
]


async def _call(answer: httpx.Response, attempt: int = 1) -> ApplicationError | dict[str, Any]:
    """What `_call` makes of one answer of the service: its fields, or its failure."""

    def handler(request: httpx.Request) -> httpx.Response:
        return answer

    environment = ActivityEnvironment()
    environment.info = replace(environment.info, attempt=attempt, retry_policy=_ENRICH_STEP.retry)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        activities = EnrichActivities(StepStore(None), http, Enrichment(url="http://enrich"))  # type: ignore[arg-type]
        try:
            result: dict[str, Any] = await environment.run(activities._call, _BATCH)
        except ApplicationError as error:
            return error
    return result


@pytest.mark.parametrize("status", [400, 404, 413, 422])
@pytest.mark.parametrize(("shape", "body", "content_type"), _ERROR_BODIES)
async def test_every_4xx_body_fails_at_once_with_a_bounded_message(
    status: int, shape: str, body: bytes | str, content_type: str
) -> None:
    failure = await _call(_answer(status, body, content_type))

    assert isinstance(failure, ApplicationError), shape
    assert failure.type == "EnrichmentRejected" and failure.non_retryable
    assert failure.message.startswith(f"the enrichment service rejected the request: {status}")
    assert len(failure.message) <= 250
    assert SECRET not in failure.message and SECRET_NAME not in failure.message
    assert "\n" not in failure.message and "\x07" not in failure.message
    if shape == "problem":
        assert '("Invalid request")' in failure.message


@pytest.mark.parametrize("status", [429, 500, 502, 503])
@pytest.mark.parametrize(("shape", "body", "content_type"), _ERROR_BODIES[:8])
async def test_retryable_answers_fail_the_attempt_with_a_bounded_message(
    status: int, shape: str, body: bytes | str, content_type: str
) -> None:
    failure = await _call(_answer(status, body, content_type))

    assert isinstance(failure, ApplicationError)
    assert failure.type == "EnrichmentUnavailable" and not failure.non_retryable
    assert failure.message.startswith(f"the enrichment service answered {status}")
    assert SECRET not in failure.message and len(failure.message) <= 250


_MALFORMED_2XX: list[tuple[str, bytes | str]] = [
    ("empty", ""),
    ("invalid json", "{"),
    ("html", "<html>ok</html>"),
    ("array", json.dumps([{"key": "contact.email"}])),
    ("no results", json.dumps({"items": []})),
    ("results not a list", json.dumps({"results": {"contact.email": {}}})),
    ("result not an object", json.dumps({"results": [SECRET]})),
    ("result without key", json.dumps({"results": [{"fields": {"domain": "x"}}]})),
    ("key not sent", json.dumps({"results": [{"key": SECRET, "fields": {}}]})),
    ("fields not an object", json.dumps({"results": [{"key": "contact.email", "fields": [1]}]})),
    ("nul in a value", json.dumps({"results": [{"key": "contact.email", "fields": {"d": "\0"}}]})),
    ("a nul in a name", json.dumps({"results": [{"key": "contact.email", "fields": {"\0": 1}}]})),
    (
        "a nul deep down",
        json.dumps({"results": [{"key": "contact.email", "fields": {"d": [{"e": ["\0"]}]}}]}),
    ),
]


@pytest.mark.parametrize(("shape", "body"), _MALFORMED_2XX)
async def test_a_malformed_2xx_is_a_retryable_failure(shape: str, body: bytes | str) -> None:
    failure = await _call(_answer(200, body))

    assert isinstance(failure, ApplicationError), shape
    assert failure.type == "EnrichmentBadAnswer" and not failure.non_retryable
    assert failure.message.startswith("the enrichment service answered 200 OK but ")
    assert SECRET not in failure.message


async def test_a_well_formed_answer_is_merged() -> None:
    body = {"results": [{"key": "contact.email", "found": True, "fields": {"domain": "ex.com"}}]}
    assert await _call(_answer(200, json.dumps(body))) == {"contact.email.domain": "ex.com"}
    not_found = {"results": [{"key": "contact.email", "found": False, "fields": None}]}
    assert await _call(_answer(200, json.dumps(not_found))) == {}
    # The text `\u0000` (a backslash, then "u0000") is no NUL.
    text = {"results": [{"key": "contact.email", "fields": {"note": "\\u0000"}}]}
    assert await _call(_answer(200, json.dumps(text))) == {"contact.email.note": "\\u0000"}


async def test_the_local_enrichment_services_422_is_classified(enrichment_url: str) -> None:
    """A real 4xx of the local service (an item it refuses), end to end through httpx."""
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{enrichment_url}/v1/enrich",
            json={"items": [{"key": "k", "kind": SECRET, "value": SECRET}]},
        )
    assert answer.status_code == 422 and SECRET in answer.text  # the service echoes values

    failure = _failure(answer)

    assert failure.non_retryable and failure.type == "EnrichmentRejected"
    assert failure.message == (
        f"the enrichment service rejected the request: 422 {HTTPStatus(422).phrase} "
        '("Invalid request"); not retried (the same request would be rejected again)'
    )


# --- (d) Retry-After against the declared backoff --------------------------------------

_ENRICH_RETRY = _ENRICH_STEP.retry


def test_the_enrich_step_declares_the_backoff_the_rule_is_tested_with() -> None:
    assert _ENRICH_RETRY.initial_interval == timedelta(seconds=1)
    assert _ENRICH_RETRY.backoff_coefficient == 2.0
    assert _ENRICH_RETRY.maximum_interval == timedelta(seconds=30)


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 30), (7, 30), (500, 30)]
)
def test_retry_after_1_never_beats_the_declared_backoff(attempt: int, expected: int) -> None:
    assert declared_backoff(_ENRICH_RETRY, attempt) == timedelta(seconds=expected)
    assert retry_delay("1", attempt, _ENRICH_RETRY) == timedelta(seconds=expected)


def test_a_longer_retry_after_is_honoured_up_to_the_cap() -> None:
    assert retry_delay("10", 1, _ENRICH_RETRY) == timedelta(seconds=10)
    assert retry_delay(" 120 ", 6, _ENRICH_RETRY) == timedelta(seconds=120)
    assert retry_delay("86400", 1, _ENRICH_RETRY) == MAX_RETRY_AFTER
    assert retry_delay("9" * 400, 1, _ENRICH_RETRY) == MAX_RETRY_AFTER
    now = datetime(2030, 1, 1, tzinfo=UTC)
    in_a_minute = format_datetime(now + timedelta(seconds=60), usegmt=True)
    assert retry_delay(in_a_minute, 1, _ENRICH_RETRY, now=now) == timedelta(seconds=60)
    past = format_datetime(now - timedelta(hours=1), usegmt=True)
    assert retry_delay(past, 3, _ENRICH_RETRY, now=now) == timedelta(seconds=4)


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5", "²", "Mon, 99 Foo 2030"])
def test_no_usable_retry_after_leaves_the_backoff_to_temporal(header: str | None) -> None:
    assert retry_delay(header, 3, _ENRICH_RETRY) is None


def test_backoff_without_a_policy_or_with_temporals_defaults() -> None:
    assert retry_delay("3", 9, None) == timedelta(seconds=3)
    assert declared_backoff(RetryPolicy(), 50) == timedelta(seconds=100)  # 100 × initial


def test_a_503_with_retry_after_1_waits_the_backoff_of_its_attempt() -> None:
    answer = httpx.Response(503, headers={"retry-after": "1"})
    failure = _failure(answer, attempt=3, policy=_ENRICH_RETRY)
    assert failure.next_retry_delay == timedelta(seconds=4)
    assert failure.message.endswith("next attempt in 4 s")
    assert _failure(httpx.Response(503)).next_retry_delay is None


# --- (e) the API: every error is problem+json, one log line each ------------------------


async def _explode() -> None:
    raise RuntimeError(f"the dependency broke\n{SECRET} was in the request")


@pytest.fixture
async def exploding_api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app, with routes failing in their body and in a dependency."""
    app = create_app(settings)

    async def in_body(payload: dict[str, Any]) -> None:
        raise ValueError("could not process the payload:\n" + json.dumps(payload))

    app.add_api_route("/test/explode", in_body, methods=["POST"])
    app.add_api_route("/test/explode-dependency", _explode_route, dependencies=[Depends(_explode)])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api", headers=auth_headers(settings)
        ) as http:
            yield http


async def _explode_route() -> dict[str, str]:
    return {"never": "answered"}


def _requests(route: str, status: str, method: str = "POST") -> float:
    labels = {"method": method, "route": route, "status": status}
    return REGISTRY.get_sample_value("upsertflow_http_requests_total", labels) or 0.0


async def test_an_unexpected_exception_is_a_500_problem_logged_once(
    exploding_api: httpx.AsyncClient, logs: Captured
) -> None:
    counted = _requests("/test/explode", "500")

    response = await exploding_api.post(
        "/test/explode?email=" + SECRET, json={"email": SECRET, "name": SECRET_NAME}
    )

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    cid = response.headers["x-correlation-id"]
    assert problem["type"] == "urn:upsertflow:problem:internal-error"
    assert problem["status"] == 500 and cid in problem["detail"]
    assert _requests("/test/explode", "500") == counted + 1
    errors = [line for line in logs.lines() if line["logger"] == "upsertflow.api.errors"]
    assert len(errors) == 1
    assert errors[0]["level"] == "error" and errors[0]["error_type"] == "ValueError"
    assert errors[0]["error"] == "could not process the payload:"
    assert errors[0]["correlation_id"] == cid
    assert not [line for line in logs.lines() if line["logger"].startswith("uvicorn")]
    access = [line for line in logs.lines() if line["logger"] == "upsertflow.api.access"]
    assert len(access) == 1 and access[0]["status"] == 500
    _assert_one_line_per_record(logs)
    assert SECRET not in logs.everything() and SECRET_NAME not in logs.everything()


async def test_a_failing_dependency_is_a_500_problem_too(
    exploding_api: httpx.AsyncClient, logs: Captured
) -> None:
    counted = _requests("/test/explode-dependency", "500", "GET")

    response = await exploding_api.get("/test/explode-dependency")

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-correlation-id"] in response.json()["detail"]
    assert _requests("/test/explode-dependency", "500", "GET") == counted + 1
    errors = [line for line in logs.lines() if line["logger"] == "upsertflow.api.errors"]
    assert [(line["error_type"], line["error"]) for line in errors] == [
        ("RuntimeError", "the dependency broke")
    ]
    assert SECRET not in logs.everything() and "Traceback" not in logs.everything()


@pytest.fixture
async def api_without_database(
    settings: Settings, temporal_address: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its database on a port where nothing listens."""
    down = settings.model_copy(
        update={
            "database_url": SecretStr(f"postgresql+asyncpg://u:hunter2@127.0.0.1:{free_port()}/db")
        }
    )
    async with api_client(down) as http:
        yield http


async def test_a_database_outage_is_a_503_problem_with_retry_after(
    api_without_database: httpx.AsyncClient, logs: Captured, resource_id: str
) -> None:
    for method, path in (
        ("GET", f"/resources/{resource_id}"),
        ("GET", f"/resources/{resource_id}/etl"),
        ("GET", "/resources"),
    ):
        response = await api_without_database.request(method, path)

        assert response.status_code == 503, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "5"
        problem = response.json()
        assert problem["type"] == "urn:upsertflow:problem:database-unavailable"
        assert response.headers["x-correlation-id"] in problem["detail"]
    warnings = [line for line in logs.lines() if line["logger"] == "upsertflow.api.errors"]
    assert len(warnings) == 3 and {line["level"] for line in warnings} == {"warning"}
    assert "hunter2" not in logs.everything()
    _assert_one_line_per_record(logs)


def test_the_served_api_logs_one_line_per_request_and_no_query_string() -> None:
    """The real `upsertflow-api` process: no uvicorn access line, ours without the query."""
    port, database_port = free_port(), free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql+asyncpg://u:hunter2@127.0.0.1:{database_port}/db",
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "UPSERTFLOW_API__PORT": str(port),
        "UPSERTFLOW_LOG_FORMAT": "json",
        "UPSERTFLOW_AUTH__SIGNING_KEY": SIGNING_KEY,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "api"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, 30, process)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz?email={SECRET}").status_code == 200
        token = auth_headers(Settings(auth=Auth(signing_key=SecretStr(SIGNING_KEY))))
        outage = httpx.get(f"{base}/resources/r1?email={SECRET}", headers=token)
        assert outage.status_code == 503 and outage.headers["retry-after"] == "5"
        time.sleep(0.5)
    finally:
        stop_process(process, 10)
    assert process.stdout is not None
    output = process.stdout.read().decode()
    process.stdout.close()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    requests = [
        line for line in lines if line["logger"] in ("uvicorn.access", "upsertflow.api.access")
    ]
    assert [(line["logger"], line["event"]) for line in requests] == [
        ("upsertflow.api.access", "GET /healthz 200"),
        ("upsertflow.api.access", "GET /resources/r1 503"),
    ]
    errors = [line for line in lines if line["logger"] == "upsertflow.api.errors"]
    assert len(errors) == 1 and errors[0]["error_type"] == "ConnectionRefusedError"
    assert SECRET not in output and "hunter2" not in output and "Traceback" not in output
