"""Activities that persist resources and run the database side of the ETL.

Every activity here is idempotent: Temporal may run an attempt again after a
crash, a timeout or a lost completion, and the database must end the same.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from upsertflow.contracts import (
    ClaimInput,
    EtlStatus,
    OutcomeInput,
    Persisted,
    PersistInput,
    StepInput,
    StepResult,
)
from upsertflow.models import (
    BlobClaim,
    Resource,
    ResourceContext,
    ResourceTombstone,
    ResourceVersion,
    StepOutput,
    persisted_from,
)
from upsertflow.normalize import normalize_info
from upsertflow.store.steps import StepStore, load_blob_json, owns_etl

log = logging.getLogger("upsertflow.activities")

#: PostgreSQL error classes that retrying cannot fix: data exceptions (22) and
#: integrity violations (23) other than the unique races handled below.
_PERMANENT_SQLSTATE_CLASSES = ("22",)


def _sqlstate(error: DBAPIError) -> str:
    return str(getattr(error.orig, "sqlstate", "") or getattr(error.orig, "pgcode", "") or "")


class ResourceActivities:
    """Database work of the upsert: persist, the storage side of ETL steps, outcomes."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._store = StepStore(sessions)

    @activity.defn(name="persist")
    async def persist(self, request: PersistInput) -> Persisted:
        """Persist the upsert as the resource's next version, or find it if already done."""
        try:
            return await self._persist(request)
        except IntegrityError:
            # A concurrent attempt of the same request won the race: it is persisted now.
            return await self._persist(request)
        except DBAPIError as error:
            if _sqlstate(error).startswith(_PERMANENT_SQLSTATE_CLASSES):
                raise ApplicationError(
                    "PostgreSQL refused the resource's data "
                    f"(SQLSTATE {_sqlstate(error)}): nothing was persisted",
                    type="InvalidData",
                    non_retryable=True,
                ) from error
            raise

    async def _persist(self, request: PersistInput) -> Persisted:
        info = activity.info()
        async with self._sessions.begin() as session:
            existing = await session.scalar(
                select(ResourceVersion).where(ResourceVersion.request_id == request.request_id)
            )
            if existing is not None:
                resource = await session.get_one(Resource, existing.resource_id)
                return persisted_from(existing, resource.created_at)
            # The request's claim is its fence: a DELETE that withdrew the request (and
            # so cancelled this workflow) removed it, and a late attempt writes nothing.
            # Locked, so such a DELETE waits for this transaction, then deletes what it wrote.
            claimed = (
                await session.scalars(
                    select(BlobClaim.digest)
                    .where(BlobClaim.request_id == request.request_id)
                    .with_for_update()
                )
            ).all()
            if request.info_digest not in claimed:
                raise ApplicationError(
                    f"the upsert request {request.request_id} was withdrawn (its resource was "
                    "deleted) or its stored body has expired: nothing was persisted",
                    type="RequestWithdrawn",
                    non_retryable=True,
                )
            attributes = await load_blob_json(session, request.attributes_digest)
            now = datetime.now(UTC)
            # Versions never go backwards, even across a DELETE: a resource created again
            # continues from its tombstone.
            first_version = (
                select(func.coalesce(func.max(ResourceTombstone.last_version), 0) + 1)
                .where(ResourceTombstone.resource_id == request.resource_id)
                .scalar_subquery()
            )
            upsert = (
                pg_insert(Resource)
                .values(
                    id=request.resource_id,
                    version=first_version,
                    attributes=attributes,
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_update(
                    index_elements=[Resource.id],
                    set_={
                        "version": Resource.version + 1,
                        "attributes": attributes,
                        "updated_at": now,
                    },
                )
                .returning(Resource.version, Resource.created_at, Resource.updated_at)
            )
            row = (await session.execute(upsert)).one()
            # The version refers to the info from now on: the request's claim is done.
            await session.execute(
                delete(BlobClaim).where(BlobClaim.request_id == request.request_id)
            )
            session.add(
                ResourceVersion(
                    resource_id=request.resource_id,
                    version=row.version,
                    request_id=request.request_id,
                    blob_digest=request.info_digest,
                    persisted_at=row.updated_at,
                    etl_status=EtlStatus.PENDING,
                    etl_workflow_id=info.workflow_id,
                    etl_run_id=info.workflow_run_id,
                    etl_steps=[],
                )
            )
        log.info("persisted %s v%d", request.resource_id, row.version)
        return Persisted(
            resource_id=request.resource_id,
            version=row.version,
            created=row.created_at == row.updated_at,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @activity.defn(name="claim_etl")
    async def claim_etl(self, claim: ClaimInput) -> Persisted:
        """Make this workflow the owner of the ETL of a version that is still current."""
        info = activity.info()
        async with self._sessions.begin() as session:
            resource = await session.get(Resource, claim.resource_id, with_for_update=True)
            if resource is None or resource.version != claim.version:
                raise ApplicationError(
                    f"resource {claim.resource_id} v{claim.version} is no longer the current "
                    "version: nothing to retry",
                    type="NotCurrent",
                    non_retryable=True,
                )
            await session.execute(
                update(ResourceVersion)
                .where(
                    ResourceVersion.resource_id == claim.resource_id,
                    ResourceVersion.version == claim.version,
                )
                .values(
                    etl_status=EtlStatus.PENDING,
                    etl_workflow_id=info.workflow_id,
                    etl_run_id=info.workflow_run_id,
                    etl_steps=[],
                    etl_error=None,
                    etl_started_at=None,
                    etl_finished_at=None,
                )
            )
            # A new run starts from scratch: no checkpoint of the last one is resumed.
            await session.execute(
                delete(StepOutput).where(
                    StepOutput.resource_id == claim.resource_id,
                    StepOutput.version == claim.version,
                )
            )
            return Persisted(
                resource_id=resource.id,
                version=resource.version,
                created=False,
                created_at=resource.created_at,
                updated_at=resource.updated_at,
            )

    @activity.defn(name="normalize")
    async def normalize(self, step: StepInput) -> StepResult:
        """Flatten and clean the version's raw `info` into records."""
        if not await self._store.begin(step):
            return superseded_result()
        info = await self._store.read_input(step)
        normalized = await asyncio.to_thread(normalize_info, info)
        if not await self._store.write(step, dict(normalized.records)):
            return superseded_result()
        return StepResult(
            attempt=activity.info().attempt,
            stats={
                "records": len(normalized.records),
                "dropped": len(normalized.dropped),
                "collisions": normalized.collided_paths,
                # Leaves that lost a collision: each one counted, none listed.
                "lost": normalized.lost,
            },
        )

    @activity.defn(name="load")
    async def load(self, step: StepInput) -> StepResult:
        """Replace the resource's context with this version's records, unless a newer one won.

        Idempotent: a retried attempt of a load that committed finds the context
        loaded by its own run and reports it again. A new run of the same version
        (an ETL retry) replaces the context: a retry recomputes it.
        """
        attempt = activity.info().attempt
        run_id = activity.info().workflow_run_id
        async with self._sessions() as session:
            done = await session.scalar(
                select(ResourceContext.record_count).where(
                    ResourceContext.resource_id == step.resource_id,
                    ResourceContext.version == step.version,
                    ResourceContext.run_id == run_id,
                )
            )
        if done is not None:
            return StepResult(attempt=attempt, stats={"records": done})
        if not await self._store.still_owned(step):
            return superseded_result()
        records = await self._store.read_input(step)
        async with self._sessions.begin() as session:
            current = await session.scalar(
                select(Resource.version).where(Resource.id == step.resource_id).with_for_update()
            )
            if current != step.version:
                return superseded_result()
            if not await session.scalar(select(owns_etl(step.resource_id, step.version))):
                return superseded_result()
            loaded = await session.scalar(
                select(ResourceContext.version)
                .where(ResourceContext.resource_id == step.resource_id)
                .with_for_update()
            )
            if loaded is not None and loaded > step.version:
                return superseded_result()
            context = pg_insert(ResourceContext).values(
                resource_id=step.resource_id,
                version=step.version,
                records=records,
                loaded_at=func.now(),
                run_id=run_id,
                record_count=len(records),
            )
            await session.execute(
                context.on_conflict_do_update(
                    index_elements=[ResourceContext.resource_id],
                    set_={
                        column: context.excluded[column]
                        for column in ("version", "records", "loaded_at", "run_id", "record_count")
                    },
                )
            )
            # The step outputs of a loaded version are done with.
            await session.execute(
                delete(StepOutput).where(
                    StepOutput.resource_id == step.resource_id,
                    StepOutput.version == step.version,
                )
            )
        return StepResult(attempt=attempt, stats={"records": len(records)})

    @activity.defn(name="record_outcome")
    async def record_outcome(self, outcome: OutcomeInput) -> None:
        """Record how the ETL of a version ended, if this workflow still owns that ETL."""
        async with self._sessions.begin() as session:
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


def superseded_result() -> StepResult:
    return StepResult(superseded=True, attempt=activity.info().attempt)
