"""bulk_exports.heartbeat_at: when an export's writer last reported, so that an export whose
process stopped is answered as failed instead of running forever

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("bulk_exports", sa.Column("heartbeat_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("bulk_exports", schema=None) as batch_op:
        batch_op.drop_column("heartbeat_at")
