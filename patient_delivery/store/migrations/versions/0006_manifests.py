"""manifests: what each run's drop to a destination holds, written there last

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "manifests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=255), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("documents", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("manifests", schema=None) as batch_op:
        batch_op.create_index("ix_manifests_run", ["flow_run_id"])


def downgrade() -> None:
    with op.batch_alter_table("manifests", schema=None) as batch_op:
        batch_op.drop_index("ix_manifests_run")
    op.drop_table("manifests")
