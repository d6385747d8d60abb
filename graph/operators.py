"""Operator-only fields: `billingAccount` (one account: state, ledger, invoices, usage, events)
and `billingMetrics` (revenue from the ledger, docs/metrics.md).

Every field is guarded by `IsOperator`: anyone but an operator (ADMIN_USER_IDS,
AUTH_ADMIN_CLAIM = AUTH_ADMIN_VALUE, the service key) gets FORBIDDEN and no data.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import strawberry

from billing.account_lookup import AccountEvent, AccountFound, customer_events, find_account
from billing.customers import list_invoices
from billing.invoice_records import InvoiceRevenue, invoice_revenue
from billing.ledger import LedgerEntry
from billing.owners import owner_of
from billing.revenue import Bucket, MetricsInterval, RevenueMetrics, revenue_metrics
from graph.common import BillingSubscription
from graph.context import context_of
from graph.permissions import IsOperator, PermissionExtension
from graph.usage import Entitlement, viewer_entitlements
from graph.viewer import Invoice

strawberry.enum(
    MetricsInterval, name="MetricsInterval", description="The length of a bucket of `effectiveAt`."
)


def _operator_only() -> list[Any]:
    return [PermissionExtension(permissions=[IsOperator()])]


@strawberry.type(description="A field of the billing state a ledger entry changed, as JSON text.")
class LedgerChange:
    field: str
    before: str = strawberry.field(description="The value before, JSON (null: none, or a new account).")
    after: str = strawberry.field(description="The value after, JSON.")


@strawberry.type(description="Why a ledger entry was written: a Stripe event, `mutation`, `billing sync`...")
class LedgerCause:
    type: str
    id: str | None = strawberry.field(description="The Stripe event's id, for an event.")
    operator: str | None = strawberry.field(
        description="The operator who ran it from the admin console (`billing sync` there), else null."
    )


@strawberry.type(description="One change of an account's billing state (append-only).")
class LedgerEntryView:
    id: strawberry.ID
    kind: str = strawberry.field(description="`initial` (backfilled state) or `change`.")
    changes: list[LedgerChange]
    state: str = strawberry.field(description="The tracked state after the change, JSON.")
    causes: list[LedgerCause]
    effective_at: datetime = strawberry.field(description="When it happened at Stripe.")
    recorded_at: datetime

    @classmethod
    def from_model(cls, entry: LedgerEntry) -> LedgerEntryView:
        before = entry.before or {}
        names = entry.changed or list(entry.after)
        return cls(
            id=strawberry.ID(str(entry.id)),
            kind=entry.kind,
            changes=[
                LedgerChange(
                    field=name, before=json.dumps(before.get(name)), after=json.dumps(entry.after.get(name))
                )
                for name in names
            ],
            state=json.dumps(entry.after, sort_keys=True),
            causes=[
                LedgerCause(type=str(cause.get("type")), id=cause.get("id"), operator=cause.get("operator"))
                for cause in entry.causes
            ],
            effective_at=entry.effective_at,
            recorded_at=entry.recorded_at,
        )


@strawberry.type(description="A Stripe event of the account's customer and what became of it.")
class AccountWebhookEvent:
    id: strawberry.ID
    type: str
    created: datetime
    received_at: datetime
    outcome: str = strawberry.field(description="pending, processing, processed, ignored or failed.")
    attempts: int
    error: str | None

    @classmethod
    def from_model(cls, event: AccountEvent) -> AccountWebhookEvent:
        return cls(
            id=strawberry.ID(event.id),
            type=event.type,
            created=event.created,
            received_at=event.received_at,
            outcome=event.status,
            attempts=event.attempts,
            error=event.error,
        )


@strawberry.type(description="One account as an operator sees it.")
class BillingAccountView:
    user_id: strawberry.ID = strawberry.field(
        description="The owner key: the user id, or `org:` + the organisation id."
    )
    organization_id: strawberry.ID | None = strawberry.field(
        description="The organisation that owns the account; null for a user's own account."
    )
    email: str | None
    name: str | None
    stripe_customer_id: str | None
    subscription: BillingSubscription
    ledger: list[LedgerEntryView] = strawberry.field(description="Oldest first: why the account is as it is.")

    @classmethod
    def from_model(cls, found: AccountFound, info: strawberry.Info[Any, Any]) -> BillingAccountView:
        context = context_of(info)
        return cls(
            user_id=strawberry.ID(found.state.user_id),
            organization_id=strawberry.ID(owner.id)
            if (owner := owner_of(found.state.user_id)).is_organization
            else None,
            email=found.state.email,
            name=found.state.name,
            stripe_customer_id=found.stripe_customer_id,
            subscription=BillingSubscription.from_model(found.state, context.policy, context.now),
            ledger=[LedgerEntryView.from_model(entry) for entry in found.ledger],
        )

    @strawberry.field(description="Newest first, at most `first` (capped at 100).")
    async def invoices(self, info: strawberry.Info[Any, Any], first: int | None = 10) -> list[Invoice]:
        records = await list_invoices(context_of(info).database, user_id=str(self.user_id), first=first or 10)
        return [Invoice.from_model(record) for record in records]

    @strawberry.field(description="Every feature of the effective plan with its limit and usage this window.")
    async def usage(self, info: strawberry.Info[Any, Any]) -> list[Entitlement]:
        return await viewer_entitlements(info, str(self.user_id))

    @strawberry.field(description="The customer's latest Stripe events, newest first (at most 100).")
    async def events(self, info: strawberry.Info[Any, Any], first: int = 20) -> list[AccountWebhookEvent]:
        if self.stripe_customer_id is None:
            return []
        found = await customer_events(context_of(info).database, self.stripe_customer_id, first=first)
        return [AccountWebhookEvent.from_model(event) for event in found]


@strawberry.type(description="Subscribers in one status and tier.")
class SubscriberCount:
    status: str
    tier: str
    count: int


@strawberry.type(description="MRR movements of one bucket of `effectiveAt` (cents).")
class MrrMovement:
    start: datetime
    end: datetime
    mrr: int = strawberry.field(description="MRR at the bucket's end.")
    new: int
    expansion: int
    contraction: int = strawberry.field(description="Negative or 0.")
    churned: int = strawberry.field(description="Negative or 0.")
    reactivation: int
    net_new: int

    @classmethod
    def from_model(cls, bucket: Bucket) -> MrrMovement:
        m = bucket.movements
        return cls(
            start=bucket.start,
            end=bucket.end,
            mrr=bucket.mrr,
            new=m["new"],
            expansion=m["expansion"],
            contraction=m["contraction"],
            churned=m["churned"],
            reactivation=m["reactivation"],
            net_new=bucket.net_new,
        )


@strawberry.type(description="Revenue metrics from the billing ledger (docs/metrics.md).")
class BillingMetrics:
    start: datetime
    end: datetime
    mrr: int = strawberry.field(
        description="At `to`, in cents: net of discounts, tax excluded, trials excluded."
    )
    arr: int = strawberry.field(description="MRR x 12.")
    mrr_at_start: int = strawberry.field(description="MRR at `from`.")
    subscribers: list[SubscriberCount]
    movements: list[MrrMovement]
    trials_started: int
    trials_converted: int = strawberry.field(description="Trials that became paying in the range.")
    trials_lapsed: int = strawberry.field(description="Trials that ended without paying in the range.")
    trial_conversion_rate: float | None = strawberry.field(description="Converted / (converted + lapsed).")
    churned_subscribers: int = strawberry.field(description="Paying accounts whose MRR went to 0.")
    logo_churn_rate: float | None = strawberry.field(description="Churned subscribers / paying at `from`.")
    revenue_churn_rate: float | None = strawberry.field(
        description="Net MRR churn: (churned + contraction - expansion - reactivation) / MRR at `from`."
    )
    failed_payments: int = strawberry.field(description="Renewals that failed: to past_due.")
    recovered_payments: int = strawberry.field(description="past_due back to active.")
    recovered_mrr: int = strawberry.field(description="The MRR of the recovered accounts (cents).")
    failed_invoices: int = strawberry.field(
        description="Invoices finalized in the range whose payment failed (an attempt did not pay them)."
    )
    failed_amount: int = strawberry.field(description="Their amount due (cents).")
    recovered_invoices: int = strawberry.field(description="Of those, the ones paid since, before `to`.")
    recovered_amount: int = strawberry.field(description="Their amount paid (cents).")
    metered_revenue: int = strawberry.field(
        description=(
            "Metered lines of the invoices finalized in the range, net of their discounts (cents); "
            "never in MRR."
        )
    )

    @classmethod
    def from_model(cls, metrics: RevenueMetrics, invoices: InvoiceRevenue) -> BillingMetrics:
        return cls(
            start=metrics.start,
            end=metrics.end,
            mrr=metrics.mrr,
            arr=metrics.arr,
            subscribers=[
                SubscriberCount(status=status, tier=tier, count=count)
                for (status, tier), count in sorted(metrics.subscribers.items())
            ],
            movements=[MrrMovement.from_model(bucket) for bucket in metrics.buckets],
            mrr_at_start=metrics.mrr_at_start,
            trials_started=metrics.counts.trials_started,
            trials_converted=metrics.counts.trials_converted,
            trials_lapsed=metrics.counts.trials_lapsed,
            trial_conversion_rate=metrics.trial_conversion_rate,
            churned_subscribers=metrics.counts.churned_subscribers,
            logo_churn_rate=metrics.logo_churn_rate,
            revenue_churn_rate=metrics.revenue_churn_rate,
            failed_payments=metrics.counts.payments_failed,
            recovered_payments=metrics.counts.payments_recovered,
            recovered_mrr=metrics.counts.recovered_mrr,
            failed_invoices=invoices.failed_invoices,
            failed_amount=invoices.failed_amount,
            recovered_invoices=invoices.recovered_invoices,
            recovered_amount=invoices.recovered_amount,
            metered_revenue=invoices.metered_revenue,
        )


@strawberry.type
class OperatorQuery:
    @strawberry.field(
        description=(
            "One account by exactly one of userId, email or stripeCustomerId (operators only: "
            "FORBIDDEN for anyone else); null when there is none."
        ),
        extensions=_operator_only(),
    )
    async def billing_account(
        self,
        info: strawberry.Info[Any, Any],
        user_id: strawberry.ID | None = None,
        email: str | None = None,
        stripe_customer_id: str | None = None,
    ) -> BillingAccountView | None:
        found = await find_account(
            context_of(info).database,
            user_id=None if user_id is None else str(user_id),
            email=email,
            stripe_customer_id=stripe_customer_id,
        )
        return None if found is None else BillingAccountView.from_model(found, info)

    @strawberry.field(
        description=(
            "Revenue metrics of [from, to) from the ledger, movements bucketed by `interval` of "
            "`effectiveAt` (operators only: FORBIDDEN for anyone else)."
        ),
        extensions=_operator_only(),
    )
    async def billing_metrics(
        self,
        info: strawberry.Info[Any, Any],
        from_: Annotated[datetime, strawberry.argument(name="from")],
        to: datetime,
        interval: MetricsInterval = MetricsInterval.DAY,
    ) -> BillingMetrics:
        context = context_of(info)
        metrics = await revenue_metrics(context.database, from_, to, interval, context.catalog)
        return BillingMetrics.from_model(metrics, await invoice_revenue(context.database, from_, to))
