"""resource_contexts.record_count is always set

Every load writes `record_count` since 0003; contexts loaded before it are counted
here once, so readers need no fallback that counts a context's keys on every read.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 06:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE resource_contexts SET record_count = "
        "(SELECT count(*) FROM jsonb_object_keys(records)) WHERE record_count IS NULL"
    )
    op.alter_column("resource_contexts", "record_count", nullable=False)


def downgrade() -> None:
    op.alter_column("resource_contexts", "record_count", nullable=True)
