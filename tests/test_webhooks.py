"""Completion webhooks: signed, retried until the receiver recovers, never holding up an ETL.

A real HTTP receiver on a local port (a stand-in for the user's service) answers as
each test scripts it; the API, the worker, the dev server and PostgreSQL are the real
ones of the suite.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ActivityError
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, signature
from tests.helpers import wait_for_etl
from upsertflow.naming import webhook_workflow_id
from upsertflow.settings import Settings, Webhooks

SECRET = "whsec-test-only-0123456789abcdef"


@dataclass
class Receiver:
    """What the receiver was sent, and how it answers: `answers` first, then 200s."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    received: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                status = state.answers.pop(0) if state.answers else 200
                state.received.append((status, dict(self.headers), body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/upsertflow"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def settings(settings: Settings, receiver: Receiver) -> Settings:
    """The suite's settings, with the webhook pointed at the receiver."""
    hooks = Webhooks(url=receiver.url, secret=SecretStr(SECRET))
    return settings.model_copy(update={"webhooks": hooks})


async def _status(client: Client, workflow_id: str) -> WorkflowExecutionStatus | None:
    try:
        return (await client.get_workflow_handle(workflow_id).describe()).status
    except RPCError:
        return None


async def _delivered(client: Client, workflow_id: str) -> Any:
    """The result of the delivery of the upsert's webhook, once its ETL has ended."""
    delivery = webhook_workflow_id(workflow_id)
    for _ in range(600):  # until the ETL has ended and started the delivery
        if await _status(client, delivery) is not None:
            break
        await asyncio.sleep(0.05)
    return await asyncio.wait_for(client.get_workflow_handle(delivery).result(), timeout=60)


async def test_a_failing_receiver_is_retried_until_it_recovers_without_holding_the_etl(
    api: httpx.AsyncClient, worker: Worker, client: Client, receiver: Receiver, resource_id: str
) -> None:
    receiver.answers = [503, 503]
    created = await api.put(f"/resources/{resource_id}", json={"info": {"Country": "FR"}})
    workflow_id = created.json()["etl"]["workflow_id"]
    done = await wait_for_etl(api, resource_id, 1)
    # The ETL ended and its workflow completed while the receiver was still failing.
    assert done["etl"]["status"] == "succeeded"
    for _ in range(100):
        if await _status(client, workflow_id) == WorkflowExecutionStatus.COMPLETED:
            break
        await asyncio.sleep(0.05)
    assert await _status(client, workflow_id) == WorkflowExecutionStatus.COMPLETED

    assert await _delivered(client, workflow_id) == 200

    assert [status for status, _, _ in receiver.received] == [503, 503, 200]
    bodies = {body for _, _, body in receiver.received}
    assert len(bodies) == 1, "every attempt sends the same event"
    _, headers, body = receiver.received[-1]
    event = json.loads(body)
    assert event == {
        "id": webhook_workflow_id(workflow_id),
        "type": "etl.ended",
        "resource_id": resource_id,
        "version": 1,
        "status": "succeeded",
        "error": None,
        "workflow_id": workflow_id,
        "ended_at": event["ended_at"],
    }
    assert headers[EVENT_ID_HEADER] == event["id"]
    timestamp = int(headers[SIGNATURE_HEADER].split(",")[0].removeprefix("t="))
    assert headers[SIGNATURE_HEADER] == signature(SECRET, timestamp, body)
    assert "FR" not in body.decode(), "no resource data in the event"


async def test_a_refusing_receiver_is_not_retried_and_the_etl_is_unaffected(
    api: httpx.AsyncClient, worker: Worker, client: Client, receiver: Receiver, resource_id: str
) -> None:
    receiver.answers = [410]
    created = await api.put(f"/resources/{resource_id}", json={"info": {"Country": "FR"}})
    workflow_id = created.json()["etl"]["workflow_id"]

    with pytest.raises(WorkflowFailureError) as failed:
        await _delivered(client, workflow_id)

    activity_error = failed.value.cause
    assert isinstance(activity_error, ActivityError)
    assert "refused the event with 410; not retried" in str(activity_error.cause)

    assert [status for status, _, _ in receiver.received] == [410]
    assert (await wait_for_etl(api, resource_id, 1))["etl"]["status"] == "succeeded"


async def test_a_failed_etl_is_notified_too(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    enrichment: httpx.AsyncClient,
    receiver: Receiver,
    resource_id: str,
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})
    created = await api.put(f"/resources/{resource_id}", json={"info": {"email": "a@b.example"}})
    workflow_id = created.json()["etl"]["workflow_id"]

    assert await _delivered(client, workflow_id) == 200

    event = json.loads(receiver.received[-1][2])
    assert event["status"] == "failed" and "enrich" in event["error"]
    assert "a@b.example" not in receiver.received[-1][2].decode()


def test_a_webhook_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="UPSERTFLOW_WEBHOOKS__SECRET"):
        Webhooks(url="https://hooks.example/upsertflow")
    with pytest.raises(ValueError):
        Webhooks(url="file:///etc/passwd", secret=SecretStr(SECRET))
