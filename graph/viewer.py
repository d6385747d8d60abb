"""The viewer and the plans: `plans`, `viewer` (with invoices, usage and entitlements), `access`,
and `userSubscription` for the host app's backend.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry

from billing.access import AccessDecision as AccessDecisionModel
from billing.access import AccessPolicy, AccessReason, SubscriptionState, check_user_id
from billing.customers import InvoiceRecord, list_invoices
from billing.owners import org_key
from billing.plans import Catalog, Price
from billing.plans import Plan as PlanModel
from billing.usage import quota_check
from db.enums import BillingInterval, Tier
from graph.auth import User
from graph.common import BillingSubscription
from graph.context import context_of
from graph.permissions import IsAuthenticated, IsService, PermissionExtension
from graph.usage import Entitlement, UsageSummary, viewer_entitlements, viewer_usage


@strawberry.type(description="A monthly limit of a plan.")
class PlanLimit:
    feature: str
    limit: int = strawberry.field(description="Per month.")


@strawberry.type(description="One tier at one billing interval, as the catalog sells it.")
class Plan:
    id: strawberry.ID = strawberry.field(description="The price's lookup key, e.g. `pro_monthly`.")
    tier: Tier
    interval: BillingInterval
    name: str
    description: str | None
    amount: int = strawberry.field(description="Price per interval in the currency's smallest unit (cents).")
    currency: str = strawberry.field(description="ISO 4217, lower case.")
    trial_days: int = strawberry.field(description="Free trial length for a first subscription.")
    features: list[str] = strawberry.field(description="Every feature of the plan, sorted.")
    limits: list[PlanLimit]

    @classmethod
    def from_model(cls, plan: PlanModel, price: Price, trial_days: int) -> Plan:
        return cls(
            id=strawberry.ID(price.lookup_key),
            tier=plan.tier,
            interval=price.interval,
            name=plan.name,
            description=plan.description,
            amount=price.amount,
            currency=price.currency,
            trial_days=trial_days,
            features=sorted(plan.features),
            limits=[PlanLimit(feature=name, limit=plan.limits[name]) for name in sorted(plan.limits)],
        )

    @classmethod
    def all_from_catalog(cls, catalog: Catalog) -> list[Plan]:
        return [
            cls.from_model(plan, price, catalog.trial_days)
            for plan in catalog.plans.values()
            for price in plan.prices.values()
        ]


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


@strawberry.type(description="The signed-in user.")
class Viewer:
    id: strawberry.ID = strawberry.field(description="The user id (the token's `sub`).")
    email: str | None
    name: str | None
    organization_id: strawberry.ID | None = strawberry.field(
        description=(
            "The token's active organisation: the viewer is then on its plan (subscription, "
            "access, usage and invoices are the organisation's). Null: the viewer's own plan."
        )
    )
    can_manage_billing: bool = strawberry.field(
        description=(
            "May the viewer check out, open the portal, change, cancel or resume the plan? Always "
            "for their own; for an organisation, when their role is one of BILLING_ADMIN_ROLES."
        )
    )
    subscription: BillingSubscription
    owner_key: strawberry.Private[str]

    @classmethod
    def from_model(cls, user: User, state: SubscriptionState, policy: AccessPolicy, now: datetime) -> Viewer:
        return cls(
            id=strawberry.ID(user.id),
            email=user.email or (None if user.org_id else state.email),
            name=user.name or (None if user.org_id else state.name),
            organization_id=None if user.org_id is None else strawberry.ID(user.org_id),
            can_manage_billing=user.org_id is None or user.billing_admin,
            subscription=BillingSubscription.from_model(state, policy, now),
            owner_key=user.owner_key,
        )

    @strawberry.field(
        description=(
            "The viewer's invoices, newest first: at most `first` (capped at 100; BAD_USER_INPUT "
            "below 1). Drafts are left out."
        )
    )
    async def invoices(self, info: strawberry.Info[Any, Any], first: int | None = 10) -> list[Invoice]:
        count = 10 if first is None else first
        records = await list_invoices(context_of(info).database, user_id=self.owner_key, first=count)
        return [Invoice.from_model(record) for record in records]

    @strawberry.field(
        description=(
            "The viewer's usage of `feature` in the current quota window, with the plan's limit and "
            "a daily series. BAD_USER_INPUT for a feature no plan has."
        )
    )
    async def usage(self, info: strawberry.Info[Any, Any], feature: str) -> UsageSummary:
        return await viewer_usage(info, self.owner_key, feature)

    @strawberry.field(
        description="Every feature of the viewer's effective plan with its limit and usage this window."
    )
    async def entitlements(self, info: strawberry.Info[Any, Any]) -> list[Entitlement]:
        return await viewer_entitlements(info, self.owner_key)


@strawberry.type(description="May the viewer use a feature? For frontends gating pages.")
class AccessDecision:
    allowed: bool
    reason: AccessReason | None = strawberry.field(description="Why not; null when allowed.")
    effective_tier: Tier
    required_tier: Tier | None = strawberry.field(
        description="The lowest tier that includes the feature; null for an unknown feature."
    )

    @classmethod
    def from_model(cls, decision: AccessDecisionModel) -> AccessDecision:
        return cls(
            allowed=decision.allowed,
            reason=decision.reason,
            effective_tier=decision.effective_tier,
            required_tier=decision.required_tier,
        )


@strawberry.type
class ViewerQuery:
    @strawberry.field(description="The plans on sale, one per tier and interval. Public.")
    def plans(self, info: strawberry.Info[Any, Any]) -> list[Plan]:
        return Plan.all_from_catalog(context_of(info).catalog)

    @strawberry.field(
        description="The signed-in user and their subscription. UNAUTHENTICATED without a user token.",
        extensions=[PermissionExtension(permissions=[IsAuthenticated()])],
    )
    async def viewer(self, info: strawberry.Info[Any, Any]) -> Viewer:
        context = context_of(info)
        user, state = await context.viewer()
        return Viewer.from_model(user, state, context.policy, context.now)

    @strawberry.field(
        description=(
            "May the viewer use `feature`? For frontends gating pages. Without a token the answer "
            "is not allowed, reason UNAUTHENTICATED; QUOTA_EXCEEDED once this window's usage of a "
            "limited feature reached the plan's limit."
        )
    )
    async def access(self, info: strawberry.Info[Any, Any], feature: str) -> AccessDecision:
        context = context_of(info)
        if await context.principal() is None:
            return AccessDecision.from_model(context.policy.anonymous_feature_access(feature))
        _user, state = await context.viewer()
        check = await quota_check(context.database, context.policy, state, feature, context.now)
        return AccessDecision.from_model(check.decision)

    @strawberry.field(
        description="One user's subscription, for the host app's backend (service key only).",
        extensions=[PermissionExtension(permissions=[IsService()])],
    )
    async def user_subscription(
        self, info: strawberry.Info[Any, Any], user_id: strawberry.ID
    ) -> BillingSubscription:
        context = context_of(info)
        check_user_id(str(user_id))
        state = await context.subscription(str(user_id))
        return BillingSubscription.from_model(state, context.policy, context.now)

    @strawberry.field(
        description="One organisation's subscription, for the host app's backend (service key only).",
        extensions=[PermissionExtension(permissions=[IsService()])],
    )
    async def organization_subscription(
        self, info: strawberry.Info[Any, Any], org_id: strawberry.ID
    ) -> BillingSubscription:
        context = context_of(info)
        check_user_id(str(org_id))
        state = await context.subscription(org_key(str(org_id)))
        return BillingSubscription.from_model(state, context.policy, context.now)
