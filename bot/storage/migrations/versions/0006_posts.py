"""Scheduled community content: posts, their targets, delivery rows per slot, group robots, mass-message tasks.

Revision ID: 0006_posts
Revises: 0005_handoff
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_posts"
down_revision: str | None = "0005_handoff"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types as of this revision; later model edits must not change this migration.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "posts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("content", JSON, nullable=False),
        sa.Column("rule_kind", sa.String(8), nullable=False),
        sa.Column("run_at", TS, nullable=True),
        sa.Column("cron", sa.String(120), nullable=True),
        sa.Column("timezone", sa.String(64), server_default="Asia/Shanghai", nullable=False),
        sa.Column("sop_plan", sa.String(64), nullable=True),
        sa.Column("sop_offset_s", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), server_default="active", nullable=False),
        sa.Column("materialised_until", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("cancelled_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_posts"),
        sa.CheckConstraint("kind IN ('text', 'markdown', 'image', 'link', 'file', 'news')", name="ck_posts_kind"),
        sa.CheckConstraint("rule_kind IN ('at', 'cron', 'sop')", name="ck_posts_rule_kind"),
        sa.CheckConstraint("status IN ('active', 'cancelled')", name="ck_posts_status"),
    )
    op.create_index("ix_posts_status", "posts", ["status"])
    op.create_table(
        "post_targets",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("post_id", BIG_ID, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(255), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_post_targets"),
        sa.UniqueConstraint("post_id", "kind", "ref", name="uq_post_targets_post_id_kind_ref"),
        sa.CheckConstraint("kind IN ('robot', 'group_chat', 'segment', 'staff')", name="ck_post_targets_kind"),
        sa.ForeignKeyConstraint(["post_id"], ["posts.id"], name="fk_post_targets_post_id_posts"),
    )
    op.create_table(
        "post_deliveries",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("post_id", BIG_ID, nullable=False),
        sa.Column("target_id", BIG_ID, nullable=False),
        sa.Column("target_kind", sa.String(16), nullable=False),
        sa.Column("slot_at", TS, nullable=False),
        sa.Column("idempotency_key", sa.String(96), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("holds", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("claimed_at", TS, nullable=True),
        sa.Column("claim_token", sa.String(32), nullable=True),
        sa.Column("call_started_at", TS, nullable=True),
        sa.Column("errcode", sa.Integer(), nullable=True),
        sa.Column("errmsg", sa.Text(), nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("task_msgid", sa.String(128), nullable=True),
        sa.Column("detail", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("sent_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_post_deliveries"),
        sa.UniqueConstraint("idempotency_key", name="uq_post_deliveries_idempotency_key"),
        sa.CheckConstraint(
            "state IN ('scheduled', 'sending', 'sent', 'failed', 'skipped', 'missed')", name="ck_post_deliveries_state"
        ),
        sa.ForeignKeyConstraint(["post_id"], ["posts.id"], name="fk_post_deliveries_post_id_posts"),
        sa.ForeignKeyConstraint(["target_id"], ["post_targets.id"], name="fk_post_deliveries_target_id_post_targets"),
    )
    op.create_index("ix_post_deliveries_state_next_attempt_at", "post_deliveries", ["state", "next_attempt_at"])
    op.create_index("ix_post_deliveries_post_id_slot_at", "post_deliveries", ["post_id", "slot_at"])
    op.create_table(
        "group_robots",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("webhook_key", sa.String(255), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_group_robots"),
        sa.UniqueConstraint("name", name="uq_group_robots_name"),
    )
    op.create_table(
        "mass_message_tasks",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("msgid", sa.String(128), nullable=False),
        sa.Column("delivery_id", BIG_ID, nullable=False),
        sa.Column("chat_id", sa.String(128), nullable=False),
        sa.Column("sender", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("checked_at", TS, nullable=True),
        sa.Column("reminded_at", TS, nullable=True),
        sa.Column("confirmed_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mass_message_tasks"),
        sa.UniqueConstraint("msgid", name="uq_mass_message_tasks_msgid"),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["post_deliveries.id"], name="fk_mass_message_tasks_delivery_id_post_deliveries"
        ),
    )
    op.create_index("ix_mass_message_tasks_chat_id_created_at", "mass_message_tasks", ["chat_id", "created_at"])
    op.create_index("ix_mass_message_tasks_status_checked_at", "mass_message_tasks", ["status", "checked_at"])


def downgrade() -> None:
    op.drop_index("ix_mass_message_tasks_status_checked_at", table_name="mass_message_tasks")
    op.drop_index("ix_mass_message_tasks_chat_id_created_at", table_name="mass_message_tasks")
    op.drop_table("mass_message_tasks")
    op.drop_table("group_robots")
    op.drop_index("ix_post_deliveries_post_id_slot_at", table_name="post_deliveries")
    op.drop_index("ix_post_deliveries_state_next_attempt_at", table_name="post_deliveries")
    op.drop_table("post_deliveries")
    op.drop_table("post_targets")
    op.drop_index("ix_posts_status", table_name="posts")
    op.drop_table("posts")
