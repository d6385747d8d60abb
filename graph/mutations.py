"""The billing mutations. Resolvers stay thin: they read the context and call `billing.checkout`.

`Mutation` is what the schema serves: the checkout and portal mutations here and the plan-change
mutations of `graph.plan_mutations` (previewPlanChange, changePlan, cancelSubscription,
resumeSubscription).
"""

from __future__ import annotations

from typing import Any

import strawberry

from billing.checkout import confirm_checkout_session, create_checkout_session, create_portal_session
from billing.stripe_gateway import StripeGateway
from billing.subscriptions import CustomerLocks
from db.enums import BillingInterval, Tier
from graph.billing_types import CheckoutSession, PortalSession
from graph.context import Context, context_of
from graph.permissions import IsAuthenticated, PermissionExtension
from graph.plan_mutations import PlanMutation
from graph.rate_limit import RateLimited
from graph.types import BillingSubscription


def stripe_of(context: Context) -> tuple[StripeGateway, CustomerLocks]:
    """The app's Stripe gateway and the per-customer locks its webhook worker uses too."""
    state = context.request.app.state
    gateway, events = getattr(state, "stripe", None), getattr(state, "events", None)
    if not isinstance(gateway, StripeGateway) or events is None:
        raise RuntimeError("the billing mutations need the app built by graph.app.create_app (not started?)")
    locks = events.locks
    assert isinstance(locks, CustomerLocks)
    return gateway, locks


def _signed_in() -> list[Any]:
    """A user token, then the user's budget of Stripe calls (graph.rate_limit: the last runs first)."""
    return [RateLimited(), PermissionExtension(permissions=[IsAuthenticated()])]


@strawberry.type
class CheckoutMutation:
    @strawberry.mutation(
        description=(
            "A Stripe Checkout page for `tier` at `interval`: the user's customer is created on "
            "first use, a first subscription gets the free trial, and the user's other open "
            "checkout sessions expire. INVALID_PLAN for NONE, ALREADY_SUBSCRIBED with a live "
            "subscription."
        ),
        extensions=_signed_in(),
    )
    async def create_checkout_session(
        self, info: strawberry.Info[Any, Any], tier: Tier, interval: BillingInterval
    ) -> CheckoutSession:
        context = context_of(info)
        user = await context.user()
        gateway, locks = stripe_of(context)
        session = await create_checkout_session(
            database=context.database,
            gateway=gateway,
            locks=locks,
            catalog=context.catalog,
            settings=context.services.settings,
            user=user,
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
        extensions=_signed_in(),
    )
    async def confirm_checkout_session(
        self, info: strawberry.Info[Any, Any], session_id: strawberry.ID
    ) -> BillingSubscription:
        context = context_of(info)
        user = await context.user()
        gateway, locks = stripe_of(context)
        state = await confirm_checkout_session(
            database=context.database,
            gateway=gateway,
            locks=locks,
            user_id=user.id,
            session_id=str(session_id),
        )
        return BillingSubscription.from_model(state, context.policy, context.now)

    @strawberry.mutation(
        description=(
            "A Stripe customer-portal page (payment methods, invoices, cancellation) returning to "
            "the app's /billing. NO_BILLING_ACCOUNT when the viewer has no Stripe customer."
        ),
        extensions=_signed_in(),
    )
    async def create_portal_session(self, info: strawberry.Info[Any, Any]) -> PortalSession:
        context = context_of(info)
        user = await context.user()
        gateway, _locks = stripe_of(context)
        session = await create_portal_session(
            database=context.database, gateway=gateway, settings=context.services.settings, user=user
        )
        return PortalSession.from_model(session)


@strawberry.type
class Mutation(PlanMutation, CheckoutMutation):
    """Every billing mutation: plan changes (graph.plan_mutations), checkout and portal (here)."""
