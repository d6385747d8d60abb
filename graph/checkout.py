"""Checkout and the customer portal: thin resolvers over `billing.checkout`."""

from __future__ import annotations

from typing import Any

import strawberry

from billing.checkout import (
    CheckoutSessionInfo,
    PortalSessionInfo,
    confirm_checkout_session,
    create_checkout_session,
    create_portal_session,
)
from db.enums import BillingInterval, Tier
from graph.common import BillingSubscription
from graph.context import context_of
from graph.rate_limit import signed_in_stripe_call


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


@strawberry.type
class CheckoutMutation:
    @strawberry.mutation(
        description=(
            "A Stripe Checkout page for `tier` at `interval`: the user's customer is created on "
            "first use, a first subscription gets the free trial, and the user's other open "
            "checkout sessions expire. INVALID_PLAN for NONE, ALREADY_SUBSCRIBED with a live "
            "subscription."
        ),
        extensions=signed_in_stripe_call(),
    )
    async def create_checkout_session(
        self, info: strawberry.Info[Any, Any], tier: Tier, interval: BillingInterval
    ) -> CheckoutSession:
        context = context_of(info)
        owner = await context.billing_owner()
        session = await create_checkout_session(
            database=context.database,
            gateway=context.gateway,
            locks=context.locks,
            catalog=context.catalog,
            settings=context.services.settings,
            user=owner,
            tier=tier,
            interval=interval,
        )
        return CheckoutSession.from_model(session)

    @strawberry.mutation(
        description=(
            "For the checkout success page: syncs the account from Stripe now, without waiting "
            "for the webhook, and returns the subscription. Only the viewer's own sessions: any "
            "other id (unknown, malformed, another user's) is BAD_USER_INPUT; NO_BILLING_ACCOUNT "
            "when the viewer never checked out."
        ),
        extensions=signed_in_stripe_call(),
    )
    async def confirm_checkout_session(
        self, info: strawberry.Info[Any, Any], session_id: strawberry.ID
    ) -> BillingSubscription:
        context = context_of(info)
        owner = await context.billing_owner()
        state = await confirm_checkout_session(
            database=context.database,
            gateway=context.gateway,
            locks=context.locks,
            user_id=owner.id,
            session_id=str(session_id),
        )
        return BillingSubscription.from_model(state, context.policy, context.now)

    @strawberry.mutation(
        description=(
            "A Stripe customer-portal page (payment methods, invoices, cancellation) returning to "
            "the app's /billing. NO_BILLING_ACCOUNT when the viewer has no Stripe customer."
        ),
        extensions=signed_in_stripe_call(),
    )
    async def create_portal_session(self, info: strawberry.Info[Any, Any]) -> PortalSession:
        context = context_of(info)
        owner = await context.billing_owner()
        session = await create_portal_session(
            database=context.database, gateway=context.gateway, settings=context.services.settings, user=owner
        )
        return PortalSession.from_model(session)
