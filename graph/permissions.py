"""Permission classes for the billing schema and for host apps' own fields.

Every check reads the viewer's subscription through the request context, so a request loads it
once however many fields it guards. Access itself is decided by `billing.access` (the effective
tier): a canceled or unpaid Pro subscriber passes none of the subscription checks.

| class | passes when | fails with `extensions.code` |
|---|---|---|
| `IsAuthenticated()` | a valid user token | UNAUTHENTICATED (FORBIDDEN for the service key) |
| `ManagesBilling()` | a user token; a billing-admin role when it names an organisation | FORBIDDEN |
| `IsService()` | the service key | UNAUTHENTICATED (nothing sent), FORBIDDEN (a user) |
| `IsOperator()` | an operator (ADMIN_USER_IDS, AUTH_ADMIN_CLAIM/VALUE) or the service key | FORBIDDEN |
| `HasActiveSubscription()` | any paid effective tier | FORBIDDEN_TIER |
| `RequiresTier(Tier.PRO)` | effective tier ranks at least PRO | FORBIDDEN_TIER |
| `RequiresFeature("name")` | the effective tier's plan has the feature | FEATURE_NOT_IN_PLAN |
| `WithinQuota("name")` | the plan has the feature and usage this window is below its limit | QUOTA_EXCEEDED |

The subscription checks fail with UNAUTHENTICATED without a user token and FORBIDDEN for the
service key. Their errors carry `reason`, `effectiveTier` and `requiredTier` extensions.

Use them in one way, through Strawberry's `PermissionExtension` (Strawberry instantiates
`permission_classes` entries without arguments, so parameterised checks cannot go there):

    @strawberry.field(extensions=[PermissionExtension(permissions=[RequiresTier(Tier.PRO)])])
    async def forecast(self) -> Forecast: ...

Guard async resolvers: the checks are async (they may read the database). The checks raise their
error themselves, so `fail_silently=True` does not apply to them.
"""

from __future__ import annotations

import logging
from typing import Any

import strawberry
from strawberry.permission import BasePermission, PermissionExtension

from billing.errors import BillingError, ErrorCode
from billing.plans import tier_rank
from billing.usage import quota_check
from db.enums import Tier
from graph.context import context_of

log = logging.getLogger("billing.graphql")

__all__ = [
    "HasActiveSubscription",
    "IsAuthenticated",
    "IsOperator",
    "IsService",
    "ManagesBilling",
    "PermissionExtension",
    "RequiresFeature",
    "RequiresTier",
    "Tier",
    "WithinQuota",
]


class _BillingPermission(BasePermission):
    code: ErrorCode = ErrorCode.FORBIDDEN

    def on_unauthorized(self) -> None:
        # The checks raise their precise error; this is only reached if one returns False.
        raise BillingError(self.message or "not allowed", code=self.code)


class IsAuthenticated(_BillingPermission):
    message = "sign in: this needs a user token"
    code = ErrorCode.UNAUTHENTICATED

    async def has_permission(self, source: Any, info: strawberry.Info[Any, Any], **kwargs: Any) -> bool:
        await context_of(info).user()
        return True


class ManagesBilling(_BillingPermission):
    """A user managing their own billing, or a billing admin (BILLING_ADMIN_ROLES) of the token's
    active organisation; other members of it get FORBIDDEN before anything is written or sent."""

    message = "only a billing admin of the organisation may manage its billing"
    code = ErrorCode.FORBIDDEN

    async def has_permission(self, source: Any, info: strawberry.Info[Any, Any], **kwargs: Any) -> bool:
        await context_of(info).billing_owner()
        return True


class IsService(_BillingPermission):
    message = "only the host app's backend (service key) may do this"
    code = ErrorCode.FORBIDDEN

    async def has_permission(self, source: Any, info: strawberry.Info[Any, Any], **kwargs: Any) -> bool:
        await context_of(info).service()
        return True


