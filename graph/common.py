"""GraphQL types several areas return: the domain's enums, the `BigInt` scalar, `BillingSubscription`.

GraphQL types are separate from the tables: each is built from domain values by `from_model()`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NewType

import strawberry
from graphql import IntValueNode, ValueNode
from strawberry.types.scalar import ScalarDefinition

from billing.access import AccessPolicy, AccessReason, SubscriptionState
from db.enums import BillingInterval, SubscriptionStatus, Tier

# The domain's enums, registered under their GraphQL names (members by name: NONE, STARTER, PRO).
strawberry.enum(Tier, name="Tier", description="A plan level; NONE means no paid plan.")
strawberry.enum(BillingInterval, name="BillingInterval")
strawberry.enum(
    SubscriptionStatus,
    name="SubscriptionStatus",
    description="Stripe's subscription status, or NONE for a user who never subscribed.",
)
strawberry.enum(AccessReason, name="AccessReason", description="Why access is refused.")

BigInt = NewType("BigInt", int)


def _parse_big_int_literal(node: ValueNode, _variables: Any = None) -> int:
    if not isinstance(node, IntValueNode):
        raise ValueError("BigInt must be a whole number")
    return int(node.value)


# For `StrawberryConfig.scalar_map` (graph.schema.build_schema passes it).
SCALARS: dict[object, ScalarDefinition] = {
    BigInt: strawberry.scalar(
        name="BigInt",
        description="A whole number that may not fit GraphQL's 32-bit Int (a JSON number, exact up to 2^53).",
        serialize=int,
        parse_value=int,
        parse_literal=_parse_big_int_literal,
    )
}


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
    seats: int | None = strawberry.field(
        default=None,
        description=(
            "The seats paid for (the plan item's quantity; an organisation's seat count, `setSeats`); "
            "null without a subscription."
        ),
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
            seats=state.seats,
        )
