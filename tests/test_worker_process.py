"""The worker as operators run it: its own process, its own task queue, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.main import create_app
from tests.helpers import wait_for_etl
from upsertflow.settings import Settings

pytestmark = pytest.mark.e2e


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def worker_env(settings: Settings, database_url: str, temporal_address: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "TEMPORAL_ADDRESS": temporal_address,
        "UPSERTFLOW_TASK_QUEUE": f"ops-{uuid.uuid4().hex}",
        "UPSERTFLOW_ENRICHMENT__URL": settings.enrichment.url,
        "UPSERTFLOW_WORKER_GRACEFUL_SHUTDOWN_SECONDS": "20",
        "UPSERTFLOW_LOG_FORMAT": "json",
    }


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


async def test_sigterm_lets_the_running_activity_finish(
    settings: Settings,
    worker_env: dict[str, str],
    workers: list[WorkerProcess],
    enrichment: httpx.AsyncClient,
    tmp_path: Path,
    resource_id: str,
) -> None:
    # The worker and the API agree on a task queue of the operator's choosing.
    app = create_app(
        settings.model_copy(update={"task_queue": worker_env["UPSERTFLOW_TASK_QUEUE"]})
    )
    first = WorkerProcess(worker_env, tmp_path / "first.log")
    workers.append(first)
    first.start()
    await enrichment.put("/_faults", json={"latency_ms": 3000})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            created = await api.put(f"/resources/{resource_id}", json={"info": {"country": "FR"}})
            assert created.status_code == 201, created.text
            deadline = time.monotonic() + 20
            while (await enrichment.get("/_stats")).json()["in_flight"] == 0:
                assert time.monotonic() < deadline, "enrich never called the service"
                await asyncio.sleep(0.05)

            assert first.process is not None
            first.process.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(first.process.wait, 30)

            # The in-flight enrichment was answered and completed before the worker left.
            stats = (await enrichment.get("/_stats")).json()
            assert stats["by_status"] == {"200": 1}
            assert exit_code == 0, first.log()
            assert "worker stopped" in first.log()
            second = WorkerProcess(worker_env, tmp_path / "second.log")
            workers.append(second)
            second.start()
            done = await wait_for_etl(api, resource_id, version=1, within=60)
            etl = (await api.get(f"/resources/{resource_id}/etl")).json()

    assert done["etl"]["status"] == "succeeded"
    assert done["context"]["country.country_name"] == "France"
    enrich = next(step for step in etl["steps"] if step["name"] == "enrich")
    assert enrich["attempts"] == 1  # not cut and retried: it finished during the grace period
    assert (await enrichment.get("/_stats")).json()["by_key"] == {"FR": 1}
