"""deliveries.manifest_owed / manifest_run: a delivered file waits to be listed in a manifest,
and which run is writing that manifest, so a manifest that could not be written is written by a
later run and every delivered file is in exactly one manifest

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN and CREATE INDEX (no batch copy of the table: other tables
    # refer to it, and SQLite would have to drop it).
    op.add_column(
        "deliveries",
        sa.Column("manifest_owed", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("deliveries", sa.Column("manifest_run", sa.String(length=64), nullable=True))
    op.create_index("ix_deliveries_manifest_owed", "deliveries", ["manifest_owed", "manifest_run"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_manifest_owed", table_name="deliveries")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("manifest_run")
        batch_op.drop_column("manifest_owed")
