"""initial tables: billing accounts, usage records, Stripe event inbox

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.types import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
STATUSES = "'none', 'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled', 'unpaid', 'paused'"


def upgrade() -> None:
    op.create_table(
        "billing_account",
        sa.Column("id", BigId, nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("email", sa.String(320), nullable=True),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("stripe_customer_id", sa.String(255), nullable=True),
        sa.Column("stripe_subscription_id", sa.String(255), nullable=True),
        sa.Column("stripe_price_id", sa.String(255), nullable=True),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("interval", sa.String(16), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("current_period_start", UTCDateTime(), nullable=True),
        sa.Column("current_period_end", UTCDateTime(), nullable=True),
        sa.Column("trial_end", UTCDateTime(), nullable=True),
        sa.Column("cancel_at_period_end", sa.Boolean(), nullable=False),
        sa.Column("canceled_at", UTCDateTime(), nullable=True),
        sa.Column("trial_used", sa.Boolean(), nullable=False),
        sa.Column("synced_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("interval IS NULL OR interval IN ('monthly', 'annual')", name=op.f("ck_billing_account_interval")),
        sa.CheckConstraint(f"status IN ({STATUSES})", name=op.f("ck_billing_account_status")),
        sa.CheckConstraint("tier IN ('none', 'starter', 'pro')", name=op.f("ck_billing_account_tier")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_account")),
        sa.UniqueConstraint("stripe_customer_id", name=op.f("uq_billing_account_stripe_customer_id")),
        sa.UniqueConstraint("stripe_subscription_id", name=op.f("uq_billing_account_stripe_subscription_id")),
        sa.UniqueConstraint("user_id", name=op.f("uq_billing_account_user_id")),
    )
    op.create_table(
        "stripe_event",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("stripe_created", UTCDateTime(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("payload", Json, nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'processed', 'ignored', 'failed')",
            name=op.f("ck_stripe_event_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_event")),
    )
    op.create_index(op.f("ix_stripe_event_status_next_attempt_at"), "stripe_event", ["status", "next_attempt_at"])
    op.create_table(
        "usage_record",
        sa.Column("id", BigId, nullable=False),
        sa.Column("account_id", BigId, nullable=False),
        sa.Column("feature", sa.String(64), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("reported_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_usage_record_quantity_positive")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["billing_account.id"],
            name=op.f("fk_usage_record_account_id_billing_account"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_record")),
        sa.UniqueConstraint("account_id", "idempotency_key", name=op.f("uq_usage_record_account_id_idempotency_key")),
    )
    op.create_index(
        op.f("ix_usage_record_account_id_feature_recorded_at"), "usage_record", ["account_id", "feature", "recorded_at"]
    )
    op.create_index(op.f("ix_usage_record_reported_at_recorded_at"), "usage_record", ["reported_at", "recorded_at"])


def downgrade() -> None:
    op.drop_table("usage_record")
    op.drop_table("stripe_event")
    op.drop_table("billing_account")
