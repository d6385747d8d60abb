"""`RateLimited`: the per-user budget of the mutations that call Stripe.

    @strawberry.mutation(extensions=[RateLimited(), PermissionExtension(permissions=[IsAuthenticated()])])

Every field carrying it draws on one budget per user and bucket: RATE_LIMIT_STRIPE_MUTATIONS
(default 10/minute, shared by every process through the database, `billing.rate_limit`), so one
user cannot spend the Stripe account's API quota. Beyond it the field fails with RATE_LIMITED and
`extensions.retryAfter` (seconds; also a `Retry-After` header over HTTP), before its resolver
runs. It needs a user token (UNAUTHENTICATED, or FORBIDDEN for the service key, as
`IsAuthenticated` does). List it before the field's permissions: Strawberry runs a field's last
extension first, so the permissions then run first and only callers that passed them are counted.
"""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.extensions import FieldExtension
from strawberry.extensions.field_extension import AsyncExtensionResolver

from billing.errors import BillingError, ErrorCode
from billing.rate_limit import RateLimiter
from graph.context import context_of
from graph.permissions import IsAuthenticated, ManagesBilling, PermissionExtension

STRIPE_BUCKET = "stripe-mutations"


class RateLimited(FieldExtension):
    """Counts the viewer's call against their budget for `bucket`, refusing it beyond the rate."""

    def __init__(self, bucket: str = STRIPE_BUCKET) -> None:
        self.bucket = bucket

    async def resolve_async(
        self, next_: AsyncExtensionResolver, source: Any, info: strawberry.Info[Any, Any], **kwargs: Any
    ) -> Any:
        context = context_of(info)
        rate = context.services.settings.stripe_mutations_rate
        if rate is not None:
            user = await context.user()
            limiter = RateLimiter(context.database, clock=context.clock)
            decision = await limiter.hit(f"{self.bucket}:{user.id}", rate)
            if not decision.allowed:
                retry_after = decision.retry_after(limiter.clock())
                headers = getattr(context.response, "headers", None)
                if headers is not None and not context.is_websocket:
                    headers["retry-after"] = str(retry_after)
                raise BillingError(
                    f"too many billing requests: at most {rate} per user; try again in {retry_after} s",
                    code=ErrorCode.RATE_LIMITED,
                    retryAfter=retry_after,
                )
        return await next_(source, info, **kwargs)


def signed_in_stripe_call() -> list[Any]:
    """Extensions of a mutation that manages billing through Stripe: a user token (a billing
    admin's, when it names an organisation), then the user's budget.

    Field extensions run last-first, so the permission is checked before the budget is counted:
    a refused member writes nothing, not even a rate-limit hit.
    """
    return [RateLimited(), PermissionExtension(permissions=[IsAuthenticated(), ManagesBilling()])]
