"""End to end: the processes `make dev` starts, over real HTTP, stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from upsertflow.embedded import venv_binary

pytestmark = pytest.mark.e2e

EXAMPLE = {
    "attributes": {"name": "Widget"},
    "info": {"Address": {"City": " Paris "}, "Age": "42", "Active": "yes", "Empty": ""},
}


class DevStack:
    """`upsertflow-dev` in a subprocess, on free ports and a data directory of its own."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.api_port = free_port()
        self.temporal_port = free_port()
        self.env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "TEMPORAL_ADDRESS")
        }
        self.env.update(
            UPSERTFLOW_DATA_DIR=str(data_dir),
            UPSERTFLOW_API_PORT=str(self.api_port),
            UPSERTFLOW_DEV_TEMPORAL_PORT=str(self.temporal_port),
            UPSERTFLOW_DEV_TEMPORAL_UI_PORT=str(free_port()),
            UPSERTFLOW_DEV_ENRICHMENT_PORT=str(free_port()),
        )
        self.log_path = data_dir.parent / "dev.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, timeout: float = 90.0) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "upsertflow.dev"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"make dev exited:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the stack was not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> int:
        """Ctrl-C, as a person would; return the exit code."""
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"make dev did not stop on Ctrl-C:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[DevStack]:
    dev = DevStack(tmp_path / "data")
    try:
        yield dev
    finally:
        dev.stop()


def _wait_for_etl(url: str, resource_id: str, version: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/resources/{resource_id}", timeout=5).json()
        if body.get("etl", {}).get("version") == version and body["etl"]["status"] == "succeeded":
            return body
        time.sleep(0.1)
    raise AssertionError(f"ETL of {resource_id} v{version} did not succeed: {body}")


def test_make_dev_stack_serves_upserts_and_keeps_data_across_restarts(stack: DevStack) -> None:
    stack.start()

    created = httpx.put(f"{stack.url}/resources/r1", json=EXAMPLE, timeout=30)
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1
    done = _wait_for_etl(stack.url, "r1", 1)
    assert done["context"] == {"address.city": "Paris", "age": 42, "active": True}
    assert "empty" not in done["context"]
    assert httpx.get(f"{stack.url}/docs", timeout=5).status_code == 200

    listed = subprocess.run(
        [
            venv_binary("temporal"),
            "workflow",
            "list",
            "--address",
            f"127.0.0.1:{stack.temporal_port}",
            "--query",
            'ResourceId="r1"',
            "--output",
            "json",
        ],
        capture_output=True,
        check=True,
        text=True,
    )
    workflow_ids = [entry["execution"]["workflowId"] for entry in json.loads(listed.stdout)]
    assert workflow_ids == [done["etl"]["workflow_id"]]

    assert stack.stop() == 0
    log = stack.log()
    for child in ("api", "worker", "enrichment service", "Temporal dev server", "PostgreSQL"):
        assert f"stopped {child}" in log

    stack.start()
    kept = httpx.get(f"{stack.url}/resources/r1", timeout=5)
    assert kept.status_code == 200
    assert kept.json()["context"] == done["context"]
    updated = httpx.put(f"{stack.url}/resources/r1", json={"info": {"Age": "43"}}, timeout=30)
    assert updated.status_code == 200
    assert updated.json()["version"] == 2
    assert _wait_for_etl(stack.url, "r1", 2)["context"] == {"age": 43}
