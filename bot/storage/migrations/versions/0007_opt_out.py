"""Opt-out (退订): a customer's subscription state for marketing posts and SOP touches.

Revision ID: 0007_opt_out
Revises: 0006_posts
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_opt_out"
down_revision: str | None = "0006_posts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the model types as of this revision; later model edits must not change this migration.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "customer_subscriptions",
        sa.Column("customer_id", BIG_ID, nullable=False),
        sa.Column("opted_out", sa.Boolean(), nullable=False),
        sa.Column("changed_at", TS, nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", name="pk_customer_subscriptions"),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name="fk_customer_subscriptions_customer_id_customers"
        ),
    )


def downgrade() -> None:
    op.drop_table("customer_subscriptions")
