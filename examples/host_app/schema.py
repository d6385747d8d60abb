"""The host app's schema: the billing `Query` merged with the app's own fields, gated by tier.

Each gated field uses the permission classes of `graph.permissions` through Strawberry's
`PermissionExtension`, the one supported way (the checks take arguments). Gated fields are
nullable, so a request mixing fields a user may and may not see gets the allowed data and one
coded error per refused field.
"""

from __future__ import annotations

import strawberry
from strawberry.tools import merge_types

from graph.permissions import (
    HasActiveSubscription,
    IsAuthenticated,
    PermissionExtension,
    RequiresFeature,
    RequiresTier,
    Tier,
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


Query = merge_types("Query", (BillingQuery, HostQuery))
schema = build_schema(Query)
