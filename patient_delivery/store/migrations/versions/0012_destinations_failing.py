"""destinations_failing: destinations a run delivered nothing to and failed at, kept until a
run delivers to them again, so that their later failures are known trouble, not new

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "destinations_failing",
        sa.Column("destination", sa.String(255), primary_key=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_run", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text()),
    )


def downgrade() -> None:
    op.drop_table("destinations_failing")
