"""A user's Stripe customer: get or create it exactly once, keep its email and name in step.

One user has one `billing_account` row and at most one live Stripe customer, however many
requests race to create it:

1. The customer is created with a deterministic idempotency key: the user, the *generation* of
   their account (`new` before any row exists, else the row's `updated_at` at the moment it had
   no customer; `customer.deleted` unlinks the customer and moves `updated_at`, so the next key
   differs and a new customer is made) and the request's parameters. Concurrent requests for
   the same user send the same key and get Stripe's replay of one customer; a retry after a
   lost response (the SDK's, or the user's next click) gets the same customer too.
2. Only then is the database written, in one short transaction: `INSERT ... ON CONFLICT
   (user_id) DO NOTHING`, then `stripe_customer_id` is set only where it is still NULL, then
   the linked id is read back. The first link wins; a customer that lost (different parameters
   raced) is deleted again, best effort. A Stripe failure therefore leaves the database as it
   was: no account row without its customer, no transaction open across the Stripe call.

The email and name of the user's token are the truth: when they differ from the account row,
the Stripe customer and the row are updated (a token without an email or name changes nothing).

Subscription state (status, tier, periods, trial) is never written here: that is
`billing.sync.sync_customer`'s job alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import stripe
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from stripe.params import CustomerCreateParams, CustomerCreateParamsInvoiceSettings, CustomerUpdateParams

from billing.clock import Clock, utcnow
from billing.customer_locks import CustomerLocks
from billing.errors import BillingError, ErrorCode
from billing.ledger import MUTATION
from billing.owners import customer_metadata, owner_columns
from billing.plans import Catalog
from billing.realtime import publish_account_change
from billing.stripe_gateway import StripeGateway, idempotency_key
from billing.sync import sync_customer
from db.engine import Database
from db.models import account_table, invoice_table

log = logging.getLogger("billing.customers")

MAX_INVOICES = 100


class Identity(Protocol):
    """Who the customer is for: the signed-in user (`graph.auth.User` is one), or an organisation
    (`id` is then its owner key, billing/owners.py)."""

    @property
    def id(self) -> str: ...

    @property
    def email(self) -> str | None: ...

    @property
    def name(self) -> str | None: ...


# Get or create ------------------------------------------------------------------------------


async def get_or_create_customer(
    *,
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    catalog: Catalog,
    user: Identity,
    clock: Clock = utcnow,
) -> str:
    """The Stripe customer id of `user`, created (once) if they have none.

    An existing customer's email and name are brought in line with `user` first. A linked
    customer that Stripe has deleted (the webhook not yet applied) is unlinked through the sync
    and replaced by a new one.
    """
    for _attempt in range(2):
        row = await _account(database, user.id)
        if row is None or row.stripe_customer_id is None:
            return await _create_and_link(database, gateway, catalog, user, row, clock)
        customer_id: str = row.stripe_customer_id
        try:
            await _keep_identity(database, gateway, user, row, clock)
        except BillingError as exc:
            if not is_missing(exc):
                raise
            result = await sync_customer(
                database=database,
                gateway=gateway,
                locks=locks,
                customer_id=customer_id,
                now=clock(),
                cause=MUTATION,
            )
            if not result.customer_deleted:
                raise
            continue  # unlinked: the next pass creates a new customer with a new key
        return customer_id
    raise BillingError(
        "The billing account changed while it was being set up; try again.",
        code=ErrorCode.BILLING_PROVIDER_UNAVAILABLE,
    )


async def existing_customer(
    *, database: Database, gateway: StripeGateway, user: Identity, clock: Clock = utcnow
) -> str | None:
    """The user's linked customer id (email and name kept in step), or None when they have none."""
    row = await _account(database, user.id)
    if row is None or row.stripe_customer_id is None:
        return None
    try:
        await _keep_identity(database, gateway, user, row, clock)
    except BillingError as exc:
        if is_missing(exc):
            return None  # deleted in Stripe; the customer.deleted webhook unlinks it
        raise
    return str(row.stripe_customer_id)


async def linked_customer(database: Database, user_id: str) -> str | None:
    """The user's customer id as the database knows it (no Stripe call)."""
    row = await _account(database, user_id)
    return None if row is None or row.stripe_customer_id is None else str(row.stripe_customer_id)


def customer_params(user: Identity, catalog: Catalog) -> CustomerCreateParams:
    """A new customer: the user's id in metadata, their email and name, the invoice settings."""
    params: CustomerCreateParams = {"metadata": customer_metadata(user.id)}  # userId or orgId
    if user.email:
        params["email"] = user.email
    if user.name:
        params["name"] = user.name
    invoice: CustomerCreateParamsInvoiceSettings = {}
    if catalog.invoice.footer:
        invoice["footer"] = catalog.invoice.footer
    if catalog.invoice.custom_fields:
        invoice["custom_fields"] = [
            {"name": name, "value": value} for name, value in catalog.invoice.custom_fields
        ]
    if invoice:
        params["invoice_settings"] = invoice
    return params


def is_missing(exc: BillingError) -> bool:
    """Stripe said the object does not exist (or, for a customer, was deleted)."""
    return exc.extensions.get("stripe_code") == "resource_missing"


def missing_param(exc: BillingError) -> str | None:
    """The request parameter that named a missing object, when Stripe said which."""
    cause = exc.__cause__
    if is_missing(exc) and isinstance(cause, stripe.InvalidRequestError):
        param = cause.param
        return None if param is None else str(param)
    return None


