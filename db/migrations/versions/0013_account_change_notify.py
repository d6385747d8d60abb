"""account changes notified by the database: every committed insert, update or delete of a
`billing_account` row sends `pg_notify('billing_account_changed', '<id>')` (PostgreSQL only)

The service already notified the changes it writes through `billing.sync`; this covers every other
writer too (customer links, seat counts, an operator's SQL), so the processes' account caches
(billing/account_cache.py) and live updates hear of every change. PostgreSQL delivers a
transaction's notifications once, on commit, and folds identical ones: a sync that also notifies
sends one.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return  # SQLite: one service process, told by its own writes (billing/realtime.py)
    op.execute(
        "CREATE FUNCTION billing_account_notify() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM pg_notify('billing_account_changed', "
        "(CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END)::text); RETURN NULL; END $$"
    )
    op.execute(
        "CREATE TRIGGER billing_account_notify AFTER INSERT OR UPDATE OR DELETE ON billing_account "
        "FOR EACH ROW EXECUTE FUNCTION billing_account_notify()"
    )


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER billing_account_notify ON billing_account")
    op.execute("DROP FUNCTION billing_account_notify()")
