"""A hook call remembers the EHR tenant its JWT named (the ``tenant`` claim, CDS Hooks 3.0), so
that a service shared by several EHR tenants can tell their calls apart in the audit.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("hook_call", sa.Column("tenant", sa.String(200), nullable=True))
    op.create_index("ix_hook_call_tenant", "hook_call", ["tenant"])


def downgrade() -> None:
    op.drop_index("ix_hook_call_tenant", table_name="hook_call")
    op.drop_column("hook_call", "tenant")
