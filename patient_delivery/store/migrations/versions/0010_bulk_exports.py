"""bulk_exports: FHIR Bulk Data exports, their state and files, until they expire

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bulk_exports",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("accessor", sa.String(length=120), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("types", sa.Text(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("request_url", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("patients_total", sa.Integer(), nullable=False),
        sa.Column("patients_done", sa.Integer(), nullable=False),
        sa.Column("transaction_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_bulk_exports_organization_id", "bulk_exports", ["organization_id"])
    op.create_index("ix_bulk_exports_expires_at", "bulk_exports", ["expires_at"])


def downgrade() -> None:
    op.drop_table("bulk_exports")
