"""The billing GraphQL schema, and `build_schema` for host apps that merge it with their own.

Resolvers stay thin: they read the context and call `billing`. `schema.graphql` at the repository
root is this schema's SDL (`billing schema` prints it, `billing schema --check` compares).
"""

from __future__ import annotations

from typing import Any

import strawberry

from billing.access import check_user_id
from graph.context import context_of
from graph.live import Subscription
from graph.mutations import Mutation as BillingMutation
from graph.permissions import IsAuthenticated, IsService, PermissionExtension
from graph.schema_builder import build_schema
from graph.types import AccessDecision, BillingSubscription, Plan, Viewer
from graph.usage import UsageMutation, quota_access


@strawberry.type
class Query:
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
        return AccessDecision.from_model(await quota_access(context, state, feature))

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


def print_sdl(schema: strawberry.Schema) -> str:
    return schema.as_str().rstrip("\n") + "\n"


@strawberry.type
class Mutation(BillingMutation, UsageMutation):
    """Every billing mutation: checkout and plan changes (graph.mutations), usage (graph.usage)."""


schema = build_schema(Query, mutation=Mutation, subscription=Subscription)
