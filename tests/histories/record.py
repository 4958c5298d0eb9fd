"""Record `UpsertWorkflow` histories of real runs for the replay tests: `make record-histories`.

A recorder, not a test: `python -m tests.histories.record [--out DIR]`. It starts the
dev stack (`devstack.Stack`: PostgreSQL, the Temporal dev server, the enrichment
service, a worker and the API, each a process of its own), runs each scenario over
HTTP and writes the history of its workflow to DIR (next to this file by default).
Record afresh only when the change to workflow code is meant to break old histories,
which running workflows would not survive; otherwise keep the old histories and guard
the change with `workflow.patched()`.

The payloads are encrypted, as in production, with the test-only key in `codec-keys`
next to this file (never a real one: it is in the repository), which the replay tests
decrypt with. Histories recorded before encryption was on are kept: they replay too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client, WorkflowFailureError

from devstack import Stack, StackConfig
from tests.helpers import TERMINAL, wait_for_etl
from upsertflow import temporal
from workflows.upsert import UpsertWorkflow

HERE = Path(__file__).parent
#: The test-only key the recorded payloads are encrypted with.
CODEC_KEYS = HERE / "codec-keys"


class Recorder:
    """The API and the enrichment service's admin API over HTTP, Temporal to fetch histories."""

    def __init__(
        self, api: httpx.AsyncClient, enrichment: httpx.AsyncClient, client: Client, out: Path
    ) -> None:
        self.api = api
        self.enrichment = enrichment
        self.client = client
        self.out = out

    async def faults(self, **faults: Any) -> None:
        (await self.enrichment.delete("/_faults")).raise_for_status()
        if faults:
            (await self.enrichment.put("/_faults", json=faults)).raise_for_status()

    async def put(self, resource_id: str, info: dict[str, Any]) -> str:
        """Upsert; return the workflow id of its ETL."""
        response = await self.api.put(f"/resources/{resource_id}", json={"info": info})
        assert response.status_code in (200, 201), response.text
        workflow_id: str = response.json()["etl"]["workflow_id"]
        return workflow_id

    async def save(self, workflow_id: str, name: str) -> None:
        """Write the workflow's whole history, once it has closed, to `<name>.json`."""
        handle = self.client.get_workflow_handle_for(UpsertWorkflow.run, workflow_id)
        with contextlib.suppress(WorkflowFailureError):
            await handle.result()
        history = await handle.fetch_history()
        (self.out / f"{name}.json").write_text(history.to_json())
        print(f"recorded {name}.json ({workflow_id})")


async def succeeded(rec: Recorder) -> None:
    info = {"Contact": {"Email": "a@example.org", "Country": "FR"}, "Age": "42"}
    workflow_id = await rec.put("rec-succeeded", info)
    await wait_for_etl(rec.api, "rec-succeeded", version=1)
    await rec.save(workflow_id, "succeeded")


async def succeeded_after_retries(rec: Recorder) -> None:
    await rec.faults(fail_next=2, error_status=503)
    workflow_id = await rec.put("rec-retries", {"country": "DE"})
    await wait_for_etl(rec.api, "rec-retries", version=1)
    await rec.save(workflow_id, "succeeded_after_retries")


async def failed_then_retried(rec: Recorder) -> None:
    await rec.faults(fail_next=1, error_status=400)
    workflow_id = await rec.put("rec-failed", {"country": "IT"})
    await wait_for_etl(rec.api, "rec-failed", version=1)
    await rec.save(workflow_id, "failed")
    retry = await rec.api.post("/resources/rec-failed/etl/retry")
    await rec.save(retry.json()["workflow_id"], "retried")


async def superseded(rec: Recorder) -> None:
    await rec.faults(latency_ms=1000)
    first = await rec.put("rec-superseded", {"country": "ES"})
    await rec.put("rec-superseded", {"country": "PT"})
    await wait_for_etl(rec.api, "rec-superseded", version=2)
    handle = rec.client.get_workflow_handle_for(UpsertWorkflow.run, first)
    assert (await handle.result()).status in TERMINAL
    await rec.save(first, "superseded")


async def cancelled(rec: Recorder) -> None:
    await rec.faults(latency_ms=2000)
    workflow_id = await rec.put("rec-cancelled", {"country": "NL"})
    await asyncio.sleep(0.5)
    assert (await rec.api.delete("/resources/rec-cancelled")).status_code == 204
    await rec.save(workflow_id, "cancelled")


SCENARIOS: list[Callable[[Recorder], Awaitable[None]]] = [
    succeeded,
    succeeded_after_retries,
    failed_then_retried,
    superseded,
    cancelled,
]


async def record(stack: Stack, out: Path) -> None:
    client = await temporal.connect(
        env={"TEMPORAL_ADDRESS": stack.temporal_address}, codec=stack.codec
    )
    async with (
        httpx.AsyncClient(base_url=stack.api_url, timeout=30, headers=stack.auth_headers()) as api,
        httpx.AsyncClient(base_url=stack.enrichment_url, timeout=10) as enrichment,
    ):
        recorder = Recorder(api, enrichment, client, out)
        for scenario in SCENARIOS:
            await recorder.faults()
            await scenario(recorder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.histories.record", description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the histories")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with Stack(StackConfig(env={"UPSERTFLOW_CODEC__KEYS_FILE": str(CODEC_KEYS)})) as stack:
        asyncio.run(record(stack, args.out))


if __name__ == "__main__":
    main()
