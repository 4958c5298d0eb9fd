"""The migrations build exactly the tables the models declare, and carry data across."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from devstack import REPO_ROOT
from tests.helpers import context_records

#: A resource at version 1, for the rows a migration carries across.
_INSERT_RESOURCE = text(
    "INSERT INTO resources (id, version, attributes, created_at, updated_at) "
    "VALUES (:id, 1, '{}', now(), now())"
)


def alembic(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), *args],
        env={**os.environ, "DATABASE_URL": database_url},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_migrated_database_matches_the_models(database_url: str) -> None:
    # `alembic check` autogenerates against the migrated database: any difference is a
    # migration someone forgot (or a model out of step with one).
    done = alembic(database_url, "check")

    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "No new upgrade operations detected" in done.stdout


@pytest.fixture
async def empty_database(database_url: str) -> AsyncIterator[str]:
    """A database of its own on the suite's server, dropped afterwards."""
    name = f"migrations_{uuid.uuid4().hex[:12]}"
    server = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    async with server.connect() as connection:
        await connection.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        async with server.connect() as connection:
            await connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
        await server.dispose()


async def test_contexts_loaded_before_record_counts_are_counted_by_the_migration(
    empty_database: str,
) -> None:
    assert alembic(empty_database, "upgrade", "0004").returncode == 0
    engine = create_async_engine(empty_database)
    async with engine.begin() as connection:
        await connection.execute(_INSERT_RESOURCE, [{"id": "r1"}])
        await connection.execute(
            text(
                "INSERT INTO resource_contexts (resource_id, version, records, loaded_at) "
                """VALUES ('r1', 1, '{"a": 1, "b.c": "x", "d": null}', now())"""
            )
        )

    done = alembic(empty_database, "upgrade", "head")

    assert done.returncode == 0, done.stderr[-3000:]
    async with engine.connect() as connection:
        count = await connection.scalar(text("SELECT record_count FROM resource_contexts"))
        nullable = await connection.scalar(
            text(
                "SELECT is_nullable FROM information_schema.columns "
                "WHERE table_name = 'resource_contexts' AND column_name = 'record_count'"
            )
        )
    await engine.dispose()
    assert (count, nullable) == (3, "NO")


async def test_contexts_loaded_whole_read_the_same_after_0007_and_come_back_on_downgrade(
    empty_database: str,
) -> None:
    # Before 0007 a load wrote the records whole (and the trigger chunked them); since, it
    # writes the chunks only. Both kinds read alike, and a downgrade makes them whole again.
    assert alembic(empty_database, "upgrade", "0006").returncode == 0
    engine = create_async_engine(empty_database)
    whole = {"a": 1, "b.c": "x"}
    chunked = {"k": True}
    insert_context = (
        "INSERT INTO resource_contexts (resource_id, version, records, loaded_at, record_count) "
        "VALUES (:id, 1, CAST(:records AS jsonb), now(), :count)"
    )
    async with engine.begin() as connection:
        await connection.execute(_INSERT_RESOURCE, [{"id": "whole"}, {"id": "chunked"}])
        await connection.execute(
            text(insert_context), {"id": "whole", "records": json.dumps(whole), "count": 2}
        )

    upgraded = alembic(empty_database, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr[-3000:]
    async with engine.begin() as connection:
        # As a load writes it now: records NULL (the trigger leaves it), its chunk beside.
        await connection.execute(
            text(insert_context), {"id": "chunked", "records": None, "count": 1}
        )
        await connection.execute(
            text("INSERT INTO resource_context_chunks VALUES ('chunked', 'k', 1, '{\"k\": true}')")
        )
    async with engine.connect() as connection:
        after = await context_records(connection, "whole", "chunked")
    assert after == {"whole": whole, "chunked": chunked}

    downgraded = alembic(empty_database, "downgrade", "0006")
    assert downgraded.returncode == 0, downgraded.stderr[-3000:]
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT resource_id, records FROM resource_contexts ORDER BY resource_id")
        )
        back = {row.resource_id: row.records for row in rows}
        chunks = await connection.scalar(text("SELECT count(*) FROM resource_context_chunks"))
    await engine.dispose()
    assert back == {"chunked": chunked, "whole": whole}
    assert chunks == 2  # each context's chunk, as the trigger of 0004 writes them
