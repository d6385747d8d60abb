"""GraphQL types. Separate from the tables: each is built from domain values by `from_model()`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry

from billing.access import AccessDecision as AccessDecisionModel
from billing.access import AccessPolicy, AccessReason, SubscriptionState
from billing.customers import list_invoices
from billing.plans import Catalog, Price
from billing.plans import Plan as PlanModel
from db.enums import BillingInterval, SubscriptionStatus, Tier
from graph.auth import User
from graph.billing_types import Invoice
from graph.context import context_of
from graph.usage import Entitlement, UsageSummary, viewer_entitlements, viewer_usage

# The domain's enums, registered under their GraphQL names (members by name: NONE, STARTER, PRO).
strawberry.enum(Tier, name="Tier", description="A plan level; NONE means no paid plan.")
strawberry.enum(BillingInterval, name="BillingInterval")
strawberry.enum(
    SubscriptionStatus,
    name="SubscriptionStatus",
    description="Stripe's subscription status, or NONE for a user who never subscribed.",
)
strawberry.enum(AccessReason, name="AccessReason", description="Why access is refused.")


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


@strawberry.type(description="A plan change scheduled for the end of the current period (a downgrade).")
class PendingPlanChange:
    tier: Tier
    interval: BillingInterval
    effective_at: datetime | None = strawberry.field(description="When the new plan starts.")

    @classmethod
    def from_model(cls, state: SubscriptionState) -> PendingPlanChange | None:
        if state.pending_tier is None or state.pending_interval is None:
            return None
        return cls(
            tier=state.pending_tier, interval=state.pending_interval, effective_at=state.pending_change_at
        )


@strawberry.type(description="A user's subscription as the database knows it (kept in step by webhooks).")
class BillingSubscription:
    status: SubscriptionStatus
    tier: Tier = strawberry.field(description="The subscribed tier, whether or not it grants access now.")
    effective_tier: Tier = strawberry.field(
        description="The tier the user may use now: `tier` while the status grants access, else NONE."
    )
    has_access: bool = strawberry.field(
        description="Active, trialing, or past due within the grace period (PAST_DUE_GRACE_DAYS)."
    )
    interval: BillingInterval | None
    price_id: str | None = strawberry.field(description="The Stripe price being paid.")
    current_period_start: datetime | None
    current_period_end: datetime | None
    trial_end: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    trial_used: bool = strawberry.field(description="True once the user has had a free trial.")
    pending_change: PendingPlanChange | None = strawberry.field(
        default=None, description="A downgrade that starts at the period end (`changePlan`); null if none."
    )

    @classmethod
    def from_model(cls, state: SubscriptionState, policy: AccessPolicy, now: datetime) -> BillingSubscription:
        effective = policy.effective_tier(state, now)
        return cls(
            status=state.status,
            tier=state.tier,
            effective_tier=effective,
            has_access=effective is not Tier.NONE,
            interval=state.interval,
            price_id=state.price_id,
            current_period_start=state.current_period_start,
            current_period_end=state.current_period_end,
            trial_end=state.trial_end,
            cancel_at_period_end=state.cancel_at_period_end,
            canceled_at=state.canceled_at,
            trial_used=state.trial_used,
            pending_change=PendingPlanChange.from_model(state),
        )


@strawberry.type(description="The signed-in user.")
class Viewer:
    id: strawberry.ID = strawberry.field(description="The user id (the token's `sub`).")
    email: str | None
    name: str | None
    subscription: BillingSubscription

    @classmethod
    def from_model(cls, user: User, state: SubscriptionState, policy: AccessPolicy, now: datetime) -> Viewer:
        return cls(
            id=strawberry.ID(user.id),
            email=user.email or state.email,
            name=user.name or state.name,
            subscription=BillingSubscription.from_model(state, policy, now),
        )

    @strawberry.field(
        description=(
            "The viewer's invoices, newest first: at most `first` (capped at 100; BAD_USER_INPUT "
            "below 1). Drafts are left out."
        )
    )
    async def invoices(self, info: strawberry.Info[Any, Any], first: int | None = 10) -> list[Invoice]:
        count = 10 if first is None else first
        records = await list_invoices(context_of(info).database, user_id=str(self.id), first=count)
        return [Invoice.from_model(record) for record in records]

    @strawberry.field(
        description=(
            "The viewer's usage of `feature` in the current quota window, with the plan's limit and "
            "a daily series. BAD_USER_INPUT for a feature no plan has."
        )
    )
    async def usage(self, info: strawberry.Info[Any, Any], feature: str) -> UsageSummary:
        return await viewer_usage(info, str(self.id), feature)

    @strawberry.field(
        description="Every feature of the viewer's effective plan with its limit and usage this window."
    )
    async def entitlements(self, info: strawberry.Info[Any, Any]) -> list[Entitlement]:
        return await viewer_entitlements(info, str(self.id))


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
