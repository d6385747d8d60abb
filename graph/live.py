"""GraphQL subscriptions over websockets: the viewer's billing state, live (`billing.realtime`
does the work). `graph.schema.Subscription` serves them as the root type `BillingUpdates`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import strawberry

from billing.errors import BillingError, ErrorCode
from graph.common import BillingSubscription
from graph.context import context_of


@strawberry.type
class LiveSubscription:
    @strawberry.subscription(
        description=(
            "The viewer's subscription now, then again each time it changes (webhooks, mutations, "
            "`billing sync`, event replays); an unchanged state is not sent twice. With an "
            "organisation in the token, the organisation's subscription. Over "
            "graphql-transport-ws with a user token in `connection_init`."
        )
    )
    async def billing_state_changed(
        self, info: strawberry.Info[Any, Any]
    ) -> AsyncGenerator[BillingSubscription, None]:
        context = context_of(info)
        user = await context.user()
        hub = context.services.realtime
        if hub is None:
            raise BillingError("real-time updates are not running", code=ErrorCode.INTERNAL_ERROR)
        async with aclosing(hub.watch(user.owner_key)) as states:  # the active owner's state
            async for state in states:
                yield BillingSubscription.from_model(state, context.policy, context.clock())
