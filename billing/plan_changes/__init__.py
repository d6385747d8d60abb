"""Plan changes, cancellation and resumption of a user's subscription, through Stripe's API.

The package: `operations.py` (the public functions), `model.py` (what a change is), `live.py` (the
subscription as Stripe has it, item changes), `stripe_calls.py`, `previews.py` (previews and quotes).

Stripe's customer portal cannot move a subscription between products (one product per tier
here), so plan changes go through the API:

- An **upgrade** (a higher tier, or monthly -> annual of the same tier) applies now:
  `proration_behavior=always_invoice` bills the prorated difference at once and
  `payment_behavior=error_if_incomplete` makes a declined card refuse the whole update
  (Stripe's default would apply the plan and leave the subscription past_due). A change of
  interval resets the billing cycle anchor to now, as Stripe does: the unused time is credited
  and the new period billed in full. During a trial every change applies now (nothing is paid).
- A **downgrade** (a lower tier, or annual -> monthly) applies at the period end, so nobody loses
  paid time: the subscription gets a schedule (`from_subscription`) whose current phase keeps
  the current items until the period ends and whose next phase has the new ones. The sync reads
  that next phase as the account's pending change. Another change replaces the pending one;
  asking for the current plan while a change is pending drops it (the schedule is released).
- **Previews** come from `invoices.create_preview` with the same items and proration settings.
  Stripe prorates per second, so the preview's proration date is kept (a `plan_change_quote`
  row per account and target plan, for `QUOTE_TTL`, in the database so any service process
  can use it) and sent with the update: the change charges exactly what the preview showed.
- **Cancel** (at the plan's period end, or now) and **resume** (clear a pending cancellation, or
  resume a paused subscription) release a pending schedule first, as Stripe refuses to change
  the cancellation of a subscription a schedule manages; if the cancellation then fails, the
  pending change is put back.

Metered items follow the plan: each is moved to the new tier's metered price of its feature
(or removed when the new tier has none). Metered prices are monthly on every plan, so an annual
plan's subscription mixes intervals (Stripe's flexible billing mode): the plan item renews
yearly, the metered items are invoiced monthly. The plan item's period is the subscription's
period here; Stripe's own "period end" for such a subscription is the earliest item's (the
month's), so cancelling at the period end names the plan's period end (`cancel_at`), and
previews of a change at the period end of an annual plan are computed from the target price
(Stripe's upcoming invoice would be the next month's usage).

Each function reads the subscription from Stripe (the database may lag the webhooks), makes the
change, then brings the account in line with `sync_customer` and returns the stored state.
Changes of one customer are serialised (a lock of their own, apart from the sync's). No
database transaction is ever open across a Stripe call.
"""

from billing.plan_changes.model import (
    QUOTE_TTL,
    ChangeKind,
    PlanChangePreview,
    PreviewLine,
    classify,
    is_upgrade,
)
from billing.plan_changes.operations import (
    cancel_subscription,
    change_plan,
    preview_plan_change,
    resume_subscription,
)

__all__ = [
    "QUOTE_TTL",
    "ChangeKind",
    "PlanChangePreview",
    "PreviewLine",
    "cancel_subscription",
    "change_plan",
    "classify",
    "is_upgrade",
    "preview_plan_change",
    "resume_subscription",
]
