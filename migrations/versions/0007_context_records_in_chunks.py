"""resource contexts: the records in their chunks only, written by the load

A load used to write a context's records twice: as one `jsonb` object
(`resource_contexts.records`) and, through the trigger of 0004, again as chunks
cut by PostgreSQL (expanding, sorting and re-aggregating every record). For a
5 MiB input that statement took ~0.9 s, the largest part of the ETL. Every
reader pages the chunks already (0004), and the one that read the whole object,
`GET /resources/{id}` with a small context inline, reads its chunk instead.

So a load now writes the chunks itself, cut by the worker in path order, and
leaves `records` NULL. The trigger stays for whatever still writes `records`
(a worker of the version before, during a rolling deploy): a row written with
records is chunked as before, one written without is not touched.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 14:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TRIGGER = """
    CREATE TRIGGER resource_contexts_chunk
    AFTER INSERT OR UPDATE OF records ON resource_contexts
    FOR EACH ROW {when} EXECUTE FUNCTION chunk_resource_context()
"""


def upgrade() -> None:
    op.alter_column("resource_contexts", "records", nullable=True)
    op.execute("DROP TRIGGER resource_contexts_chunk ON resource_contexts")
    op.execute(_TRIGGER.format(when="WHEN (NEW.records IS NOT NULL)"))


def downgrade() -> None:
    op.execute("DROP TRIGGER resource_contexts_chunk ON resource_contexts")
    op.execute(_TRIGGER.format(when=""))
    # The contexts loaded in chunks only get their records back (and are chunked again).
    op.execute(
        """
        UPDATE resource_contexts AS context SET records = coalesce((
            SELECT jsonb_object_agg(record.key, record.value)
            FROM resource_context_chunks AS chunk
            CROSS JOIN LATERAL jsonb_each(chunk.records) AS record
            WHERE chunk.resource_id = context.resource_id), '{}')
        WHERE context.records IS NULL
        """
    )
    op.alter_column("resource_contexts", "records", nullable=False)
