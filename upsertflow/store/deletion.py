"""Deleting a resource so that no late attempt of its earlier life can bring it back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from upsertflow.contracts import IN_FLIGHT
from upsertflow.models import (
    Blob,
    BlobClaim,
    Resource,
    ResourceTombstone,
    ResourceVersion,
)
from upsertflow.naming import upsert_workflow_id
from upsertflow.store.blobs import unreferenced_blobs


@dataclass(frozen=True)
class Deleted:
    """What a DELETE removed: whether anything existed, and the workflows to cancel."""

    found: bool
    workflow_ids: frozenset[str]


async def delete_resource(
    sessions: async_sessionmaker[AsyncSession], resource_id: str, unreferenced_after: timedelta
) -> Deleted:
    """Delete the resource, withdraw its requests not persisted yet, leave a tombstone.

    In one transaction:
    - the claims of the resource's requests that are not persisted yet are deleted:
      their `persist` finds no claim and writes nothing (a `persist` running right
      now holds its claim locked, so this waits for it, and then deletes what it
      wrote too);
    - the resource row goes (its versions, step outputs and context with it), and
      a tombstone keeps its last version, so that versions of this id never go
      backwards and any late step of this life compares as superseded;
    - its stored documents go, unless something else refers to them.

    The workflows to cancel are the withdrawn requests' and those of the versions
    whose ETL was in flight: all known from PostgreSQL, none from visibility.
    """
    async with sessions.begin() as session:
        withdrawn = (
            await session.execute(
                delete(BlobClaim)
                .where(BlobClaim.resource_id == resource_id)
                .returning(BlobClaim.request_id, BlobClaim.digest)
            )
        ).all()
        resource = await session.scalar(
            select(Resource).where(Resource.id == resource_id).with_for_update()
        )
        if resource is None and not withdrawn:
            return Deleted(found=False, workflow_ids=frozenset())
        running = set()
        digests = {row.digest for row in withdrawn}
        if resource is not None:
            versions = (
                await session.execute(
                    select(
                        ResourceVersion.blob_digest,
                        ResourceVersion.etl_workflow_id,
                        ResourceVersion.etl_status,
                    ).where(ResourceVersion.resource_id == resource_id)
                )
            ).all()
            digests |= {row.blob_digest for row in versions}
            running = {row.etl_workflow_id for row in versions if row.etl_status in IN_FLIGHT}
            tombstone = pg_insert(ResourceTombstone).values(
                resource_id=resource_id,
                last_version=resource.version,
                deleted_at=datetime.now(UTC),
            )
            await session.execute(
                tombstone.on_conflict_do_update(
                    index_elements=[ResourceTombstone.resource_id],
                    set_={
                        "last_version": func.greatest(
                            ResourceTombstone.last_version, tombstone.excluded.last_version
                        ),
                        "deleted_at": tombstone.excluded.deleted_at,
                    },
                )
            )
            await session.execute(delete(Resource).where(Resource.id == resource_id))
        if digests:
            await session.execute(
                unreferenced_blobs(delete(Blob).where(Blob.digest.in_(digests)), unreferenced_after)
            )
    withdrawn_ids = {upsert_workflow_id(resource_id, row.request_id) for row in withdrawn}
    return Deleted(found=True, workflow_ids=frozenset(running | withdrawn_ids))
