"""Scaled out on this machine: three worker processes and two API processes under load,
two workers SIGKILLed in the middle of it — nothing is lost, nothing applied twice.

The throughput of 1 to N workers is a benchmark (`make bench`, "Scale-out"); this is the
correctness half: whatever the workers killed were doing (a workflow task, `persist`, a
step with its checkpoint) is taken over by the one left, and every upsert ends with
exactly its version, its ETL succeeded and its context loaded once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from devstack import Stack, StackConfig
from tests.helpers import eventually, wait_for_etl

pytestmark = pytest.mark.e2e

UPSERTS = 100


async def test_killing_two_of_three_workers_mid_load_loses_nothing(
    database_url: str, temporal_address: str, enrichment_url: str
) -> None:
    config = StackConfig(
        database_url=database_url,
        temporal_address=temporal_address,
        enrichment_url=enrichment_url,
        workers=3,
        api_ports=(0, 0),
        env={
            "UPSERTFLOW_TASK_QUEUE": f"scale-{uuid.uuid4().hex}",
            # Activities of a killed worker are retried once their attempt times out:
            # keep that short, as a process manager restarting workers would.
            "UPSERTFLOW_WORKER__GRACEFUL_SHUTDOWN_SECONDS": "1",
            "UPSERTFLOW_RATE_LIMIT__WRITES_PER_SECOND": "0",
        },
        app_grace=10,
    )
    prefix = f"so-{uuid.uuid4().hex[:8]}-"
    ids = [f"{prefix}{n:04d}" for n in range(UPSERTS)]
    stack = Stack(config)
    try:
        stack.start()
        headers = stack.auth_headers()
        async with (
            httpx.AsyncClient(base_url=stack.api_urls[0], timeout=60, headers=headers) as one,
            httpx.AsyncClient(base_url=stack.api_urls[1], timeout=60, headers=headers) as two,
        ):
            apis = (one, two)
            limit = asyncio.Semaphore(20)

            async def upsert(n: int, resource_id: str) -> httpx.Response:
                async with limit:
                    return await apis[n % 2].put(
                        f"/resources/{resource_id}",
                        json={"info": {"Country": "FR", "Seq": str(n)}},
                        headers={"Prefer": "respond-async"},
                    )

            sending = asyncio.gather(*(upsert(n, rid) for n, rid in enumerate(ids)))
            # Mid-load: once some ETLs have succeeded and many are still to come.
            await eventually(lambda: _succeeded(stack, prefix, at_least=20), "20 ETLs", 60)
            for name in ("worker 1", "worker 2"):
                os.kill(stack.pids()[name], signal.SIGKILL)
            answers = await sending
            assert [a.status_code for a in answers] == [202] * UPSERTS, [
                a.text for a in answers if a.status_code != 202
            ][:3]
            finals: list[dict[str, Any]] = [
                await wait_for_etl(apis[n % 2], rid, version=1, within=180)
                for n, rid in enumerate(ids)
            ]
    finally:
        stack.stop()

    assert {final["etl"]["status"] for final in finals} == {"succeeded"}
    for n, final in enumerate(finals):
        assert final["version"] == 1, final  # each upsert persisted once
        assert final["context"]["seq"] == n and final["context_version"] == 1
    engine = create_async_engine(database_url)
    async with engine.connect() as connection:
        versions = await connection.scalar(
            text("SELECT count(*) FROM resource_versions WHERE resource_id LIKE :p"),
            {"p": f"{prefix}%"},
        )
    await engine.dispose()
    assert versions == UPSERTS


async def _succeeded(stack: Stack, prefix: str, at_least: int) -> bool | None:
    engine = create_async_engine(stack.database_url)
    try:
        async with engine.connect() as connection:
            count = await connection.scalar(
                text(
                    "SELECT count(*) FROM resource_versions "
                    "WHERE resource_id LIKE :p AND etl_status = 'succeeded'"
                ),
                {"p": f"{prefix}%"},
            )
    finally:
        await engine.dispose()
    return True if (count or 0) >= at_least else None
