"""A resource's versions: persisting the next one, claiming its ETL, loading its context,
recording how its ETL ended.

Each function is one transaction, idempotent by the keys it is given: a request id
persists one version whatever the number of attempts, a run id loads a context
once. The callers (the activities) pass the workflow and run that act; these
functions fence on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import cast, delete, exists, func, insert, literal, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from upsertflow.contracts import (
    IN_FLIGHT,
    ClaimInput,
    EtlStatus,
    OutcomeInput,
    Persisted,
    PersistInput,
)
from upsertflow.models import (
    Blob,
    BlobClaim,
    Resource,
    ResourceContext,
    ResourceTombstone,
    ResourceVersion,
    StepOutput,
    persisted_from,
)
from upsertflow.store.steps import missing_blob, owns_etl


class RequestWithdrawn(Exception):
    """The request's claim on its stored body is gone: its resource was deleted (which
    withdrew the request) or the claim expired. Nothing is persisted, ever."""


class NotCurrent(Exception):
    """The version is no longer its resource's current one."""


async def persist_version(
    sessions: async_sessionmaker[AsyncSession],
    request: PersistInput,
    workflow_id: str,
    run_id: str,
) -> Persisted:
    """Persist the request as its resource's next version, or find the version it made."""
    try:
        return await _persist(sessions, request, workflow_id, run_id)
    except IntegrityError:
        # A concurrent attempt of the same request won the race: it is persisted now.
        return await _persist(sessions, request, workflow_id, run_id)


async def _persist(
    sessions: async_sessionmaker[AsyncSession],
    request: PersistInput,
    workflow_id: str,
    run_id: str,
) -> Persisted:
    # Two statements, one transaction: every upsert pays this, so it is kept to the
    # round trips it needs.
    async with sessions.begin() as session:
        # The request's claim is its fence: a DELETE that withdrew the request (and so
        # cancelled this workflow) removed it, and a late attempt writes nothing. Taken
        # over here (deleted: the version refers to the info from now on), and so locked:
        # such a DELETE waits for this transaction, then deletes what it wrote.
        claimed = (
            await session.scalars(
                delete(BlobClaim)
                .where(BlobClaim.request_id == request.request_id)
                .returning(BlobClaim.digest)
            )
        ).all()
        if request.info_digest not in claimed:
            # Persisted already, by an earlier attempt (which took the claim over), or
            # withdrawn.
            existing = await session.scalar(
                select(ResourceVersion).where(ResourceVersion.request_id == request.request_id)
            )
            if existing is None:
                raise RequestWithdrawn(request.request_id)
            resource = await session.get_one(Resource, existing.resource_id)
            return persisted_from(existing, resource.created_at)
        if request.attributes_digest not in claimed:
            # Never in practice: the API claims both documents, and a claimed document
            # is kept (deleting it deletes its claims).
            raise missing_blob(request.attributes_digest)
        now = datetime.now(UTC)
        # Versions never go backwards, even across a DELETE: a resource created again
        # continues from its tombstone.
        first_version = (
            select(func.coalesce(func.max(ResourceTombstone.last_version), 0) + 1)
            .where(ResourceTombstone.resource_id == request.resource_id)
            .scalar_subquery()
        )
        # The attributes document, stored canonical JSON, is decoded by the database.
        attributes = (
            select(cast(func.convert_from(Blob.body, "UTF8"), JSONB))
            .where(Blob.digest == request.attributes_digest)
            .scalar_subquery()
        )
        upsert = pg_insert(Resource).values(
            id=request.resource_id,
            version=first_version,
            attributes=attributes,
            created_at=now,
            updated_at=now,
        )
        resource_row = upsert.on_conflict_do_update(
            index_elements=[Resource.id],
            set_={
                "version": Resource.version + 1,
                "attributes": upsert.excluded.attributes,
                "updated_at": now,
            },
        ).returning(Resource.version, Resource.created_at)
        new_resource = resource_row.cte("resource")
        values = {
            "resource_id": request.resource_id,
            "request_id": request.request_id,
            "blob_digest": request.info_digest,
            "persisted_at": now,
            "etl_status": EtlStatus.PENDING.value,
            "etl_workflow_id": workflow_id,
            "etl_run_id": run_id,
            "etl_steps": [],
        }
        columns = ResourceVersion.__table__.c
        version_row = insert(ResourceVersion).from_select(
            ["version", *values],
            select(
                new_resource.c.version,
                *(literal(value, columns[name].type) for name, value in values.items()),
            ),
        )
        # Both rows in one statement.
        row = (
            await session.execute(
                select(new_resource.c.version, new_resource.c.created_at).add_cte(
                    version_row.cte("version_row")
                )
            )
        ).one()
        stored = ResourceVersion(version=row.version, **values)
        return persisted_from(stored, row.created_at)


