"""invoices: payment attempts, when finalized and paid, and the metered part (revenue metrics)

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows learn their values at their invoice's next sync (`billing sync` refetches).
    with op.batch_alter_table("invoice") as batch:
        batch.add_column(sa.Column("attempt_count", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("finalized_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("paid_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("metered_amount", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("discount_amount", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("invoice") as batch:
        for name in ("discount_amount", "metered_amount", "paid_at", "finalized_at", "attempt_count"):
            batch.drop_column(name)
