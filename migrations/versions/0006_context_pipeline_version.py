"""resource_contexts.pipeline_version: which pipeline's outputs a context holds

Every load records the output version of the pipeline that computed it
(`workflows.pipeline.OUTPUT_VERSION`), so stale contexts can be found and reprocessed
(`GET /resources?pipeline_version_lt=N`). Contexts loaded before stay NULL: unknown,
older than any version.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 06:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("resource_contexts", sa.Column("pipeline_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("resource_contexts", "pipeline_version")
