"""plan changes: a pending change on the account, and plan-change quotes (proration dates)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIERS = "'none', 'starter', 'pro'"
INTERVALS = "'monthly', 'annual'"


def upgrade() -> None:
    with op.batch_alter_table("billing_account") as batch:
        batch.add_column(sa.Column("stripe_schedule_id", sa.String(255), nullable=True))
        batch.add_column(sa.Column("pending_tier", sa.String(16), nullable=True))
        batch.add_column(sa.Column("pending_interval", sa.String(16), nullable=True))
        batch.add_column(sa.Column("pending_change_at", UTCDateTime(), nullable=True))
        batch.create_check_constraint(
            op.f("ck_billing_account_pending_tier"), f"pending_tier IS NULL OR pending_tier IN ({TIERS})"
        )
        batch.create_check_constraint(
            op.f("ck_billing_account_pending_interval"),
            f"pending_interval IS NULL OR pending_interval IN ({INTERVALS})",
        )
    op.create_table(
        "plan_change_quote",
        sa.Column("account_id", BigId, nullable=False),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("interval", sa.String(16), nullable=False),
        sa.Column("stripe_subscription_id", sa.String(255), nullable=False),
        sa.Column("stripe_price_id", sa.String(255), nullable=False),
        sa.Column("proration_date", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(f"tier IN ({TIERS})", name=op.f("ck_plan_change_quote_tier")),
        sa.CheckConstraint(f"interval IN ({INTERVALS})", name=op.f("ck_plan_change_quote_interval")),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["billing_account.id"],
            name=op.f("fk_plan_change_quote_account_id_billing_account"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", "tier", "interval", name=op.f("pk_plan_change_quote")),
    )


def downgrade() -> None:
    op.drop_table("plan_change_quote")
    with op.batch_alter_table("billing_account") as batch:
        batch.drop_constraint(op.f("ck_billing_account_pending_interval"), type_="check")
        batch.drop_constraint(op.f("ck_billing_account_pending_tier"), type_="check")
        batch.drop_column("pending_change_at")
        batch.drop_column("pending_interval")
        batch.drop_column("pending_tier")
        batch.drop_column("stripe_schedule_id")
