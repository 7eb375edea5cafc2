"""destinations down: how many runs in a row failed at a destination, and which waits end at
a time (a block that cannot be used) and which when a probe reaches the destination (down)

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "destinations_failing",
        sa.Column("runs", sa.Integer(), nullable=False, server_default="1"),
    )
    op.add_column(
        "destinations_waiting",
        sa.Column("kind", sa.String(16), nullable=False, server_default="unusable"),
    )


def downgrade() -> None:
    with op.batch_alter_table("destinations_waiting") as table:
        table.drop_column("kind")
    with op.batch_alter_table("destinations_failing") as table:
        table.drop_column("runs")
