"""Cards remember which draft order they were about (a keyed hash), so that the report can tell
a card replaced by a later call for the same order (superseded) from one left alone (ignored).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("card", sa.Column("order_hash", sa.String(64), nullable=True))
    op.create_index("ix_card_order_hash", "card", ["order_hash"])


def downgrade() -> None:
    op.drop_index("ix_card_order_hash", table_name="card")
    op.drop_column("card", "order_hash")
