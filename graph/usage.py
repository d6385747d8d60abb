"""Usage metering in GraphQL: the recording mutations, the usage types and their resolvers.

Resolvers stay thin: they read the context and call `billing.usage`.

- `recordUsage` / `recordUsageBatch` (service key only): idempotent per user and key, all or
  nothing, refusals coded with `extensions.index` naming the item.
- `Viewer.usage(feature)` and `Viewer.entitlements`: the fields are on `graph.viewer.Viewer`,
  their types and resolvers here.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import strawberry
from strawberry.types.nodes import SelectedField

from billing.errors import BillingError, ErrorCode
from billing.owners import org_key, owner_of
from billing.usage import DailyUsage as DailyUsageModel
from billing.usage import Entitlement as EntitlementModel
from billing.usage import (
    RecordedUsage,
    UsageInput,
    Window,
    daily_usage,
    entitlements,
    record_usage,
    usage_summary,
)
from billing.usage import UsageSummary as UsageSummaryModel
from graph.common import BigInt
from graph.context import Context, context_of
from graph.permissions import IsService, PermissionExtension


def _big(value: int | None) -> BigInt | None:
    return None if value is None else BigInt(value)


# Recording -----------------------------------------------------------------------------------


@strawberry.input(description="One use of a feature, reported by the host app's backend.")
class RecordUsageInput:
    user_id: strawberry.ID | None = strawberry.field(
        default=None, description="The user whose own plan the use counts against (or give orgId)."
    )
    org_id: strawberry.ID | None = strawberry.field(
        default=None, description="The organisation whose plan the use counts against (or give userId)."
    )
    feature: str = strawberry.field(description="A feature of the plans file (`plans.features`/`limits`).")
    quantity: int = strawberry.field(description="1 to USAGE_MAX_QUANTITY (default 1,000,000).")
    idempotency_key: str = strawberry.field(
        description="Unique per use and user: a retry with the same key records nothing new."
    )
    recorded_at: datetime | None = strawberry.field(
        default=None,
        description="When it happened (default now): at most 35 days ago and 5 minutes ahead.",
    )

    def to_model(self) -> UsageInput:
        if (self.user_id is None) == (self.org_id is None):
            raise BillingError("give exactly one of userId and orgId", code=ErrorCode.BAD_USER_INPUT)
        return UsageInput(
            # The account's owner key (billing/owners.py): a user id, or the organisation's.
            user_id=str(self.user_id) if self.org_id is None else org_key(str(self.org_id)),
            feature=self.feature,
            quantity=self.quantity,
            idempotency_key=self.idempotency_key,
            recorded_at=self.recorded_at,
        )


@strawberry.type(description="A stored usage record.")
class UsageRecord:
    id: strawberry.ID
    user_id: strawberry.ID = strawberry.field(
        description="The owner key of the account: the user id, or `org:` + orgId for an organisation."
    )
    org_id: strawberry.ID | None = strawberry.field(description="The organisation, for its records.")
    feature: str
    quantity: int
    recorded_at: datetime
    idempotency_key: str
    duplicate: bool = strawberry.field(
        description="True when the key was recorded before: this is the original record, nothing was added."
    )

    @classmethod
    def from_model(cls, record: RecordedUsage) -> UsageRecord:
        return cls(
            id=strawberry.ID(str(record.id)),
            user_id=strawberry.ID(record.user_id),
            org_id=strawberry.ID(owner.id) if (owner := owner_of(record.user_id)).is_organization else None,
            feature=record.feature,
            quantity=record.quantity,
            recorded_at=record.recorded_at,
            idempotency_key=record.idempotency_key,
            duplicate=record.duplicate,
        )


async def _record(context: Context, inputs: list[RecordUsageInput]) -> list[UsageRecord]:
    settings = context.services.settings
    records = await record_usage(
        database=context.database,
        catalog=context.catalog,
        records=[item.to_model() for item in inputs],
        now=context.now,
        max_quantity=settings.usage_max_quantity,
        past_due_grace=context.policy.past_due_grace,
        # usage.threshold events, when HOST_WEBHOOK_URL is set (the sync's configuration).
        host_events=locks.host_events if (locks := context.services.locks) is not None else None,
    )
    reporter = context.reporter
    if reporter is not None:
        reporter.kick()  # nothing to wait for: it runs on its own, a kick only makes it sooner
    return [UsageRecord.from_model(record) for record in records]


def _service_only() -> list[Any]:
    return [PermissionExtension(permissions=[IsService()])]


@strawberry.type
class UsageMutation:
    @strawberry.mutation(
        description=(
            "Record one use of a feature for a user (service key only). Idempotent: the same key "
            "returns the original record (`duplicate: true`); the same key with another feature or "
            "quantity is IDEMPOTENCY_CONFLICT. BAD_USER_INPUT for an unknown feature, a quantity "
            "outside 1..USAGE_MAX_QUANTITY or a recordedAt outside [now - 35 days, now + 5 minutes]; "
            "NO_BILLING_ACCOUNT for an unknown user; NO_SUBSCRIPTION without a live subscription."
        ),
        extensions=_service_only(),
    )
    async def record_usage(self, info: strawberry.Info[Any, Any], input: RecordUsageInput) -> UsageRecord:
        (record,) = await _record(context_of(info), [input])
        return record

    @strawberry.mutation(
        description=(
            "Record up to 1,000 uses at once (service key only), all or nothing: any refusal writes "
            "nothing and its error names the item in `extensions.index`. Records come back in order."
        ),
        extensions=_service_only(),
    )
    async def record_usage_batch(
        self, info: strawberry.Info[Any, Any], inputs: list[RecordUsageInput]
    ) -> list[UsageRecord]:
        return await _record(context_of(info), inputs)


# Reading -------------------------------------------------------------------------------------


@strawberry.type(description="Usage of one UTC day.")
class DailyUsage:
    date: date
    quantity: BigInt

    @classmethod
    def from_model(cls, day: DailyUsageModel) -> DailyUsage:
        return cls(date=day.day, quantity=BigInt(day.quantity))


@strawberry.type(description="A feature's usage in the current quota window.")
class UsageSummary:
    feature: str
    used: BigInt
    limit: BigInt | None = strawberry.field(
        description="The plan's limit per window; null when unlimited, 0 when the plan lacks the feature."
    )
    remaining: BigInt | None = strawberry.field(
        description="limit - used, never below 0; null when unlimited."
    )
    window_start: datetime = strawberry.field(
        description=(
            "The quota window: the current period (monthly plans), the current month counted from "
            "the period start (annual plans), or the calendar month (no subscription)."
        )
    )
    window_end: datetime
    account_id: strawberry.Private[int | None] = None
    days: strawberry.Private[tuple[DailyUsageModel, ...] | None] = None  # read with `used`

    @strawberry.field(description="One entry per UTC day the window touches (zeros included), for charts.")
    async def daily(self, info: strawberry.Info[Any, Any]) -> list[DailyUsage]:
        days = self.days
        if days is None:
            window = Window(self.window_start, self.window_end)
            days = await daily_usage(context_of(info).database, self.account_id, self.feature, window)
        return [DailyUsage.from_model(day) for day in days]

    @classmethod
    def from_model(cls, summary: UsageSummaryModel, account_id: int | None, *, daily: bool) -> UsageSummary:
        return cls(
            feature=summary.feature,
            used=BigInt(summary.used),
            limit=_big(summary.limit),
            remaining=_big(summary.remaining),
            window_start=summary.window.start,
            window_end=summary.window.end,
            account_id=account_id,
            days=summary.daily if daily else None,
        )


@strawberry.type(description="A feature of the viewer's plan (effective tier), with its limit and usage.")
class Entitlement:
    feature: str
    limit: BigInt | None = strawberry.field(description="Per quota window; null when unlimited.")
    used: BigInt
    remaining: BigInt | None = strawberry.field(
        description="limit - used, never below 0; null when unlimited."
    )

    @classmethod
    def from_model(cls, entitlement: EntitlementModel) -> Entitlement:
        return cls(
            feature=entitlement.feature,
            limit=_big(entitlement.limit),
            used=BigInt(entitlement.used),
            remaining=_big(entitlement.remaining),
        )


async def viewer_usage(info: strawberry.Info[Any, Any], user_id: str, feature: str) -> UsageSummary:
    """`Viewer.usage`: the account is the request's one read of it (shared with permissions)."""
    context = context_of(info)
    state = await context.subscription(user_id)
    # `used` alone is the window's total (one row); with `daily`, the series' sum (one statement).
    daily = any(
        isinstance(field, SelectedField) and field.name == "daily"
        for selected in info.selected_fields
        for field in selected.selections
    )
    summary = await usage_summary(
        context.database, context.policy, state, feature, context.now, with_daily=daily
    )
    return UsageSummary.from_model(summary, state.account_id, daily=daily)


async def viewer_entitlements(info: strawberry.Info[Any, Any], user_id: str) -> list[Entitlement]:
    """`Viewer.entitlements`: one read of usage for every feature of the plan."""
    context = context_of(info)
    state = await context.subscription(user_id)
    found = await entitlements(context.database, context.policy, state, context.now)
    return [Entitlement.from_model(entitlement) for entitlement in found]
