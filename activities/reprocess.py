"""Activities of the reprocessing job: which resources it re-runs, page by page."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity

from upsertflow.jobs import PageInput, ReprocessFilter, ReprocessPage
from upsertflow.store import reprocess


class ReprocessActivities:
    """Read the resources a job matches (read-only: retrying is always safe)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    @activity.defn(name="reprocess_count")
    async def count(self, where: ReprocessFilter) -> int:
        """Count the resources that match now: the job's estimate of its size."""
        return await reprocess.count_matching(self._sessions, where)

    @activity.defn(name="reprocess_page")
    async def page(self, page: PageInput) -> ReprocessPage:
        """Return the next page of matching resources after the cursor, in id order."""
        return await reprocess.matching_page(self._sessions, page.filter, page.after, page.limit)
