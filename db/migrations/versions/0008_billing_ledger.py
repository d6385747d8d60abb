"""billing ledger: the append-only history of each account's billing state, one `initial` row per
existing account; triggers refuse UPDATE and DELETE

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from db.types import UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# The account columns the ledger tracks (billing/ledger.py ACCOUNT_FIELDS), as of this revision.
TRACKED = (
    "stripe_subscription_id",
    "stripe_price_id",
    "tier",
    "interval",
    "status",
    "cancel_at_period_end",
    "pending_tier",
    "pending_interval",
    "pending_change_at",
)
REFUSAL = "billing_ledger is append-only"


def upgrade() -> None:
    ledger = op.create_table(
        "billing_ledger",
        sa.Column("id", BigId, nullable=False),
        sa.Column("account_id", BigId, nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("stripe_customer_id", sa.String(255), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("changed", Json, nullable=False),
        sa.Column("before", Json, nullable=True),
        sa.Column("after", Json, nullable=False),
        sa.Column("causes", Json, nullable=False),
        sa.Column("effective_at", UTCDateTime(), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("kind IN ('initial', 'change')", name=op.f("ck_billing_ledger_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_ledger")),
    )
    op.create_index(op.f("ix_billing_ledger_account_id_id"), "billing_ledger", ["account_id", "id"])
    op.create_index(op.f("ix_billing_ledger_effective_at"), "billing_ledger", ["effective_at"])
    _backfill(ledger)
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION billing_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{REFUSAL}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER billing_ledger_append_only BEFORE UPDATE OR DELETE ON billing_ledger "
            "FOR EACH ROW EXECUTE FUNCTION billing_ledger_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER billing_ledger_no_{action.lower()} BEFORE {action} ON billing_ledger "
                f"BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END"
            )


def _backfill(ledger: sa.Table) -> None:
    """One `initial` row per existing account: its state now, effective when it was last synced."""
    bind = op.get_bind()
    columns = ", ".join(("id", "user_id", "stripe_customer_id", "synced_at", "created_at", *TRACKED))
    rows = bind.execute(sa.text(f"SELECT {columns} FROM billing_account ORDER BY id")).mappings().all()
    now = datetime.now(UTC)
    entries = []
    for row in rows:
        after = {name: _plain(row[name]) for name in TRACKED}
        after["cancel_at_period_end"] = bool(after["cancel_at_period_end"])
        entries.append(
            {
                "account_id": row["id"],
                "user_id": row["user_id"],
                "stripe_customer_id": row["stripe_customer_id"],
                "kind": "initial",
                "changed": [],
                "before": None,
                "after": after,
                "causes": [{"type": "migration", "id": "0008"}],
                "effective_at": _aware(row["synced_at"] or row["created_at"]) or now,
                "recorded_at": now,
            }
        )
    if entries:
        op.bulk_insert(ledger, entries)


def _aware(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _plain(value: object) -> object:
    """A value as JSON holds it: times as ISO 8601 UTC text."""
    if isinstance(value, datetime) or (isinstance(value, str) and _looks_like_time(value)):
        aware = _aware(value)
        return aware.isoformat() if aware is not None else None
    return json.loads(json.dumps(value))


def _looks_like_time(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return len(value) >= 19 and value[4] == "-" and value[10] in " T"


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER billing_ledger_append_only ON billing_ledger")
        op.execute("DROP FUNCTION billing_ledger_append_only()")
    op.drop_index(op.f("ix_billing_ledger_effective_at"), table_name="billing_ledger")
    op.drop_index(op.f("ix_billing_ledger_account_id_id"), table_name="billing_ledger")
    op.drop_table("billing_ledger")
