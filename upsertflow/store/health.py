"""Whether the database answers (for `/readyz`)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


async def ping(session: AsyncSession) -> None:
    """Run the smallest query there is; raise if the database does not answer it."""
    await session.execute(text("SELECT 1"))
