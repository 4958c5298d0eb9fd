"""Record `UpsertWorkflow` histories of real runs for the replay tests: `make record-histories`.

Each scenario runs on the suite's real components (PostgreSQL, the Temporal dev
server, the enrichment service, the project's worker) and writes the history of
its workflow next to this file. Record afresh only when the change to workflow
code is meant to break old histories, which running workflows would not survive;
otherwise keep the old histories and guard the change with `workflow.patched()`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from tests.helpers import TERMINAL, wait_for_etl
from workflows.upsert import UpsertWorkflow

HERE = Path(__file__).parent


async def _save(client: Client, workflow_id: str, name: str) -> None:
    handle = client.get_workflow_handle_for(UpsertWorkflow.run, workflow_id)
    history = await handle.fetch_history()
    (HERE / f"{name}.json").write_text(history.to_json())


async def test_record_succeeded(
    api: httpx.AsyncClient, worker: Worker, client: Client, resource_id: str
) -> None:
    created = await api.put(
        f"/resources/{resource_id}",
        json={"info": {"Contact": {"Email": "a@example.org", "Country": "FR"}, "Age": "42"}},
    )
    await wait_for_etl(api, resource_id, version=1)
    await _save(client, created.json()["etl"]["workflow_id"], "succeeded")


async def test_record_succeeded_after_retries(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 2, "error_status": 503})
    created = await api.put(f"/resources/{resource_id}", json={"info": {"country": "DE"}})
    await wait_for_etl(api, resource_id, version=1)
    await _save(client, created.json()["etl"]["workflow_id"], "succeeded_after_retries")


async def test_record_failed_then_retried(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    await enrichment.put("/_faults", json={"fail_next": 1, "error_status": 400})
    created = await api.put(f"/resources/{resource_id}", json={"info": {"country": "IT"}})
    await wait_for_etl(api, resource_id, version=1)
    await _save(client, created.json()["etl"]["workflow_id"], "failed")
    retry = await api.post(f"/resources/{resource_id}/etl/retry")
    retry_id = retry.json()["workflow_id"]
    await client.get_workflow_handle_for(UpsertWorkflow.run, retry_id).result()
    await _save(client, retry_id, "retried")


async def test_record_superseded(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    await enrichment.put("/_faults", json={"latency_ms": 1000})
    first = await api.put(f"/resources/{resource_id}", json={"info": {"country": "ES"}})
    await api.put(f"/resources/{resource_id}", json={"info": {"country": "PT"}})
    await wait_for_etl(api, resource_id, version=2)
    handle = client.get_workflow_handle_for(UpsertWorkflow.run, first.json()["etl"]["workflow_id"])
    assert (await handle.result()).status in TERMINAL
    await _save(client, handle.id, "superseded")


async def test_record_cancelled(
    api: httpx.AsyncClient,
    worker: Worker,
    client: Client,
    enrichment: httpx.AsyncClient,
    resource_id: str,
) -> None:
    await enrichment.put("/_faults", json={"latency_ms": 2000})
    created = await api.put(f"/resources/{resource_id}", json={"info": {"country": "NL"}})
    await asyncio.sleep(0.5)
    assert (await api.delete(f"/resources/{resource_id}")).status_code == 204
    await _save(client, created.json()["etl"]["workflow_id"], "cancelled")
