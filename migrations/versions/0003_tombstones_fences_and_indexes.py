"""tombstones, load fences, claim owners and the indexes deletes need

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 03:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "resource_tombstones",
        sa.Column("resource_id", sa.Text(), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("resource_id"),
    )
    op.add_column("blob_claims", sa.Column("resource_id", sa.Text(), nullable=True))
    op.create_index(op.f("ix_blob_claims_resource_id"), "blob_claims", ["resource_id"])
    op.create_index(op.f("ix_blob_claims_digest"), "blob_claims", ["digest"])
    op.create_index(op.f("ix_resource_versions_blob_digest"), "resource_versions", ["blob_digest"])
    op.add_column("resource_contexts", sa.Column("run_id", sa.Text(), nullable=True))
    op.add_column("resource_contexts", sa.Column("record_count", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("resource_contexts", "record_count")
    op.drop_column("resource_contexts", "run_id")
    op.drop_index(op.f("ix_resource_versions_blob_digest"), table_name="resource_versions")
    op.drop_index(op.f("ix_blob_claims_digest"), table_name="blob_claims")
    op.drop_index(op.f("ix_blob_claims_resource_id"), table_name="blob_claims")
    op.drop_column("blob_claims", "resource_id")
    op.drop_table("resource_tombstones")
