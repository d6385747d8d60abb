"""The host app's schema: the billing `Query` merged with the app's own fields, gated by tier.

Each gated field uses the permission classes of `graph.permissions` through Strawberry's
`PermissionExtension`, the one supported way (the checks take arguments). Gated fields are
nullable, so a request mixing fields a user may and may not see gets the allowed data and one
coded error per refused field.
"""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.tools import merge_types

from billing.usage import UsageInput, record_usage
from graph.context import context_of
from graph.permissions import (
    HasActiveSubscription,
    IsAuthenticated,
    PermissionExtension,
    RequiresFeature,
    RequiresTier,
    Tier,
    WithinQuota,
)
from graph.schema import Query as BillingQuery
from graph.schema import build_schema


@strawberry.type
class Dashboard:
    projects: int


@strawberry.type
class TeamReport:
    title: str
    members: list[str]


@strawberry.type
class Forecast:
    months: int
    revenue_cents: list[int]


@strawberry.type
class Cohort:
    name: str
    retention: float


@strawberry.type
class Lookup:
    query: str
    answer: str


@strawberry.type
class HostQuery:
    @strawberry.field(
        description="Any signed-in user.",
        extensions=[PermissionExtension(permissions=[IsAuthenticated()])],
    )
    async def greeting(self) -> str | None:
        return "hello"

    @strawberry.field(
        description="Any active subscription (active, trialing, past due within grace).",
        extensions=[PermissionExtension(permissions=[HasActiveSubscription()])],
    )
    async def dashboard(self) -> Dashboard | None:
        return Dashboard(projects=3)

    @strawberry.field(
        description="STARTER or higher.",
        extensions=[PermissionExtension(permissions=[RequiresTier(Tier.STARTER)])],
    )
    async def team_report(self) -> TeamReport | None:
        return TeamReport(title="Weekly", members=["ada", "grace"])

    @strawberry.field(
        description="PRO only.",
        extensions=[PermissionExtension(permissions=[RequiresTier(Tier.PRO)])],
    )
    async def forecast(self, months: int = 3) -> Forecast | None:
        return Forecast(months=months, revenue_cents=[100_00 * (i + 1) for i in range(months)])

    @strawberry.field(
        description="Plans that include the `advanced_analytics` feature.",
        extensions=[PermissionExtension(permissions=[RequiresFeature("advanced_analytics")])],
    )
    async def cohorts(self) -> list[Cohort] | None:
        return [Cohort(name="2026-01", retention=0.82)]

    @strawberry.field(
        description=(
            "One API call, metered against the plan's monthly `api_calls` quota: QUOTA_EXCEEDED once "
            "the quota is used up. Each answer records one call, once per X-Request-ID."
        ),
        extensions=[PermissionExtension(permissions=[WithinQuota("api_calls")])],
    )
    async def lookup(self, info: strawberry.Info[Any, Any], query: str) -> Lookup | None:
        context = context_of(info)
        user = await context.user()
        # An embedding host app records usage in-process; a separate backend would call the
        # `recordUsage` mutation with the service key instead. The use counts against the plan the
        # quota was checked on: the token's active organisation's, else the user's own.
        await record_usage(
            database=context.database,
            catalog=context.catalog,
            records=[UsageInput(user.owner_key, "api_calls", 1, f"lookup:{context.request_id}")],
            now=context.now,
            max_quantity=context.services.settings.usage_max_quantity,
            past_due_grace=context.policy.past_due_grace,
        )
        return Lookup(query=query, answer=query[::-1])


Query = merge_types("Query", (BillingQuery, HostQuery))
schema = build_schema(Query)
