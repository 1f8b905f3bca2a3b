"""Audience history of scheduled posts: one row per customer-facing send to one recipient (caps, de-dup).

Revision ID: 0008_post_touches
Revises: 0007_opt_out
Create Date: 2026-12-08 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_post_touches"
down_revision: str | None = "0007_opt_out"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types as of this revision; later model edits must not change this migration.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "post_touches",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("delivery_id", BIG_ID, nullable=False),
        sa.Column("recipient_kind", sa.String(16), nullable=False),
        sa.Column("recipient_id", sa.String(160), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("marketing", sa.Boolean(), nullable=False),
        sa.Column("sent_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_post_touches"),
        sa.UniqueConstraint(
            "delivery_id",
            "recipient_kind",
            "recipient_id",
            name="uq_post_touches_delivery_id_recipient_kind_recipient_id",
        ),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["post_deliveries.id"], name="fk_post_touches_delivery_id_post_deliveries"
        ),
    )
    op.create_index(
        "ix_post_touches_recipient_kind_recipient_id_sent_at",
        "post_touches",
        ["recipient_kind", "recipient_id", "sent_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_post_touches_recipient_kind_recipient_id_sent_at", table_name="post_touches")
    op.drop_table("post_touches")
