"""Sessions of the SMART app (/app/): in the database, so that every worker and replica sees
them. The browser holds a random id; the row holds its hash, the OAuth state and PKCE verifier
until the code is exchanged, and then what the EHR granted, encrypted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "app_session",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(64), nullable=True),
        sa.Column("verifier", sa.String(128), nullable=True),
        sa.Column("iss", sa.String(2000), nullable=False),
        sa.Column("token_endpoint", sa.String(2000), nullable=False),
        sa.Column("redirect_uri", sa.String(2000), nullable=False),
        sa.Column("granted", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_app_session_expires_at", "app_session", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_app_session_expires_at", table_name="app_session")
    op.drop_table("app_session")
