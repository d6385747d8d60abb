"""usage_window_total: kept for every record (not only with host events), keyed by the whole
window (account, feature, window_start, window_end); rows written before are dropped

Rows kept while host events were on missed the usage recorded before they were turned on. Quota
reads use a window's row when there is one and otherwise sum the window exactly (rollups and raw
edge records), and the next record of a window creates its row from that exact sum
(billing/usage/window_totals.py), so no backfill is needed and none could be wrong.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _create(*key: str) -> None:
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
        sa.PrimaryKeyConstraint(*key, name=op.f("pk_usage_window_total")),
    )


def upgrade() -> None:
    op.drop_table("usage_window_total")
    _create("account_id", "feature", "window_start", "window_end")


def downgrade() -> None:
    op.drop_table("usage_window_total")
    _create("account_id", "feature", "window_start")
