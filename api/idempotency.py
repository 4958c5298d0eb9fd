"""`Idempotency-Key` (IETF httpapi idempotency-key draft), stored in PostgreSQL.

The same key with the same body replays the first response (with
`Idempotent-Replayed: true`) and creates nothing new; the same key with another
body is `422`; the same key while the first request is in flight is `409`. Keys
expire after `UPSERTFLOW_IDEMPOTENCY_TTL_SECONDS`. Because the keys live in the
database, they survive API restarts; a request whose API process died while it
was in flight is taken over after its lock expires, with the same request id —
and so the same workflow — as the first.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.problems import Problem
from upsertflow.models import IdempotencyKey

REPLAY_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255


class Claim(StrEnum):
    NEW = "new"
    REPLAY = "replay"
    RESUME = "resume"


@dataclass(frozen=True)
class KeyState:
    claim: Claim
    request_id: str
    status_code: int | None = None
    body: bytes | None = None
    headers: dict[str, str] | None = None


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            f"an Idempotency-Key is 1–{MAX_KEY_LENGTH} printable characters",
        )
    return key


async def claim_key(
    sessions: async_sessionmaker[AsyncSession],
    key: str,
    scope: str,
    fingerprint: str,
    ttl: timedelta,
    lock_for: timedelta,
) -> KeyState:
    """Claim `key` for this request, or say how the request it belongs to went."""
    now = datetime.now(UTC)
    request_id = uuid.uuid4().hex
    values = {
        "key": key,
        "scope": scope,
        "fingerprint": fingerprint,
        "request_id": request_id,
        "created_at": now,
        "locked_until": now + lock_for,
        "expires_at": now + ttl,
    }
    async with sessions.begin() as session:
        inserted = await session.scalar(
            pg_insert(IdempotencyKey)
            .values(**values)
            .on_conflict_do_nothing()
            .returning(IdempotencyKey.request_id)
        )
        if inserted is not None:
            return KeyState(Claim.NEW, request_id)
        row = await session.scalar(
            select(IdempotencyKey)
            .where(IdempotencyKey.key == key, IdempotencyKey.scope == scope)
            .with_for_update()
        )
        assert row is not None
        if row.expires_at <= now:
            await session.execute(
                update(IdempotencyKey)
                .where(IdempotencyKey.key == key, IdempotencyKey.scope == scope)
                .values(**values, status_code=None, response_body=None, response_headers=None)
            )
            return KeyState(Claim.NEW, request_id)
        if row.fingerprint != fingerprint:
            raise Problem(
                422,
                "idempotency-key-reused",
                "Idempotency-Key reused with another body",
                f"the key {key!r} was first used for a different request body; "
                "use a new key for a new request",
            )
        if row.status_code is not None:
            return KeyState(
                Claim.REPLAY,
                row.request_id,
                row.status_code,
                row.response_body,
                row.response_headers,
            )
        if row.locked_until > now:
            # The first request answers within its lock, or the lock expires and a repeat
            # takes it over: either way a repeat after this long gets an answer.
            wait = max(1, math.ceil((row.locked_until - now).total_seconds()))
            raise Problem(
                409,
                "idempotency-key-in-flight",
                "Request with this Idempotency-Key is in flight",
                f"the first request with this key is still being processed; repeat this "
                f"request to get its response (at the latest after {wait} s, when a repeat "
                "takes over the first request if it has not answered)",
                headers={"Retry-After": str(wait)},
            )
        row.locked_until = now + lock_for
        return KeyState(Claim.RESUME, row.request_id)


async def store_response(
    sessions: async_sessionmaker[AsyncSession],
    key: str,
    scope: str,
    status_code: int,
    body: bytes,
    headers: dict[str, str],
) -> None:
    """Keep the response, to replay it for repeats of the request."""
    async with sessions.begin() as session:
        await session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.key == key, IdempotencyKey.scope == scope)
            .values(status_code=status_code, response_body=body, response_headers=headers)
        )


async def unlock_key(sessions: async_sessionmaker[AsyncSession], key: str, scope: str) -> None:
    """Let a repeat take over a request that failed without an answer to keep.

    The key is not forgotten: the repeat goes on with the same request id, and so
    the same workflow, whatever the failed attempt had already started.
    """
    async with sessions.begin() as session:
        await session.execute(
            update(IdempotencyKey)
            .where(
                IdempotencyKey.key == key,
                IdempotencyKey.scope == scope,
                IdempotencyKey.status_code.is_(None),
            )
            .values(locked_until=func.now())
        )
