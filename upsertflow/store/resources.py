"""Reading resources and their versions, as the API shows them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from upsertflow.contracts import EtlStatus, Persisted
from upsertflow.models import (
    Resource,
    ResourceContext,
    ResourceVersion,
    is_current_version,
    persisted_from,
)
from upsertflow.store.contexts import ALL_RECORDS, ContextLoad, ContextSummary


@dataclass(frozen=True)
class ResourceRead:
    """A resource, its latest version, and a summary of its context with the records if small."""

    resource: Resource
    version: ResourceVersion
    context: ContextSummary | None
    records: dict[str, Any] | None  # None when there is no context or it is not inline


@dataclass(frozen=True)
class ResourceListed:
    id: str
    version: int
    updated_at: datetime
    etl_status: EtlStatus
    context_pipeline_version: int | None


async def current_version(session: AsyncSession, resource_id: str) -> ResourceVersion | None:
    """Return the version row of the resource's latest version; None if it does not exist."""
    return await session.scalar(
        select(ResourceVersion)
        .join(Resource, is_current_version())
        .where(Resource.id == resource_id)
    )


async def read_resource(
    session: AsyncSession, resource_id: str, max_inline_records: int
) -> ResourceRead | None:
    """Return the resource with its context's records if it has at most `max_inline_records`."""
    count = ResourceContext.record_count
    row = (
        await session.execute(
            select(
                Resource,
                ResourceVersion,
                ResourceContext.version,
                ResourceContext.loaded_at,
                count,
                ResourceContext.pipeline_version,
                case((count <= max_inline_records, ALL_RECORDS)),
            )
            .join(ResourceVersion, is_current_version())
            .outerjoin(ResourceContext, ResourceContext.resource_id == Resource.id)
            .where(Resource.id == resource_id)
        )
    ).one_or_none()
    if row is None:
        return None
    resource, version, context_version, loaded_at, records_count, pipeline_version, records = row
    context = None
    if context_version is not None:
        context = ContextSummary(
            ContextLoad(context_version, loaded_at), records_count, pipeline_version
        )
    return ResourceRead(resource, version, context, records)


async def list_resources(
    session: AsyncSession,
    *,
    after: str | None,
    limit: int,
    etl_status: EtlStatus | None,
    pipeline_version_lt: int | None = None,
) -> tuple[list[ResourceListed], bool]:
    """Return up to `limit` resources in id order after the id `after`, and whether more follow.

    `pipeline_version_lt`: only those whose context was computed by an older pipeline output
    version, or an unknown one (a context loaded before versions were recorded).
    """
    query = (
        select(
            Resource.id,
            Resource.version,
            Resource.updated_at,
            ResourceVersion.etl_status,
            ResourceContext.pipeline_version,
        )
        .join(ResourceVersion, is_current_version())
        .outerjoin(ResourceContext, ResourceContext.resource_id == Resource.id)
        .order_by(Resource.id)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(Resource.id > after)
    if etl_status is not None:
        query = query.where(ResourceVersion.etl_status == etl_status)
    if pipeline_version_lt is not None:
        query = query.where(
            ResourceContext.resource_id.is_not(None),
            or_(
                ResourceContext.pipeline_version.is_(None),
                ResourceContext.pipeline_version < pipeline_version_lt,
            ),
        )
    rows = (await session.execute(query)).all()
    items = [
        ResourceListed(
            row.id, row.version, row.updated_at, EtlStatus(row.etl_status), row.pipeline_version
        )
        for row in rows[:limit]
    ]
    return items, len(rows) > limit


async def persisted_by_request(
    sessions: async_sessionmaker[AsyncSession], request_id: str
) -> tuple[Persisted, str] | None:
    """Return the version a request persisted, and the run that persisted it."""
    async with sessions() as session:
        row = (
            await session.execute(
                select(ResourceVersion, Resource.created_at)
                .join(Resource, Resource.id == ResourceVersion.resource_id)
                .where(ResourceVersion.request_id == request_id)
            )
        ).one_or_none()
    if row is None:
        return None
    version, created_at = row
    return persisted_from(version, created_at), version.etl_run_id
