"""The async database engine and session factory.

Create them inside the event loop that uses them (the API's lifespan, the
worker's `main`): asyncpg connections belong to one loop.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from upsertflow.settings import Settings


def create_engine(settings: Settings) -> AsyncEngine:
    """Create the engine for `settings.database_url`."""
    if not settings.database_url:
        raise RuntimeError(
            "DATABASE_URL is not set: point it at PostgreSQL, or run `make dev` for an embedded one"
        )
    return create_async_engine(
        settings.database_url,
        pool_pre_ping=True,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)
