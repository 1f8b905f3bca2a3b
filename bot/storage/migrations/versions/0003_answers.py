"""Scripted answers: which script and variant answered which message, for analytics and cooldowns.

Revision ID: 0003_answers
Revises: 0002_customer_tags
Create Date: 2025-03-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_answers"
down_revision: str | None = "0002_customer_tags"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types as of this revision; later model edits must not change this migration.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "answers",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("inbound_message_id", BIG_ID, nullable=False),
        sa.Column("customer_id", BIG_ID, nullable=True),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("script_id", sa.String(128), nullable=False),
        sa.Column("variant", sa.String(128), nullable=False),
        sa.Column("assignment", sa.String(16), nullable=False),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("replies", sa.Integer(), nullable=False),
        sa.Column("answered_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_answers"),
        sa.UniqueConstraint("inbound_message_id", "script_id", name="uq_answers_inbound_message_id_script_id"),
        sa.ForeignKeyConstraint(
            ["inbound_message_id"], ["messages.id"], name="fk_answers_inbound_message_id_messages"
        ),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"], name="fk_answers_customer_id_customers"),
    )
    op.create_index(
        "ix_answers_customer_id_script_id_answered_at", "answers", ["customer_id", "script_id", "answered_at"]
    )
    op.create_index("ix_answers_script_id_variant", "answers", ["script_id", "variant"])


def downgrade() -> None:
    op.drop_table("answers")
