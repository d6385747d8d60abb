"""GraphQL types of the checkout, portal and invoice fields, built from domain values by `from_model()`."""

from __future__ import annotations

from datetime import datetime

import strawberry

from billing.checkout import CheckoutSessionInfo, PortalSessionInfo
from billing.customers import InvoiceRecord


@strawberry.type(description="A Stripe Checkout Session: send the user to `url` to pay.")
class CheckoutSession:
    id: strawberry.ID = strawberry.field(
        description="The session id; the success page passes it to `confirmCheckoutSession`."
    )
    url: str = strawberry.field(description="Stripe's hosted checkout page.")

    @classmethod
    def from_model(cls, session: CheckoutSessionInfo) -> CheckoutSession:
        return cls(id=strawberry.ID(session.id), url=session.url)


@strawberry.type(description="A Stripe customer-portal session: send the user to `url`.")
class PortalSession:
    url: str = strawberry.field(description="Stripe's hosted portal; it returns to the app's /billing.")

    @classmethod
    def from_model(cls, session: PortalSessionInfo) -> PortalSession:
        return cls(url=session.url)


@strawberry.type(description="An invoice of the viewer's Stripe customer (kept in step by the webhooks).")
class Invoice:
    id: strawberry.ID = strawberry.field(description="Stripe's invoice id.")
    number: str | None
    status: str = strawberry.field(description="Stripe's status: open, paid, uncollectible or void.")
    amount_due: int = strawberry.field(description="In the currency's smallest unit (cents).")
    amount_paid: int = strawberry.field(description="In the currency's smallest unit (cents).")
    total: int = strawberry.field(description="In the currency's smallest unit (cents).")
    currency: str = strawberry.field(description="ISO 4217, lower case.")
    hosted_invoice_url: str | None = strawberry.field(description="Stripe's page to view and pay it.")
    invoice_pdf: str | None
    period_start: datetime | None
    period_end: datetime | None
    created: datetime

    @classmethod
    def from_model(cls, invoice: InvoiceRecord) -> Invoice:
        return cls(
            id=strawberry.ID(invoice.id),
            number=invoice.number,
            status=invoice.status,
            amount_due=invoice.amount_due,
            amount_paid=invoice.amount_paid,
            total=invoice.total,
            currency=invoice.currency,
            hosted_invoice_url=invoice.hosted_invoice_url,
            invoice_pdf=invoice.invoice_pdf,
            period_start=invoice.period_start,
            period_end=invoice.period_end,
            created=invoice.created,
        )
