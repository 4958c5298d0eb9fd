"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.deps import SessionDep, TemporalDep
from upsertflow.store.health import ping

router = APIRouter(tags=["health"])

_CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/healthz", operation_id="healthz")
async def healthz() -> dict[str, str]:
    """The process is alive. Depends on nothing."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "PostgreSQL or Temporal is unreachable"}},
)
async def readyz(session: SessionDep, client: TemporalDep) -> JSONResponse:
    """PostgreSQL and Temporal are reachable."""
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_SECONDS):
            await ping(session)
        checks["database"] = "ok"
    except Exception as error:  # any failure means "not ready"
        checks["database"] = f"unreachable: {type(error).__name__}"
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_SECONDS):
            healthy = await client.service_client.check_health()
        checks["temporal"] = "ok" if healthy else "unhealthy"
    except Exception as error:
        checks["temporal"] = f"unreachable: {type(error).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )
