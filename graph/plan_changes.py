"""Plan changes, cancellation and resumption: thin resolvers over `billing.plan_changes`.

Every field needs a user token and acts on the subscription of the user, or of the token's
active organisation when the user is one of its billing admins (others get FORBIDDEN).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry

from billing import plan_changes
from db.enums import BillingInterval, Tier
from graph.common import BillingSubscription
from graph.context import context_of
from graph.rate_limit import signed_in_stripe_call


@strawberry.type(description="One line of a previewed invoice.")
class PreviewLine:
    description: str
    amount: int = strawberry.field(description="In cents; negative for a credit.")
    proration: bool = strawberry.field(description="A prorated charge or credit for part of a period.")
    period_start: datetime | None
    period_end: datetime | None

    @classmethod
    def from_model(cls, line: plan_changes.PreviewLine) -> PreviewLine:
        return cls(
            description=line.description,
            amount=line.amount,
            proration=line.proration,
            period_start=line.period_start,
            period_end=line.period_end,
        )


@strawberry.type(description="What `changePlan` with the same arguments charges, now and next.")
class PlanChangePreview:
    tier: Tier
    interval: BillingInterval
    immediate: bool = strawberry.field(
        description="True when the change applies now (an upgrade); false for one at the period end."
    )
    effective_at: datetime | None = strawberry.field(description="When the new plan starts.")
    currency: str = strawberry.field(description="ISO 4217, lower case.")
    amount_due: int = strawberry.field(
        description=(
            "Charged now, in cents (0 for a downgrade). `changePlan` within minutes charges exactly this."
        )
    )
    next_invoice_amount: int = strawberry.field(
        description="The next invoice after the change, in cents (metered usage is billed on top)."
    )
    next_invoice_at: datetime | None
    lines: list[PreviewLine] = strawberry.field(
        description="Lines of the invoice due now, or of the next invoice when nothing is due now."
    )

    @classmethod
    def from_model(cls, preview: plan_changes.PlanChangePreview) -> PlanChangePreview:
        return cls(
            tier=preview.tier,
            interval=preview.interval,
            immediate=preview.immediate,
            effective_at=preview.effective_at,
            currency=preview.currency,
            amount_due=preview.amount_due,
            next_invoice_amount=preview.next_invoice_amount,
            next_invoice_at=preview.next_invoice_at,
            lines=[PreviewLine.from_model(line) for line in preview.lines],
        )


@strawberry.type
class PlanChangeMutation:
    @strawberry.mutation(
        description=(
            "What changing to `tier` at `interval` charges now and next, in cents. The proration "
            "date is kept for a few minutes, so `changePlan` then charges exactly `amountDue`. "
            "NO_SUBSCRIPTION without a live subscription; INVALID_PLAN for NONE or the current plan."
        ),
        extensions=signed_in_stripe_call(),
    )
    async def preview_plan_change(
        self, info: strawberry.Info[Any, Any], tier: Tier, interval: BillingInterval
    ) -> PlanChangePreview:
        context = context_of(info)
        owner = await context.billing_owner()
        preview = await plan_changes.preview_plan_change(
            database=context.database,
            gateway=context.gateway,
            catalog=context.catalog,
            clock=context.clock,
            user_id=owner.id,
            tier=tier,
            interval=interval,
        )
        return PlanChangePreview.from_model(preview)

    @strawberry.mutation(
        description=(
            "Upgrades (a higher tier, or monthly to annual) apply now and charge the prorated "
            "difference at once (CARD_DECLINED changes nothing); downgrades apply at the period "
            "end (`pendingChange`). The current plan drops a pending change. NO_SUBSCRIPTION, "
            "INVALID_PLAN as for the preview."
        ),
        extensions=signed_in_stripe_call(),
    )
    async def change_plan(
        self, info: strawberry.Info[Any, Any], tier: Tier, interval: BillingInterval
    ) -> BillingSubscription:
        context = context_of(info)
        owner = await context.billing_owner()
        state = await plan_changes.change_plan(
            database=context.database,
            gateway=context.gateway,
            locks=context.locks,
            catalog=context.catalog,
            clock=context.clock,
            user_id=owner.id,
            tier=tier,
            interval=interval,
        )
        return BillingSubscription.from_model(state, context.policy, context.now)

    @strawberry.mutation(
        description=(
            "Cancel at the period end (the default: access until then) or now. A pending plan "
            "change is dropped. NO_SUBSCRIPTION without a live subscription."
        ),
        extensions=signed_in_stripe_call(),
    )
    async def cancel_subscription(
        self, info: strawberry.Info[Any, Any], at_period_end: bool = True
    ) -> BillingSubscription:
        context = context_of(info)
        owner = await context.billing_owner()
        state = await plan_changes.cancel_subscription(
            database=context.database,
            gateway=context.gateway,
            locks=context.locks,
            clock=context.clock,
            user_id=owner.id,
            at_period_end=at_period_end,
        )
        return BillingSubscription.from_model(state, context.policy, context.now)

    @strawberry.mutation(
        description=(
            "Undo a cancellation at the period end, or resume a paused subscription; anything "
            "else is left as it is. NO_SUBSCRIPTION without a live subscription."
        ),
        extensions=signed_in_stripe_call(),
    )
    async def resume_subscription(self, info: strawberry.Info[Any, Any]) -> BillingSubscription:
        context = context_of(info)
        owner = await context.billing_owner()
        state = await plan_changes.resume_subscription(
            database=context.database,
            gateway=context.gateway,
            locks=context.locks,
            clock=context.clock,
            user_id=owner.id,
        )
        return BillingSubscription.from_model(state, context.policy, context.now)
