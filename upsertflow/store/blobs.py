"""Stored request documents (the claim-check store) and the claims on them.

A request's `attributes` and `info` are stored once each, by content address, and
workflows carry the digest, never the document itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import orjson
from sqlalchemy import Delete, delete, exists, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from upsertflow.db import single_statements
from upsertflow.models import Blob, BlobClaim, ResourceVersion

_D = TypeVar("_D", bound=Delete)


@dataclass(frozen=True)
class Document:
    """A JSON object, its stored bytes (compact, in input order) and their sha256."""

    value: dict[str, Any]
    body: bytes
    digest: str

    @classmethod
    def of(cls, value: dict[str, Any], *, floats: bool = True) -> Document:
        """The document of a parsed JSON object: `json.dumps`'s compact UTF-8 text.

        `floats=False` promises that `value` holds no float: orjson then writes it, ~10×
        faster and byte for byte the same (floats are where the two differ: `1e-05`
        against `0.00001`), so a document's digest never depends on which one wrote it.
        (Nested deeper than orjson goes, 255 levels, possible only with `max_depth`
        raised that far, it is `json`'s.)
        """
        body = _text(value, floats)
        return cls(value=value, body=body, digest=hashlib.sha256(body).hexdigest())


def _text(value: dict[str, Any], floats: bool) -> bytes:
    # Input order is kept: the ETL's "first wins" on key collisions depends on it.
    if not floats:
        with contextlib.suppress(orjson.JSONEncodeError):
            return orjson.dumps(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


#: Documents stored by content address and claimed by a request, in one statement. Storing
#: known content again renews it, so no collection can take it meanwhile.
_STORE = text("""
    WITH stored AS (
        INSERT INTO blobs AS blob (digest, body, size_bytes)
        SELECT * FROM unnest(CAST(:digests AS text[]), CAST(:bodies AS bytea[]),
                             CAST(:sizes AS integer[]))
        ON CONFLICT (digest) DO UPDATE SET created_at = now()
        RETURNING blob.digest
    )
    INSERT INTO blob_claims (request_id, digest, resource_id)
    SELECT :request_id, stored.digest, :resource_id FROM stored
    ON CONFLICT DO NOTHING
""")


async def store_documents(
    sessions: async_sessionmaker[AsyncSession], resource_id: str, request_id: str, *docs: Document
) -> None:
    """Store documents by content address (once each), claimed by the request until it persists.

    Nothing else refers to them yet: the claim keeps the janitor away. Should the
    workflow never start (the API died, Temporal was down), the claim expires and
    the janitor collects documents nobody refers to. One statement (its own
    transaction): no BEGIN and COMMIT round trips.
    """
    unique = list({d.digest: d for d in docs}.values())
    async with single_statements(sessions).connect() as connection:
        await connection.execute(
            _STORE,
            {
                "digests": [d.digest for d in unique],
                "bodies": [d.body for d in unique],
                "sizes": [len(d.body) for d in unique],
                "request_id": request_id,
                "resource_id": resource_id,
            },
        )


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


async def claims_older_than(
    sessions: async_sessionmaker[AsyncSession], age: timedelta, limit: int
) -> Sequence[tuple[str, str | None]]:
    """Up to `limit` requests (request id, resource id) whose claims are older than `age`."""
    async with sessions() as session:
        rows = await session.execute(
            select(BlobClaim.request_id, BlobClaim.resource_id)
            .where(BlobClaim.created_at < func.now() - age)
            .distinct()
            .limit(limit)
        )
        return [(row.request_id, row.resource_id) for row in rows]


async def release_claims(
    sessions: async_sessionmaker[AsyncSession], request_ids: Sequence[str]
) -> int:
    """Delete the claims of these requests; their documents become collectable."""
    async with sessions.begin() as session:
        result = await session.execute(
            delete(BlobClaim).where(BlobClaim.request_id.in_(request_ids))
        )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def delete_unreferenced_blobs(
    sessions: async_sessionmaker[AsyncSession], untouched_for: timedelta
) -> int:
    """Delete the documents nothing refers to or claims, untouched for `untouched_for`."""
    async with sessions.begin() as session:
        result = await session.execute(unreferenced_blobs(delete(Blob), untouched_for))
    return int(result.rowcount)  # type: ignore[attr-defined]
