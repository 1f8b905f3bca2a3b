"""Handoff: agent profiles, conversation assignment, SLA clocks and events, satisfaction surveys.

Revision ID: 0005_handoff
Revises: 0004_staff_and_script_revisions
Create Date: 2026-11-23 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005_handoff"
down_revision: str | None = "0004_staff_and_script_revisions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types as of this revision; later model edits must not change this migration.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("staff_users", sa.Column("skills", JSON, server_default="[]", nullable=False))
    op.add_column("staff_users", sa.Column("capacity", sa.Integer(), server_default="5", nullable=False))
    op.add_column("staff_users", sa.Column("presence", sa.String(16), server_default="offline", nullable=False))
    op.add_column("staff_users", sa.Column("presence_at", TS, nullable=True))
    op.add_column("staff_users", sa.Column("last_assigned_at", TS, nullable=True))

    op.add_column("customers", sa.Column("last_agent_id", BIG_ID, nullable=True))

    op.add_column("conversations", sa.Column("assignee_id", BIG_ID, nullable=True))
    op.add_column("conversations", sa.Column("team", sa.String(64), nullable=True))
    op.add_column("conversations", sa.Column("priority", sa.String(16), server_default="normal", nullable=False))
    op.add_column("conversations", sa.Column("handoff_reason", sa.String(32), nullable=True))
    op.add_column("conversations", sa.Column("handoff_at", TS, nullable=True))
    op.add_column("conversations", sa.Column("queued_at", TS, nullable=True))
    op.add_column("conversations", sa.Column("assigned_at", TS, nullable=True))
    op.add_column("conversations", sa.Column("resolved_at", TS, nullable=True))
    op.add_column("conversations", sa.Column("no_match_streak", sa.Integer(), server_default="0", nullable=False))
    op.add_column("conversations", sa.Column("version", sa.Integer(), server_default="0", nullable=False))
    op.create_index("ix_conversations_status_team", "conversations", ["status", "team"])
    op.create_index("ix_conversations_assignee_id_status", "conversations", ["assignee_id", "status"])

    op.create_table(
        "sla_clocks",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("conversation_id", BIG_ID, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("cycle", sa.Integer(), nullable=False),
        sa.Column("policy_id", sa.String(64), nullable=False),
        sa.Column("target_seconds", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ladder", JSON, nullable=False),
        sa.Column("reached", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("next_deadline", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sla_clocks"),
        sa.UniqueConstraint("conversation_id", "kind", "cycle", name="uq_sla_clocks_conversation_id_kind_cycle"),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversations.id"], name="fk_sla_clocks_conversation_id_conversations"
        ),
    )
    op.create_index("ix_sla_clocks_status_next_deadline", "sla_clocks", ["status", "next_deadline"])
    op.create_table(
        "sla_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("conversation_id", BIG_ID, nullable=False),
        sa.Column("clock", sa.String(32), nullable=False),
        sa.Column("cycle", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("due_at", sa.Float(), nullable=False),
        sa.Column("met", sa.Boolean(), nullable=True),
        sa.Column("recorded_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sla_events"),
        sa.UniqueConstraint(
            "conversation_id",
            "clock",
            "cycle",
            "kind",
            "level",
            name="uq_sla_events_conversation_id_clock_cycle_kind_level",
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversations.id"], name="fk_sla_events_conversation_id_conversations"
        ),
    )
    op.create_index("ix_sla_events_at", "sla_events", ["at"])
    op.create_table(
        "csat_surveys",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("conversation_id", BIG_ID, nullable=False),
        sa.Column("agent_id", BIG_ID, nullable=True),
        sa.Column("asked_at", TS, nullable=False),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("answered_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_csat_surveys"),
        sa.UniqueConstraint("conversation_id", name="uq_csat_surveys_conversation_id"),
        sa.CheckConstraint("score BETWEEN 1 AND 5", name="ck_csat_surveys_score"),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversations.id"], name="fk_csat_surveys_conversation_id_conversations"
        ),
    )


def downgrade() -> None:
    op.drop_table("csat_surveys")
    op.drop_index("ix_sla_events_at", table_name="sla_events")
    op.drop_table("sla_events")
    op.drop_index("ix_sla_clocks_status_next_deadline", table_name="sla_clocks")
    op.drop_table("sla_clocks")
    op.drop_index("ix_conversations_assignee_id_status", table_name="conversations")
    op.drop_index("ix_conversations_status_team", table_name="conversations")
    with op.batch_alter_table("conversations") as batch:
        for column in (
            "version",
            "no_match_streak",
            "resolved_at",
            "assigned_at",
            "queued_at",
            "handoff_at",
            "handoff_reason",
            "priority",
            "team",
            "assignee_id",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("customers") as batch:
        batch.drop_column("last_agent_id")
    with op.batch_alter_table("staff_users") as batch:
        for column in ("last_assigned_at", "presence_at", "presence", "capacity", "skills"):
            batch.drop_column(column)
