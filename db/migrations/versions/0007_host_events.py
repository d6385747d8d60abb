"""host events: the outbox of Standard Webhooks events for the host app, its attempts, its endpoint;
usage totals per quota window (usage.threshold)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.types import UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
STATUSES = "'pending', 'sending', 'delivered', 'failed'"


def upgrade() -> None:
    op.create_table(
        "host_event",
        sa.Column("id", BigId, nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("account_id", BigId, nullable=True),
        sa.Column("user_id", sa.String(255), nullable=True),
        sa.Column("dedupe_key", sa.String(320), nullable=True),
        sa.Column("payload", Json, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint(f"status IN ({STATUSES})", name=op.f("ck_host_event_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_host_event")),
        sa.UniqueConstraint("message_id", name=op.f("uq_host_event_message_id")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_host_event_dedupe_key")),
    )
    op.create_index(op.f("ix_host_event_status_next_attempt_at"), "host_event", ["status", "next_attempt_at"])
    op.create_index(op.f("ix_host_event_account_id_id"), "host_event", ["account_id", "id"])

    op.create_table(
        "host_event_attempt",
        sa.Column("id", BigId, nullable=False),
        sa.Column("event_id", BigId, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("attempted_at", UTCDateTime(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"], ["host_event.id"],
            name=op.f("fk_host_event_attempt_event_id_host_event"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_host_event_attempt")),
    )
    op.create_index(op.f("ix_host_event_attempt_event_id_id"), "host_event_attempt", ["event_id", "id"])

    op.create_table(
        "host_endpoint",
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("disabled_at", UTCDateTime(), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("url", name=op.f("pk_host_endpoint")),
    )

    op.create_table(
        "usage_window_total",
        sa.Column("account_id", BigId, nullable=False),
        sa.Column("feature", sa.String(64), nullable=False),
        sa.Column("window_start", UTCDateTime(), nullable=False),
        sa.Column("window_end", UTCDateTime(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("quantity >= 0", name=op.f("ck_usage_window_total_quantity_non_negative")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["billing_account.id"],
            name=op.f("fk_usage_window_total_account_id_billing_account"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", "feature", "window_start", name=op.f("pk_usage_window_total")),
    )


def downgrade() -> None:
    op.drop_table("usage_window_total")
    op.drop_table("host_endpoint")
    op.drop_index(op.f("ix_host_event_attempt_event_id_id"), table_name="host_event_attempt")
    op.drop_table("host_event_attempt")
    op.drop_index(op.f("ix_host_event_account_id_id"), table_name="host_event")
    op.drop_index(op.f("ix_host_event_status_next_attempt_at"), table_name="host_event")
    op.drop_table("host_event")
