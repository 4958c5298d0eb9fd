"""resource context chunks: a context in path order, 1,000 records a row

`GET /resources/{id}/context` pages a context in path order. Cut from the one
`resource_contexts.records` object, every page would cost as much as the whole
context (PostgreSQL expands and sorts all its records). So each context is also
kept in chunks: its records in path order (`COLLATE "C"`), 1,000 a row, keyed by
the last path of the chunk. A page reads the few chunks it needs.

A trigger writes them whenever a context is written: whoever loads a context
needs to know nothing about them, and they always agree with `records` (same
transaction). Deleting a context deletes its chunks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 04:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The chunks of a context's `records`: numbered in path order, grouped 1,000 to a chunk.
_CHUNKS = """
    SELECT max(key), count(*), jsonb_object_agg(key, value)
    FROM (
        SELECT record.key COLLATE "C" AS key, record.value,
               (row_number() OVER (ORDER BY record.key COLLATE "C") - 1) / 1000 AS chunk
        FROM jsonb_each({records}) AS record
    ) AS numbered
    GROUP BY chunk
"""


def upgrade() -> None:
    op.create_table(
        "resource_context_chunks",
        sa.Column("resource_id", sa.Text(), nullable=False),
        sa.Column("last_path", sa.Text(collation="C"), nullable=False),
        sa.Column("record_count", sa.Integer(), nullable=False),
        sa.Column("records", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.ForeignKeyConstraint(
            ["resource_id"], ["resource_contexts.resource_id"], ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("resource_id", "last_path"),
    )
    op.execute(
        f"""
        CREATE FUNCTION chunk_resource_context() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM resource_context_chunks WHERE resource_id = NEW.resource_id;
            INSERT INTO resource_context_chunks (resource_id, last_path, record_count, records)
            SELECT NEW.resource_id, chunk.* FROM ({_CHUNKS.format(records="NEW.records")}) AS chunk;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER resource_contexts_chunk
        AFTER INSERT OR UPDATE OF records ON resource_contexts
        FOR EACH ROW EXECUTE FUNCTION chunk_resource_context()
        """
    )
    # The contexts loaded before.
    op.execute(
        f"""
        INSERT INTO resource_context_chunks (resource_id, last_path, record_count, records)
        SELECT context.resource_id, chunk.*
        FROM resource_contexts AS context
        CROSS JOIN LATERAL ({_CHUNKS.format(records="context.records")}) AS chunk
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER resource_contexts_chunk ON resource_contexts")
    op.execute("DROP FUNCTION chunk_resource_context()")
    op.drop_table("resource_context_chunks")
