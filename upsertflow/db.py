"""The async database engine and session factory.

Create them inside the event loop that uses them (the API's lifespan, the
worker's `main`): asyncpg connections belong to one loop.

The engine hides bound parameters (`hide_parameters=True`): a database error's
text then carries no value of a resource, wherever it ends up (a log line, an
activity failure, a Temporal history). The URL's password is never in an error
or a log line: the URL is a `SecretStr` in the settings.
"""

from __future__ import annotations

import functools

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from upsertflow.settings import Settings


def create_engine(settings: Settings, *, pre_ping: bool = True) -> AsyncEngine:
    """Create the engine for `settings.database_url`.

    `pre_ping` tests each connection as it leaves the pool (a round trip per checkout),
    so that a request after a PostgreSQL restart does not fail on a dead connection. The
    worker goes without: its activities retry, and the first error on a dead connection
    invalidates the whole pool.
    """
    database_url = settings.database_url.get_secret_value()
    if not database_url:
        raise RuntimeError(
            "DATABASE_URL is not set: point it at PostgreSQL, or run `make dev` for an embedded one"
        )
    try:
        url = make_url(database_url)
    except ArgumentError:
        # SQLAlchemy's message quotes the whole URL, password included.
        raise RuntimeError(
            "DATABASE_URL is not a valid SQLAlchemy URL "
            "(expected postgresql+asyncpg://user:password@host:port/database)"
        ) from None
    return create_async_engine(
        url,
        hide_parameters=True,
        pool_pre_ping=pre_ping,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


@functools.lru_cache(maxsize=16)
def _autocommit(engine: AsyncEngine) -> AsyncEngine:
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def transactions(sessions: async_sessionmaker[AsyncSession]) -> AsyncEngine:
    """The sessions' engine, for plain SQL in a transaction (`async with ….begin()`)."""
    engine: AsyncEngine = sessions.kw["bind"]
    return engine


def single_statements(sessions: async_sessionmaker[AsyncSession]) -> AsyncEngine:
    """The sessions' engine with each statement its own transaction (no BEGIN and COMMIT
    round trips): for work that is one statement, atomic by itself."""
    return _autocommit(transactions(sessions))
