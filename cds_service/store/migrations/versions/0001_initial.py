"""Audit of hook calls, cards shown, and feedback.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hook_call",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("service_id", sa.String(100), nullable=False),
        sa.Column("hook", sa.String(40), nullable=False),
        sa.Column("hook_instance", sa.String(100), nullable=False),
        sa.Column("patient_hash", sa.String(64), nullable=False),
        sa.Column("scenario", sa.String(40), nullable=True),
        sa.Column("orders", sa.JSON, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
    )
    for col in ("created_at", "service_id", "hook_instance", "patient_hash"):
        op.create_index(f"ix_hook_call_{col}", "hook_call", [col])
    op.create_table(
        "card",
        sa.Column("uuid", sa.String(64), primary_key=True),
        sa.Column("hook_call_id", sa.String(36),
                  sa.ForeignKey("hook_call.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("service_id", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("indicator", sa.String(20), nullable=False),
        sa.Column("procedure", sa.String(40), nullable=False),
        sa.Column("pama", sa.String(40), nullable=True),
        sa.Column("category", sa.String(20), nullable=True),
        sa.Column("suggestions", sa.JSON, nullable=False),
    )
    for col in ("hook_call_id", "created_at", "service_id"):
        op.create_index(f"ix_card_{col}", "card", [col])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("card_uuid", sa.String(100), nullable=False),
        sa.Column("known_card", sa.Boolean, nullable=False),
        sa.Column("service_id", sa.String(100), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("accepted_suggestions", sa.JSON, nullable=False),
        sa.Column("override_system", sa.String(300), nullable=True),
        sa.Column("override_code", sa.String(100), nullable=True),
        sa.Column("override_display", sa.String(300), nullable=True),
        sa.Column("user_comment", sa.Text, nullable=True),
        sa.Column("outcome_timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("card_uuid", "outcome", "outcome_timestamp",
                            name="uq_feedback_item"),
    )
    op.create_index("ix_feedback_card_uuid", "feedback", ["card_uuid"])
    op.create_index("ix_feedback_service_id", "feedback", ["service_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("card")
    op.drop_table("hook_call")
