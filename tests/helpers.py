"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "superseded", "cancelled"}


async def wait_for_etl(
    http: httpx.AsyncClient, resource_id: str, version: int, within: float = 30.0
) -> dict[str, Any]:
    """Poll `GET /resources/{id}` until the ETL of `version` has ended; return the resource."""
    deadline = time.monotonic() + within
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await http.get(f"/resources/{resource_id}")
        if response.status_code == 200:
            body = response.json()
            if body["etl"]["version"] == version and body["etl"]["status"] in TERMINAL:
                return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ETL of {resource_id} v{version} did not end; last seen: {body}")
