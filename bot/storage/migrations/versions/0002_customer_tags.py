"""Customer tag model: imported orders and customer tags (wecom, computed, bot).

Revision ID: 0002_customer_tags
Revises: 0001_initial
Create Date: 2025-02-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_customer_tags"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types as of this revision; later model edits must not change this migration.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("customer_id", BIG_ID, nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("external_order_id", sa.String(128), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("paid_at", TS, nullable=False),
        sa.Column("imported_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_orders"),
        sa.UniqueConstraint("source", "external_order_id", name="uq_orders_source_external_order_id"),
        sa.CheckConstraint("amount_cents >= 0", name="ck_orders_amount_not_negative"),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"], name="fk_orders_customer_id_customers"),
    )
    op.create_index("ix_orders_customer_id_paid_at", "orders", ["customer_id", "paid_at"])
    op.create_index("ix_orders_imported_at", "orders", ["imported_at"])
    op.create_table(
        "customer_tags",
        sa.Column("customer_id", BIG_ID, nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("set_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("customer_id", "tag", "source", name="pk_customer_tags"),
        sa.CheckConstraint("source IN ('wecom', 'computed', 'bot')", name="ck_customer_tags_source"),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"], name="fk_customer_tags_customer_id_customers"),
    )
    op.create_index("ix_customer_tags_tag", "customer_tags", ["tag"])


def downgrade() -> None:
    op.drop_table("customer_tags")
    op.drop_table("orders")
