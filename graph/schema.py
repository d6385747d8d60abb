"""The billing GraphQL schema, and `build_schema` for host apps that merge it with their own.

`Query`, `Mutation` and `Subscription` are assembled here from the areas, each a module holding
its types, resolvers and mutations: `graph.viewer` (viewer, plans, access), `graph.checkout`
(checkout and portal), `graph.plan_changes`, `graph.usage`, `graph.seats` (an organisation's
seats), `graph.live` (websocket updates), `graph.operators` (operator-only account lookup and
metrics);
the types several areas return are in `graph.common`. Resolvers stay thin: they read the context
and call `billing`. `schema.graphql` at the repository root is this schema's SDL (`billing
schema` prints it, `billing schema --check` compares).
"""

from __future__ import annotations

import strawberry

from graph.checkout import CheckoutMutation
from graph.live import LiveSubscription
from graph.operators import OperatorQuery
from graph.plan_changes import PlanChangeMutation
from graph.schema_builder import build_schema
from graph.seats import SeatsMutation
from graph.usage import UsageMutation
from graph.viewer import ViewerQuery

__all__ = ["Mutation", "Query", "Subscription", "build_schema", "print_sdl", "schema"]


@strawberry.type
class Query(ViewerQuery, OperatorQuery):
    """Every billing query: the viewer, plans and access; the operators' account and metrics."""


@strawberry.type
class Mutation(PlanChangeMutation, CheckoutMutation, UsageMutation, SeatsMutation):
    """Every billing mutation: plan changes, checkout and portal, usage, an organisation's seats."""


@strawberry.type(name="BillingUpdates", description="Real-time updates, over graphql-transport-ws.")
class Subscription(LiveSubscription):
    """Every billing subscription (graph.live).

    Named `BillingUpdates` in the schema: in this API a subscription is what a user pays for
    (`BillingSubscription`), so no GraphQL type is called `Subscription`.
    """


def print_sdl(schema: strawberry.Schema) -> str:
    return schema.as_str().rstrip("\n") + "\n"


schema = build_schema(Query, mutation=Mutation, subscription=Subscription)
