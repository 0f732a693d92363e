"""JWT ids seen, shared by every replica (replay protection).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jwt_seen",
        sa.Column("key", sa.String(400), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_jwt_seen_expires_at", "jwt_seen", ["expires_at"])


def downgrade() -> None:
    op.drop_table("jwt_seen")