async def claim_version(
    sessions: async_sessionmaker[AsyncSession], claim: ClaimInput, workflow_id: str, run_id: str
) -> Persisted:
    """Make `workflow_id` the owner of the ETL of a version that is still current, from
    scratch: the last run's status and step outputs are cleared. Raises `NotCurrent`."""
    async with sessions.begin() as session:
        resource = await session.get(Resource, claim.resource_id, with_for_update=True)
        if resource is None or resource.version != claim.version:
            raise NotCurrent(f"{claim.resource_id} v{claim.version}")
        version = await session.get_one(ResourceVersion, (claim.resource_id, claim.version))
        version.etl_status = EtlStatus.PENDING
        version.etl_workflow_id = workflow_id
        version.etl_run_id = run_id
        version.etl_steps = []
        version.etl_error = None
        version.etl_started_at = None
        version.etl_finished_at = None
        # A new run starts from scratch: no checkpoint of the last one is resumed.
        await session.execute(_step_outputs_of(claim.resource_id, claim.version))
        return persisted_from(version, resource.created_at)


async def loaded_by_run(
    sessions: async_sessionmaker[AsyncSession], resource_id: str, version: int, run_id: str
) -> int | None:
    """The records of the context that this run loaded for the version, if it did."""
    async with sessions() as session:
        count: int | None = await session.scalar(
            select(ResourceContext.record_count).where(
                ResourceContext.resource_id == resource_id,
                ResourceContext.version == version,
                ResourceContext.run_id == run_id,
            )
        )
        return count


async def load_context(
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
    version: int,
    run_id: str,
    records: dict[str, Any],
    pipeline_version: int | None = None,
) -> bool:
    """Replace the resource's context with the version's records; False (nothing written)
    if the version is no longer current, its ETL is no longer this workflow's, or a newer
    version's context is loaded. The version's step outputs are done with: deleted."""
    async with sessions.begin() as session:
        current = await session.scalar(
            select(Resource.version).where(Resource.id == resource_id).with_for_update()
        )
        if current != version or not await session.scalar(select(owns_etl(resource_id, version))):
            return False
        loaded = await session.scalar(
            select(ResourceContext.version)
            .where(ResourceContext.resource_id == resource_id)
            .with_for_update()
        )
        if loaded is not None and loaded > version:
            return False
        context = pg_insert(ResourceContext).values(
            resource_id=resource_id,
            version=version,
            records=records,
            loaded_at=func.now(),
            run_id=run_id,
            record_count=len(records),
            pipeline_version=pipeline_version,
        )
        await session.execute(
            context.on_conflict_do_update(
                index_elements=[ResourceContext.resource_id],
                set_={
                    column: context.excluded[column]
                    for column in (
                        "version",
                        "records",
                        "loaded_at",
                        "run_id",
                        "record_count",
                        "pipeline_version",
                    )
                },
            )
        )
        await session.execute(_step_outputs_of(resource_id, version))
        return True


async def record_outcome(sessions: async_sessionmaker[AsyncSession], outcome: OutcomeInput) -> None:
    """Record how the ETL of a version ended, if `outcome.workflow_id` still owns it."""
    async with sessions.begin() as session:
        await session.execute(
            update(ResourceVersion)
            .where(
                ResourceVersion.resource_id == outcome.resource_id,
                ResourceVersion.version == outcome.version,
                ResourceVersion.etl_workflow_id == outcome.workflow_id,
            )
            .values(
                etl_status=outcome.status,
                etl_steps=outcome.steps_json(),
                etl_error=outcome.error,
                etl_finished_at=func.now(),
            )
        )


async def finish_in_flight(
    sessions: async_sessionmaker[AsyncSession], version: ResourceVersion, values: dict[str, Any]
) -> datetime | None:
    """Store how the version's ETL ended (`values` of its `etl_*` columns) if its status is
    still in flight for the same workflow run; return the finishing time, None if not."""
    async with sessions.begin() as session:
        finished: datetime | None = await session.scalar(
            update(ResourceVersion)
            .where(
                ResourceVersion.resource_id == version.resource_id,
                ResourceVersion.version == version.version,
                ResourceVersion.etl_workflow_id == version.etl_workflow_id,
                ResourceVersion.etl_run_id == version.etl_run_id,
                ResourceVersion.etl_status.in_(IN_FLIGHT),
            )
            .values(**values, etl_finished_at=func.now())
            .returning(ResourceVersion.etl_finished_at)
        )
        return finished


async def in_flight_since(
    sessions: async_sessionmaker[AsyncSession], cutoff: datetime, limit: int
) -> Sequence[ResourceVersion]:
    """Up to `limit` versions persisted before `cutoff` whose ETL is still in flight."""
    async with sessions() as session:
        return (
            await session.scalars(
                select(ResourceVersion)
                .where(
                    ResourceVersion.etl_status.in_(IN_FLIGHT),
                    ResourceVersion.persisted_at < cutoff,
                )
                .order_by(ResourceVersion.persisted_at)
                .limit(limit)
            )
        ).all()


async def delete_ended_step_outputs(
    sessions: async_sessionmaker[AsyncSession], grace: timedelta
) -> int:
    """Delete the step outputs of versions whose ETL ended over `grace` ago."""
    async with sessions.begin() as session:
        result = await session.execute(
            delete(StepOutput).where(
                exists().where(
                    ResourceVersion.resource_id == StepOutput.resource_id,
                    ResourceVersion.version == StepOutput.version,
                    ResourceVersion.etl_status.not_in(IN_FLIGHT),
                    ResourceVersion.etl_finished_at < func.now() - grace,
                )
            )
        )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _step_outputs_of(resource_id: str, version: int) -> Any:
    return delete(StepOutput).where(
        StepOutput.resource_id == resource_id, StepOutput.version == version
    )
