"""The dev stack itself: N workers and M APIs, one child killed, a stop in reverse order."""

from __future__ import annotations

import logging
import os
import signal
import uuid

import httpx
import pytest

from devstack import Stack, StackConfig, free_port
from devstack.processes import listening
from tests.helpers import wait_for_etl

pytestmark = pytest.mark.e2e


async def test_a_stack_of_two_workers_and_two_apis_serves_and_stops_in_reverse_order(
    database_url: str,
    temporal_address: str,
    enrichment_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="devstack")
    metrics = _two_free_ports()
    config = StackConfig(
        database_url=database_url,
        temporal_address=temporal_address,
        enrichment_url=enrichment_url,
        workers=2,
        api_ports=(0, 0),
        env={
            "UPSERTFLOW_TASK_QUEUE": f"stack-{uuid.uuid4().hex}",
            "UPSERTFLOW_API__METRICS_PORT": str(metrics),
        },
        app_grace=10,
    )
    stack = Stack(config)
    try:
        stack.start()  # every worker logged "worker started", every API answers /readyz
        assert list(stack.pids()) == ["worker 1", "worker 2", "api 1", "api 2"]
        assert len(set(stack.api_urls)) == 2
        resource_id = f"s-{uuid.uuid4().hex[:12]}"
        token = stack.auth_headers()
        async with (
            httpx.AsyncClient(base_url=stack.api_urls[0], timeout=30, headers=token) as first,
            httpx.AsyncClient(base_url=stack.api_urls[1], timeout=30, headers=token) as second,
        ):
            created = await second.put(f"/resources/{resource_id}", json={"info": {"Age": "7"}})
            assert created.status_code == 201, created.text
            done = await wait_for_etl(first, resource_id, version=1)
        assert done["etl"]["status"] == "succeeded", stack.tails()
        # Each API its own metrics port; none on the API's port.
        async with httpx.AsyncClient(timeout=10) as scraper:
            for n, url in enumerate(stack.api_urls):
                served = await scraper.get(f"http://127.0.0.1:{metrics + n}/metrics")
                assert "upsertflow_http_requests_total" in served.text
                assert (await scraper.get(f"{url}/metrics")).status_code == 404

        worker = stack.child("worker 1")
        assert worker.process is not None
        crashed = worker.process.pid
        os.kill(crashed, signal.SIGKILL)  # a crash, not a stop by the stack
        worker.process.wait(10)
        with pytest.raises(RuntimeError, match="worker 1 was killed by SIGKILL"):
            stack.check_alive()
        worker.start()  # one child started again, the others untouched
        assert stack.pids()["worker 1"] != crashed
        stack.check_alive()
    finally:
        stack.stop()
    stops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped ")]
    assert stops == [f"stopped {name}" for name in ("api 2", "api 1", "worker 2", "worker 1")]
    assert not stack.root.exists(), "a temporary stack deletes its folder"


def _two_free_ports() -> int:
    """A port whose next one is free too."""
    while True:
        port = free_port()
        if port < 65535 and not listening("127.0.0.1", port + 1):
            return port
