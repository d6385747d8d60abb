"""The sandbox's billing engine: periods, proration, invoices, payment, and the passage of time.

Resources (`resources/checkout.py`, `subscriptions.py`, `schedules.py`, `invoices.py`) and the
control routes (`control/lifecycle.py`) call these functions; hosted pages may call them too
(`complete_checkout`, `set_payment_method_fails`, `update_subscription`, `cancel_subscription`,
`advance_clock`). Every function works inside one sandbox `Transaction` and records the events
Stripe would send with `tx.emit`. Arithmetic (periods, proration) is pure.

Its modules, each importing only from those before it:
`periods` (intervals and boundaries, items, billing mode, prices and proration arithmetic),
`payments` (events, payment methods, a charge and its retry schedule), `invoice_lines` (lines and
pending invoice items), `discounts` (coupons applied to subscriptions and invoices),
`invoicing` (invoices from draft to paid, dunning, cancellation),
`creation` (checkout, the first invoice, the trial's end), `changes` (updates and their
prorations, previews, resuming), `clock` (renewals, schedule phases, `advance_clock`).

What is modelled, after Stripe's documentation:

Time
    The sandbox clock is real time plus an offset (state "clock_offset"). What Stripe does on
    its own as time passes happens when `advance_clock` moves the clock past it, in time order,
    each at its own timestamp: Checkout Sessions expire (24 h), `customer.subscription.trial_will_end`
    three days before a trial ends, trials end, schedule phases start, subscriptions renew or
    cancel at the period end, draft invoices finalize, failed payments are retried. Advancing by
    0 seconds catches up with real time.

Periods
    Monthly and yearly periods keep the billing cycle anchor's day of month (clamped to the
    month's last day: Jan 31 -> Feb 28 -> Mar 31) and time of day, in UTC. Each item has its
    own `current_period_start`/`current_period_end` (this API version has no subscription-level
    period); `period_of` is the item period that ends first, the subscription's next invoice.

Billing mode
    `billing_mode.type` is `flexible` unless a request asks for `classic` (this API version's
    default). A `classic` subscription needs one interval across its prices, as before; a
    `flexible` one may mix intervals (an annual licensed price and a monthly metered one): each
    item renews on its own boundaries, all counted from the one billing cycle anchor, and the
    items whose periods end at the same moment share one invoice (so a monthly metered item on
    an annual plan is invoiced every month, in arrears, and at the year's end together with the
    annual renewal). `cancel_at_period_end` resolves to the earliest item period end, as Stripe
    documents for mixed intervals; `cancel_at=max_period_end` to the latest.

Invoices
    A subscription's first invoice and the invoice of an update that bills at once
    (`proration_behavior=always_invoice`, an interval change, `billing_cycle_anchor=now`) are
    finalized and charged immediately. Renewal invoices (and the first one after a trial) are
    created as drafts at the period end and, as Stripe documents for subscriptions, finalized
    and charged one hour later (`automatically_finalizes_at`). Metered items are billed in
    arrears on the renewal invoice: usage of the ended period (from the meters resource) times
    the unit amount. Customer credit balances are applied at finalization. Tax is never
    computed (always 0); there are no charges or payment intents, only the invoice's outcome.

Proration (per second, rounded half up to the cent per line)
    For a change at time t inside the period [start, end): a credit of
    -amount * (end - t) / (end - start) for each licensed item that goes away or changes, and a
    charge of +amount * (end - t) / (end - start) for each that comes in. `create_prorations`
    leaves them as pending invoice items for the next invoice; `always_invoice` invoices and
    charges them now; `none` drops them. An interval change (or `billing_cycle_anchor=now`)
    resets the anchor to now: the unused time of every licensed item is credited (unless
    `none`) and the new period's full price is invoiced and charged now. No proration during a
    trial.

Payment
    A charge fails when the customer was marked with
    `POST /_control/customers/{id}/payment_method {"fails": true}` (or has no payment method at
    all). `payment_behavior=error_if_incomplete` turns a failed charge of an update into a 402
    `card_declined` and leaves everything unchanged; other payment behaviours apply the update
    and make the subscription `past_due` (`pending_if_incomplete`'s pending updates are not
    modelled).

Dunning (modelled on Stripe's custom retry schedule)
    The first attempt is made when the invoice is finalized, at time T. When it fails the
    subscription becomes `past_due` and `invoice.payment_failed` is sent; the payment is retried
    at T + 3 days, T + 5 days and T + 7 days (`invoice.next_payment_attempt`), each failure
    sending `invoice.payment_failed` again. A successful attempt pays the invoice
    (`invoice.paid`, `invoice.payment_succeeded`) and returns the subscription to `active`.
    When the last retry fails the subscription is canceled (`customer.subscription.deleted`,
    `cancellation_details.reason = "payment_failed"`), or set to `unpaid` when the sandbox is
    configured with `dunning_final_action="unpaid"`; the invoice stays open. An unpaid
    subscription keeps renewing, but its invoices are finalized without payment attempts.

Schedules
    `from_subscription` schedules: at the end of each phase the next phase's items replace the
    subscription's (with that phase's `proration_behavior`); after the last phase the schedule is
    released (`end_behavior=release`) or the subscription canceled (`cancel`). Updating a
    scheduled subscription's cancellation is refused, as Stripe does; canceling it cancels the
    schedule too.
"""

from stripe_sandbox.engine.periods import (
    DAY,
    FINALIZE_DELAY,
    LIVE_STATUSES,
    TRIAL_WILL_END_NOTICE,
    add_intervals,
    next_boundary,
    prorated,
)

# What is used from outside the emulator (`billing trigger`, tests); the emulator's own modules
# import from the module that defines a name.
__all__ = [
    "DAY",
    "FINALIZE_DELAY",
    "LIVE_STATUSES",
    "TRIAL_WILL_END_NOTICE",
    "add_intervals",
    "next_boundary",
    "prorated",
]
