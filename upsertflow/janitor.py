"""Collecting what nobody needs any more: unreferenced documents and expired keys.

Every worker runs `collect` now and then (`UPSERTFLOW_JANITOR_INTERVAL_SECONDS`);
running it on several workers at once is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy import Delete, delete, exists, func
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from upsertflow.models import Blob, BlobClaim, IdempotencyKey, ResourceVersion

log = logging.getLogger("upsertflow.janitor")

_D = TypeVar("_D", bound=Delete)


def unreferenced_blobs(statement: _D, untouched_for: timedelta) -> _D:
    """Restrict a `DELETE FROM blobs` to documents nothing refers to or claims.

    `untouched_for` spares documents stored (or stored again) very recently: a
    request storing the same content right now will claim it in a moment.
    """
    return statement.where(
        Blob.created_at < func.now() - untouched_for,
        ~exists().where(ResourceVersion.blob_digest == Blob.digest),
        ~exists().where(BlobClaim.digest == Blob.digest),
    )


@dataclass(frozen=True)
class Collected:
    claims: int
    blobs: int
    idempotency_keys: int


async def collect(sessions: async_sessionmaker[AsyncSession], claim_ttl: timedelta) -> Collected:
    """Expire old claims, then delete unreferenced documents and expired idempotency keys."""
    now = datetime.now(UTC)
    async with sessions.begin() as session:
        claims = await session.execute(
            delete(BlobClaim).where(BlobClaim.created_at < now - claim_ttl)
        )
        blobs = await session.execute(unreferenced_blobs(delete(Blob), claim_ttl))
        keys = await session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < now))
    collected = Collected(claims.rowcount, blobs.rowcount, keys.rowcount)  # type: ignore[attr-defined]
    if collected != Collected(0, 0, 0):
        log.info("janitor collected %s", collected)
    return collected


async def run_periodically(
    sessions: async_sessionmaker[AsyncSession], claim_ttl: timedelta, interval: timedelta
) -> None:
    """Collect every `interval` until cancelled; a failed round is logged and retried."""
    while True:
        try:
            await collect(sessions, claim_ttl)
        except Exception:
            log.exception("janitor round failed")
        await asyncio.sleep(interval.total_seconds())
