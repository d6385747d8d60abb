"""billing owners: an account belongs to a user or an organisation (`owner_kind`, the owner key
in `user_id`); today's accounts become user-owned; `seats`, the licensed quantity

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNER = (
    "(owner_kind = 'organization' AND substr(user_id, 1, 4) = 'org:') OR "
    "(owner_kind = 'user' AND substr(user_id, 1, 4) <> 'org:')"
)


def upgrade() -> None:
    # `org:` now starts an organisation's owner key: a user id that starts with it cannot be kept
    # as a user's. Refuse before changing anything, naming how many and the way out.
    taken = op.get_bind().execute(
        sa.text("SELECT count(*) FROM billing_account WHERE substr(user_id, 1, 4) = 'org:'")
    ).scalar_one()
    if taken:
        raise RuntimeError(
            f"migration 0012: {taken} billing_account row(s) have a user_id starting with 'org:', "
            "which now names an organisation's account; rename those users' ids (user_id) first"
        )
    with op.batch_alter_table("billing_account") as batch:
        # Every existing row gets the server default: a user-owned account, answering as before.
        batch.add_column(sa.Column("owner_kind", sa.String(16), nullable=False, server_default="user"))
        batch.add_column(sa.Column("seats", sa.Integer(), nullable=True))
        batch.create_check_constraint(op.f("ck_billing_account_owner"), OWNER)


def downgrade() -> None:
    with op.batch_alter_table("billing_account") as batch:
        batch.drop_constraint(op.f("ck_billing_account_owner"), type_="check")
        batch.drop_column("seats")
        batch.drop_column("owner_kind")
