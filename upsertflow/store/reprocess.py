"""The resources a reprocessing job re-runs the ETL of: pages in id order, and a count."""

from __future__ import annotations

from typing import TypeVarTuple

from sqlalchemy import Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from upsertflow.contracts import EtlStatus
from upsertflow.jobs import ReprocessFilter, ReprocessItem, ReprocessPage
from upsertflow.models import Resource, ResourceContext, ResourceVersion, is_current_version

_T = TypeVarTuple("_T")


def _matching(query: Select[*_T], where: ReprocessFilter) -> Select[*_T]:
    """`query` over resources joined to their current version, narrowed by the filter."""
    query = query.select_from(Resource).join(ResourceVersion, is_current_version())
    if where.etl_status is not None:
        query = query.where(ResourceVersion.etl_status == where.etl_status)
    if where.pipeline_version_lt is not None:
        # As `GET /resources?pipeline_version_lt=` (`store.resources.list_resources`): a
        # context from before versions were recorded is older than any; no context, no match.
        query = query.join(ResourceContext, ResourceContext.resource_id == Resource.id).where(
            or_(
                ResourceContext.pipeline_version.is_(None),
                ResourceContext.pipeline_version < where.pipeline_version_lt,
            )
        )
    if where.id_prefix is not None:
        query = query.where(Resource.id.startswith(where.id_prefix, autoescape=True))
    return query


async def matching_page(
    sessions: async_sessionmaker[AsyncSession],
    where: ReprocessFilter,
    after: str | None,
    limit: int,
) -> ReprocessPage:
    """Up to `limit` matching resources with ids after `after`, in id order."""
    query = _matching(
        select(
            Resource.id,
            Resource.version,
            ResourceVersion.blob_digest,
            ResourceVersion.etl_status,
            ResourceVersion.etl_run_id,
        ),
        where,
    )
    if after is not None:
        query = query.where(Resource.id > after)
    async with sessions() as session:
        rows = (await session.execute(query.order_by(Resource.id).limit(limit + 1))).all()
    items = [
        ReprocessItem(
            resource_id=row.id,
            version=row.version,
            info_digest=row.blob_digest,
            etl_status=EtlStatus(row.etl_status),
            etl_run_id=row.etl_run_id,
        )
        for row in rows[:limit]
    ]
    return ReprocessPage(items=items, more=len(rows) > limit)


async def count_matching(sessions: async_sessionmaker[AsyncSession], where: ReprocessFilter) -> int:
    """How many resources match now."""
    async with sessions() as session:
        return await session.scalar(_matching(select(func.count()), where)) or 0
