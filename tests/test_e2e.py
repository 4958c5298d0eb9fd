"""End to end: the processes `make dev` starts, over real HTTP, stopped with Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import venv_binary
from tests.helpers import wait_for_etl_sync
from tests.makedev import MakeDev

pytestmark = pytest.mark.e2e

EXAMPLE = {
    "attributes": {"name": "Widget"},
    "info": {"Address": {"City": " Paris "}, "Age": "42", "Active": "yes", "Empty": ""},
}


@pytest.fixture
def stack() -> Iterator[MakeDev]:
    dev = MakeDev()
    try:
        yield dev
    finally:
        dev.close()


def _succeeded(stack: MakeDev, resource_id: str, version: int) -> dict[str, Any]:
    done = wait_for_etl_sync(stack.api, resource_id, version)
    assert done["etl"]["status"] == "succeeded", done
    return done


def test_make_dev_stack_serves_upserts_and_keeps_data_across_restarts(stack: MakeDev) -> None:
    stack.start()

    created = stack.api.put("/resources/r1", json=EXAMPLE, timeout=30)
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1
    done = _succeeded(stack, "r1", 1)
    assert done["context"] == {"address.city": "Paris", "age": 42, "active": True}
    assert "empty" not in done["context"]
    assert httpx.get(f"{stack.url}/docs", timeout=5).status_code == 200
    # Auth is on: a local key of its own, private, and the banner says how to get a token.
    assert httpx.get(f"{stack.url}/resources/r1", timeout=5).status_code == 401
    assert (stack.data_dir / "auth-signing-key").stat().st_mode & 0o777 == 0o600
    assert "-m api.tokens" in stack.log()

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

    token = stack.auth_headers()
    assert stack.stop(signal.SIGINT) == 0  # Ctrl-C, as a person would
    log = stack.log()
    for child in ("api", "worker", "enrichment service", "Temporal dev server", "PostgreSQL"):
        assert f"stopped {child}" in log

    stack.start()
    # The same key: a token minted before the restart still works.
    kept = stack.api.get("/resources/r1", timeout=5, headers=token)
    assert kept.status_code == 200
    assert kept.json()["context"] == done["context"]
    updated = stack.api.put("/resources/r1", json={"info": {"Age": "43"}}, timeout=30)
    assert updated.status_code == 200
    assert updated.json()["version"] == 2
    assert _succeeded(stack, "r1", 2)["context"] == {"age": 43}
