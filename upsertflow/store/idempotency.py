"""The `idempotency_keys` table: which request a key belongs to, and its response to replay.

The protocol around it (what each state answers) is the API's: `api.idempotency`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql import ColumnElement

from upsertflow.models import IdempotencyKey


class Claim(StrEnum):
    """What claiming a key found."""

    NEW = "new"  # the key is this request's now, with a new request id
    RESUME = "resume"  # a first request failed or died: this one goes on with its request id
    REPLAY = "replay"  # the first request has answered: replay its response
    MISMATCH = "mismatch"  # the key was first used with another body
    IN_FLIGHT = "in_flight"  # the first request is still being processed


@dataclass(frozen=True)
class KeyState:
    claim: Claim
    request_id: str
    status_code: int | None = None
    body: bytes | None = None
    headers: dict[str, str] | None = None
    #: For `IN_FLIGHT`: when the first request's lock expires.
    locked_until: datetime | None = None


@dataclass(frozen=True)
class KeyRef:
    """A key, scoped by the request's method and path."""

    key: str
    scope: str

    def where(self) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
        return (IdempotencyKey.key == self.key, IdempotencyKey.scope == self.scope)


async def claim_key(
    sessions: async_sessionmaker[AsyncSession],
    ref: KeyRef,
    fingerprint: str,
    ttl: timedelta,
    lock_for: timedelta,
) -> KeyState:
    """Claim the key for a request with this body's `fingerprint`, or say whose it is."""
    now = datetime.now(UTC)
    request_id = uuid.uuid4().hex
    values = {
        "key": ref.key,
        "scope": ref.scope,
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
            return KeyState(Claim.NEW, inserted)
        row = await session.scalar(select(IdempotencyKey).where(*ref.where()).with_for_update())
        assert row is not None
        if row.expires_at <= now:
            await session.execute(
                update(IdempotencyKey)
                .where(*ref.where())
                .values(**values, status_code=None, response_body=None, response_headers=None)
            )
            return KeyState(Claim.NEW, request_id)
        state = _state_of(row, fingerprint, now)
        if state.claim is Claim.RESUME:
            row.locked_until = now + lock_for
        return state


def _state_of(row: IdempotencyKey, fingerprint: str, now: datetime) -> KeyState:
    """What an unexpired key means for a request with this `fingerprint`."""
    if row.fingerprint != fingerprint:
        return KeyState(Claim.MISMATCH, row.request_id)
    if row.status_code is not None:
        return KeyState(
            Claim.REPLAY, row.request_id, row.status_code, row.response_body, row.response_headers
        )
    if row.locked_until > now:
        return KeyState(Claim.IN_FLIGHT, row.request_id, locked_until=row.locked_until)
    return KeyState(Claim.RESUME, row.request_id)


async def store_response(
    sessions: async_sessionmaker[AsyncSession],
    ref: KeyRef,
    status_code: int,
    body: bytes,
    headers: dict[str, str],
) -> None:
    """Keep the response, to replay it for repeats of the request."""
    async with sessions.begin() as session:
        await session.execute(
            update(IdempotencyKey)
            .where(*ref.where())
            .values(status_code=status_code, response_body=body, response_headers=headers)
        )


async def unlock_key(sessions: async_sessionmaker[AsyncSession], ref: KeyRef) -> None:
    """Let a repeat take over a request that failed without an answer to keep.

    The key is not forgotten: the repeat goes on with the same request id, and so
    the same workflow, whatever the failed attempt had already started.
    """
    async with sessions.begin() as session:
        await session.execute(
            update(IdempotencyKey)
            .where(*ref.where(), IdempotencyKey.status_code.is_(None))
            .values(locked_until=func.now())
        )


async def delete_expired_keys(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Delete the keys whose time is up."""
    async with sessions.begin() as session:
        result = await session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.expires_at < func.now())
        )
    return int(result.rowcount)  # type: ignore[attr-defined]