async def _create_and_link(
    database: Database,
    gateway: StripeGateway,
    catalog: Catalog,
    user: Identity,
    row: Any,
    clock: Clock,
) -> str:
    params = customer_params(user, catalog)
    generation = "new" if row is None else row.updated_at.isoformat()
    key = idempotency_key("customer", user.id, generation, json.dumps(params, sort_keys=True))
    customer = await gateway.call(
        lambda o: gateway.v1.customers.create_async(params, o), idempotency_key=key, what="create customer"
    )
    now = clock()
    insert = (postgresql.insert if database.is_postgres else sqlite.insert)(account_table)
    async with database.write() as conn:
        await conn.execute(
            insert.values(
                **owner_columns(user.id),
                email=user.email,
                name=user.name,
                stripe_customer_id=customer.id,
                created_at=now,
                updated_at=now,
            ).on_conflict_do_nothing(index_elements=["user_id"])
        )
        await conn.execute(
            update(account_table)
            .where(account_table.c.user_id == user.id, account_table.c.stripe_customer_id.is_(None))
            .values(
                stripe_customer_id=customer.id,
                email=user.email or account_table.c.email,
                name=user.name or account_table.c.name,
                updated_at=now,
            )
        )
        account_id, linked = (
            await conn.execute(
                select(account_table.c.id, account_table.c.stripe_customer_id).where(
                    account_table.c.user_id == user.id
                )
            )
        ).one()
        await publish_account_change(conn, database, account_id)
    if linked is None:  # pragma: no cover - the statements above always link or find a link
        raise RuntimeError(f"account {user.id} has no customer after linking")
    if linked != customer.id:
        await _discard(gateway, customer.id, kept=linked, user_id=user.id)
    return str(linked)


async def _discard(gateway: StripeGateway, customer_id: str, *, kept: str | None, user_id: str) -> None:
    """A customer that lost the race to be linked: delete it so Stripe holds one per user."""
    log.warning("user %s: customer %s lost the link to %s; deleting it", user_id, customer_id, kept)
    try:
        await gateway.call(
            lambda o: gateway.v1.customers.delete_async(customer_id, None, o), what="delete spare customer"
        )
    except BillingError as exc:
        if not is_missing(exc):  # already deleted by a concurrent loser
            log.error("user %s: could not delete spare customer %s: %s", user_id, customer_id, exc.message)


async def _keep_identity(
    database: Database, gateway: StripeGateway, user: Identity, row: Any, clock: Clock
) -> None:
    """Bring the Stripe customer and the row in line with the token's email and name."""
    changes: CustomerUpdateParams = {}
    if user.email and user.email != row.email:
        changes["email"] = user.email
    if user.name and user.name != row.name:
        changes["name"] = user.name
    if not changes:
        return
    customer_id: str = row.stripe_customer_id
    await gateway.call(
        lambda o: gateway.v1.customers.update_async(customer_id, changes, o), what="update customer"
    )
    async with database.write() as conn:
        changed = await conn.execute(
            update(account_table)
            .where(account_table.c.user_id == user.id, account_table.c.stripe_customer_id == customer_id)
            .values(**changes, updated_at=clock())
            .returning(account_table.c.id)
        )
        for (account_id,) in changed.all():
            await publish_account_change(conn, database, account_id)


async def _account(database: Database, user_id: str) -> Any:
    async with database.read() as conn:
        query = select(
            account_table.c.user_id,
            account_table.c.email,
            account_table.c.name,
            account_table.c.stripe_customer_id,
            account_table.c.trial_used,
            account_table.c.updated_at,
        ).where(account_table.c.user_id == user_id)
        return (await conn.execute(query)).first()


# Invoices -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvoiceRecord:
    """One invoice of the user's customer, as the webhook sync stored it."""

    id: str
    number: str | None
    status: str
    amount_due: int
    amount_paid: int
    total: int
    currency: str
    hosted_invoice_url: str | None
    invoice_pdf: str | None
    period_start: datetime | None
    period_end: datetime | None
    created: datetime

    @classmethod
    def from_row(cls, row: Any) -> InvoiceRecord:
        return cls(
            id=row.id,
            number=row.number,
            status=row.status,
            amount_due=int(row.amount_due),
            amount_paid=int(row.amount_paid),
            total=int(row.total),
            currency=row.currency,
            hosted_invoice_url=row.hosted_invoice_url,
            invoice_pdf=row.invoice_pdf,
            period_start=row.period_start,
            period_end=row.period_end,
            created=row.created,
        )


async def list_invoices(database: Database, *, user_id: str, first: int = 10) -> list[InvoiceRecord]:
    """The user's newest invoices first, at most `first` (capped at 100). Drafts are not shown:
    they have no number nor page yet, and may still be deleted."""
    if first < 1:
        raise BillingError("first must be at least 1", code=ErrorCode.BAD_USER_INPUT, field="first")
    invoice = invoice_table.c
    query = (
        select(invoice_table)
        .join(account_table, account_table.c.stripe_customer_id == invoice.stripe_customer_id)
        .where(account_table.c.user_id == user_id, invoice.status != "draft")
        .order_by(invoice.created.desc(), invoice.id.desc())
        .limit(min(first, MAX_INVOICES))
    )
    async with database.read() as conn:
        rows = (await conn.execute(query)).all()
    return [InvoiceRecord.from_row(row) for row in rows]