class IsOperator(_BillingPermission):
    """An operator of the service; everyone else (nobody, a user, an org admin) gets FORBIDDEN.

    The operator's id is logged with every field it opens (`operator` on the log line).
    """

    message = "only an operator of the billing service may do this"
    code = ErrorCode.FORBIDDEN

    async def has_permission(self, source: Any, info: strawberry.Info[Any, Any], **kwargs: Any) -> bool:
        operator = await context_of(info).operator()
        log.info("operator field %s", info.field_name, extra={"operator": operator})
        return True


class RequiresTier(_BillingPermission):
    """The viewer's effective tier ranks at least `tier` (PRO satisfies STARTER)."""

    code = ErrorCode.FORBIDDEN_TIER

    def __init__(self, tier: Tier) -> None:
        if tier is Tier.NONE:
            raise ValueError("RequiresTier needs a paid tier; use IsAuthenticated for any signed-in user")
        self.tier = tier
        self.message: str = f"this needs the {tier.name} plan or higher"

    async def has_permission(self, source: Any, info: strawberry.Info[Any, Any], **kwargs: Any) -> bool:
        context = context_of(info)
        _user, state = await context.viewer()
        decision = context.policy.tier_access(state, self.tier, context.now)
        if not decision.allowed:
            raise decision.error(self.code, self._refusal(decision.effective_tier))
        return True

    def _refusal(self, effective: Tier) -> str:
        if effective is Tier.NONE:
            return f"{self.message}: there is no active subscription"
        return f"{self.message}: the current plan is {effective.name}"


class HasActiveSubscription(RequiresTier):
    """Any subscription that grants access now (active, trialing, past_due within grace)."""

    def __init__(self) -> None:
        lowest = min((tier for tier in Tier if tier is not Tier.NONE), key=tier_rank)
        super().__init__(lowest)
        self.message = "this needs an active subscription"

    def _refusal(self, effective: Tier) -> str:
        return self.message


class RequiresFeature(_BillingPermission):
    """The plan of the viewer's effective tier includes `feature`."""

    code = ErrorCode.FEATURE_NOT_IN_PLAN

    def __init__(self, feature: str) -> None:
        self.feature = feature
        self.message: str = f"the current plan does not include {feature!r}"

    async def has_permission(self, source: Any, info: strawberry.Info[Any, Any], **kwargs: Any) -> bool:
        context = context_of(info)
        _user, state = await context.viewer()
        decision = context.policy.feature_access(state, self.feature, context.now)
        if not decision.allowed:
            if decision.required_tier is None:
                log.warning("RequiresFeature(%r): no plan has this feature (check plans.toml)", self.feature)
            error = decision.error(self.code, self.message)
            error.extensions["feature"] = self.feature
            raise error
        return True


class WithinQuota(_BillingPermission):
    """The viewer's plan includes `feature` and the quota window's usage is below its limit.

    Refuses with QUOTA_EXCEEDED once usage reached the limit (exactly at the limit too), with
    `limit`, `used` and `resetsAt` (the window's end) in `extensions`; a plan without the
    feature is FEATURE_NOT_IN_PLAN, as `RequiresFeature`. A feature without a limit passes
    without reading usage. The check reads usage once; uses admitted concurrently just under the
    limit may all be recorded (see `billing.usage` for the bound).
    """

    code = ErrorCode.FEATURE_NOT_IN_PLAN

    def __init__(self, feature: str) -> None:
        self.feature = feature
        self.message: str = f"the quota of {feature!r} is used up for this period"

    async def has_permission(self, source: Any, info: strawberry.Info[Any, Any], **kwargs: Any) -> bool:
        context = context_of(info)
        _user, state = await context.viewer()
        check = await quota_check(context.database, context.policy, state, self.feature, context.now)
        decision = check.decision
        if decision.allowed:
            return True
        error: BillingError
        if check.used is not None:  # refused by the quota itself
            error = decision.error(ErrorCode.QUOTA_EXCEEDED, self.message)
            error.extensions.update(limit=check.limit, used=check.used, resetsAt=check.window.end.isoformat())
        else:
            error = decision.error(self.code, f"the current plan does not include {self.feature!r}")
        error.extensions["feature"] = self.feature
        raise error
