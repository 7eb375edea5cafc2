"""disclosures: an append-only record of every send

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "disclosures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=255), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("data_type", sa.String(length=16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("purpose", sa.String(length=200), nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("disclosed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["delivery_id"], ["deliveries.id"]),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
        sa.ForeignKeyConstraint(["patient_id"], ["patients.id"]),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"]),
        sa.ForeignKeyConstraint(["version_id"], ["document_versions.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("disclosures", schema=None) as batch_op:
        batch_op.create_index("ix_disclosures_patient", ["patient_id", "disclosed_at"])
        batch_op.create_index(batch_op.f("ix_disclosures_delivery_id"), ["delivery_id"])
    # What was delivered before this table existed becomes its first disclosures.
    op.execute(
        "INSERT INTO disclosures (delivery_id, patient_id, organization_id, project_id, "
        "destination, version_id, data_type, path, sha256, size, purpose, flow_run_id, "
        "disclosed_at) SELECT id, patient_id, organization_id, project_id, destination, "
        "version_id, data_type, path, sha256, size, purpose, flow_run_id, delivered_at "
        "FROM deliveries WHERE status = 'delivered' AND delivered_at IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("disclosures", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_disclosures_delivery_id"))
        batch_op.drop_index("ix_disclosures_patient")
    op.drop_table("disclosures")
