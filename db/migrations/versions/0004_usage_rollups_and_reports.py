"""usage metering: hourly rollups, and the aggregates reported to Stripe's meters

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
REPORT_STATUSES = "'pending', 'sending', 'reported', 'expired', 'failed'"


def upgrade() -> None:
    op.create_table(
        "usage_report",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", BigId, nullable=False),
        sa.Column("feature", sa.String(64), nullable=False),
        sa.Column("event_name", sa.String(100), nullable=False),
        sa.Column("stripe_customer_id", sa.String(255), nullable=True),
        sa.Column("minute", UTCDateTime(), nullable=False),
        sa.Column("event_time", UTCDateTime(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("reported_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint(f"status IN ({REPORT_STATUSES})", name=op.f("ck_usage_report_status")),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_usage_report_quantity_positive")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["billing_account.id"],
            name=op.f("fk_usage_report_account_id_billing_account"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_report")),
    )
    op.create_index(
        op.f("ix_usage_report_account_id_feature_minute"), "usage_report", ["account_id", "feature", "minute"]
    )
    op.create_index(op.f("ix_usage_report_status_next_attempt_at"), "usage_report", ["status", "next_attempt_at"])

    op.create_table(
        "usage_rollup",
        sa.Column("account_id", BigId, nullable=False),
        sa.Column("feature", sa.String(64), nullable=False),
        sa.Column("hour", UTCDateTime(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("quantity >= 0", name=op.f("ck_usage_rollup_quantity_non_negative")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["billing_account.id"],
            name=op.f("fk_usage_rollup_account_id_billing_account"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", "feature", "hour", name=op.f("pk_usage_rollup")),
    )

    with op.batch_alter_table("usage_record") as batch:
        batch.add_column(sa.Column("report_id", sa.String(40), nullable=True))
        batch.create_index(batch.f("ix_usage_record_report_id_feature"), ["report_id", "feature"])
        batch.create_foreign_key(
            batch.f("fk_usage_record_report_id_usage_report"), "usage_report", ["report_id"], ["id"]
        )

    # Records written before this revision: their hourly rollups, so window sums include them.
    # (Nothing reported them to Stripe before; the reporter picks them up like new ones.)
    hour = (
        "date_trunc('hour', recorded_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        if op.get_bind().dialect.name == "postgresql"
        else "strftime('%Y-%m-%d %H:00:00.000000', recorded_at)"
    )
    op.execute(
        "INSERT INTO usage_rollup (account_id, feature, hour, quantity) "
        f"SELECT account_id, feature, {hour}, SUM(quantity) FROM usage_record "
        f"GROUP BY account_id, feature, {hour}"
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_record") as batch:
        batch.drop_constraint(batch.f("fk_usage_record_report_id_usage_report"), type_="foreignkey")
        batch.drop_index(batch.f("ix_usage_record_report_id_feature"))
        batch.drop_column("report_id")
    op.drop_table("usage_rollup")
    op.drop_table("usage_report")
