"""What a plan change is: its kind (now, at the period end, dropping a pending one) and its preview."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from billing.errors import BillingError, ErrorCode
from billing.plans import tier_rank
from db.enums import BillingInterval, SubscriptionStatus, Tier

PlanKey = tuple[Tier, BillingInterval]

QUOTE_TTL = timedelta(minutes=5)
# A plan can change while the subscription bills normally, or during its trial.
CHANGEABLE_STATUSES = frozenset(
    {SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING, SubscriptionStatus.PAST_DUE}
)


class ChangeKind(StrEnum):
    NOW = "now"  # an upgrade, or any change during a trial: applied now, the difference charged now
    PERIOD_END = "period_end"  # a downgrade: the schedule's next phase
    DROP_PENDING = "drop_pending"  # the current plan while a change is pending: that change is dropped


@dataclass(frozen=True, slots=True)
class PreviewLine:
    description: str
    amount: int  # cents; negative for a credit
    proration: bool
    period_start: datetime | None
    period_end: datetime | None


@dataclass(frozen=True, slots=True)
class PlanChangePreview:
    tier: Tier
    interval: BillingInterval
    kind: ChangeKind
    effective_at: datetime | None  # when the new plan starts
    currency: str
    amount_due: int  # charged now, in cents
    next_invoice_amount: int  # the invoice after that (the licensed price; metered usage comes on top)
    next_invoice_at: datetime | None
    lines: tuple[PreviewLine, ...]  # of the invoice due now, or of the next one when nothing is due now

    @property
    def immediate(self) -> bool:
        return self.kind is not ChangeKind.PERIOD_END


def is_upgrade(current: PlanKey, target: PlanKey) -> bool:
    """A higher tier, or the same tier billed annually instead of monthly."""
    if current[0] != target[0]:
        return tier_rank(target[0]) > tier_rank(current[0])
    return current[1] is BillingInterval.MONTHLY and target[1] is BillingInterval.ANNUAL


def classify(current: PlanKey | None, target: PlanKey, *, trialing: bool, pending: bool) -> ChangeKind:
    if current == target:
        if pending:
            return ChangeKind.DROP_PENDING
        raise BillingError("The subscription is already on this plan.", code=ErrorCode.INVALID_PLAN)
    if current is None or trialing or is_upgrade(current, target):
        return ChangeKind.NOW
    return ChangeKind.PERIOD_END
