"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from api.security import Scope
from api.tokens import mint
from upsertflow.settings import Settings

TERMINAL = {"succeeded", "failed", "superseded", "cancelled"}


def auth_headers(settings: Settings, *scopes: str, subject: str = "test") -> dict[str, str]:
    """`Authorization: Bearer <token>` for an API of `settings`: every scope unless `scopes`."""
    token = mint(settings.auth, subject=subject, scopes=scopes or tuple(Scope))
    return {"Authorization": f"Bearer {token}"}


def ended_etl(response: httpx.Response, version: int | None) -> dict[str, Any] | None:
    """The resource of a `GET /resources/{id}` answer once the ETL of `version` (or any) ended."""
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    etl = body["etl"]
    if etl["status"] in TERMINAL and version in (None, etl["version"]):
        return body
    return None


async def wait_for_etl(
    http: httpx.AsyncClient, resource_id: str, version: int | None = None, within: float = 30.0
) -> dict[str, Any]:
    """Poll `GET /resources/{id}` until the ETL of `version` (or of the current version) has
    ended; return the resource. An API that does not answer for a while (restarting) is
    asked again."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = await http.get(f"/resources/{resource_id}")
        except httpx.TransportError as error:
            last = error
        else:
            if (body := ended_etl(response, version)) is not None:
                return body
            last = response.text
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ETL of {resource_id} v{version} did not end; last seen: {last}")


def wait_for_etl_sync(
    http: httpx.Client, resource_id: str, version: int | None = None, within: float = 30.0
) -> dict[str, Any]:
    """`wait_for_etl` for tests that are not async."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = http.get(f"/resources/{resource_id}")
        except httpx.TransportError as error:
            last = error
        else:
            if (body := ended_etl(response, version)) is not None:
                return body
            last = response.text
        time.sleep(0.05)
    raise AssertionError(f"the ETL of {resource_id} v{version} did not end; last seen: {last}")
