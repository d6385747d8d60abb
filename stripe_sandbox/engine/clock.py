"""The passage of time: renewals, schedule phases, and `advance_clock`, which does in time order
what Stripe would do on its own meanwhile."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from stripe_sandbox.api import SandboxConfig
from stripe_sandbox.engine.changes import apply_change, items_differ, plan_change, resolve_items
from stripe_sandbox.engine.creation import end_trial, expire_checkout, notify_trial_will_end, trial_notice_key
from stripe_sandbox.engine.invoice_lines import pending_lines, period_line, usage_line
from stripe_sandbox.engine.invoicing import (
    cancel_subscription,
    create_invoice,
    final_invoice,
    finalize_and_charge,
    settle_subscription,
)
from stripe_sandbox.engine.payments import attempt_payment, emit
from stripe_sandbox.engine.periods import (
    BILLED_STATUSES,
    FINALIZE_DELAY,
    LIVE_STATUSES,
    TRIAL_WILL_END_NOTICE,
    Obj,
    interval_of,
    is_metered,
    item_period,
    items_of,
    next_boundary,
    period_of,
)
from stripe_sandbox.errors import StripeError, parameter_invalid
from stripe_sandbox.store import Transaction

MAX_CLOCK_STEPS = 20_000


async def renew(tx: Transaction, config: SandboxConfig, subscription: Obj, at: int) -> None:
    """The items whose period ends at `at` renew: new periods on their own intervals, and one draft
    renewal invoice for them (usage in arrears, licensed prices ahead) finalized an hour later.
    Items of a longer interval (an annual plan beside a monthly metered item) are not billed."""
    due = [item for item in items_of(subscription) if int(item["current_period_end"]) <= at]
    start = min(item_period(item)[0] for item in due)
    previous: Obj = {
        "items": copy.deepcopy(subscription["items"]),
        "latest_invoice": subscription["latest_invoice"],
    }
    anchor = int(subscription["billing_cycle_anchor"])
    customer_id = str(subscription["customer"])
    lines = await pending_lines(tx, subscription["id"])
    for item in due:
        if is_metered(item["price"]):
            lines.append(await usage_line(tx, item, customer_id, item_period(item)))
    for item in due:
        interval, count = interval_of(item["price"])
        end = int(item["current_period_end"])
        item["current_period_start"], item["current_period_end"] = (
            end,
            next_boundary(anchor, interval, count, end),
        )
    for item in due:
        if not is_metered(item["price"]):
            lines.append(await period_line(tx, item, item_period(item)))
    discounts = list(subscription.get("discounts") or [])
    invoice = await create_invoice(
        tx,
        customer_id=customer_id,
        subscription=subscription,
        lines=lines,
        billing_reason="subscription_cycle",
        period=(start, at),
        now=at,
        finalize_at=at + FINALIZE_DELAY,
    )
    if subscription.get("discounts") != discounts:  # an ended discount was removed
        previous["discounts"] = discounts
    subscription["latest_invoice"] = invoice["id"]
    await tx.save(subscription)
    await emit(tx, "customer.subscription.updated", subscription, previous)


def schedule_items_as_params(subscription: Obj, phase: Obj) -> list[Obj]:
    """`items[]` parameters that turn the subscription's items into the phase's."""
    wanted = [dict(item) for item in phase["items"]]
    current = list(items_of(subscription))
    specs: list[Obj] = []
    for item in list(current):
        match = next((w for w in wanted if w["price"] == item["price"]["id"]), None)
        if match is not None:
            wanted.remove(match)
            current.remove(item)
            spec: Obj = {"id": item["id"]}
            if match.get("quantity") is not None and not is_metered(item["price"]):
                spec["quantity"] = match["quantity"]
            specs.append(spec)
    for item, want in zip(list(current), list(wanted), strict=False):
        spec = {"id": item["id"], "price": want["price"]}
        if want.get("quantity") is not None:
            spec["quantity"] = want["quantity"]
        specs.append(spec)
        current.remove(item)
        wanted.remove(want)
    specs += [{"id": item["id"], "deleted": True} for item in current]
    for want in wanted:
        spec = {"price": want["price"]}
        if want.get("quantity") is not None:
            spec["quantity"] = want["quantity"]
        specs.append(spec)
    return specs


async def apply_phase(
    tx: Transaction, config: SandboxConfig, schedule: Obj, phase: Obj, now: int
) -> Obj | None:
    """Make the schedule's subscription match `phase` (prorating per the phase's behaviour)."""
    subscription = await tx.find(str(schedule.get("subscription")))
    if subscription is None or subscription["status"] == "canceled":
        return None
    specs = schedule_items_as_params(subscription, phase)
    items = await resolve_items(tx, subscription, specs, now, param="phases")
    change = await plan_change(
        tx,
        subscription,
        items,
        proration_behavior=str(phase.get("proration_behavior") or "create_prorations"),
        now=now,
    )
    if not change.reset_anchor and not items_differ(items_of(subscription), change.items):
        return subscription
    subscription, previous, _invoice = await apply_change(tx, config, subscription, change)
    await emit(tx, "customer.subscription.updated", subscription, previous)
    return subscription


async def advance_schedule(tx: Transaction, config: SandboxConfig, schedule: Obj, at: int) -> None:
    """The current phase ends at `at`: start the next one, or end the schedule."""
    phases = schedule["phases"]
    index = next(
        (i for i, phase in enumerate(phases) if int(phase["start_date"]) <= at < int(phase["end_date"])),
        None,
    )
    if index is not None:
        previous = {"current_phase": copy.deepcopy(schedule["current_phase"])}
        phase = phases[index]
        schedule["current_phase"] = {"start_date": phase["start_date"], "end_date": phase["end_date"]}
        await tx.save(schedule)
        await apply_phase(tx, config, schedule, phase, at)
        await emit(tx, "subscription_schedule.updated", schedule, previous)
        return
    subscription_id = schedule.get("subscription")
    subscription = None if subscription_id is None else await tx.find(str(subscription_id))
    if schedule["end_behavior"] == "cancel" and subscription is not None:
        schedule["status"] = "completed"
        schedule["completed_at"] = at
        schedule["current_phase"] = None
        await tx.save(schedule)
        await cancel_subscription(tx, config, subscription, at)
        await emit(tx, "subscription_schedule.completed", schedule)
        return
    await release_schedule(tx, schedule, at)


async def release_schedule(tx: Transaction, schedule: Obj, now: int) -> Obj:
    if schedule["status"] not in ("not_started", "active"):
        raise StripeError(
            400,
            "You cannot release a subscription schedule that is currently in the "
            f"`{schedule['status']}` status.",
        )
    subscription_id = schedule.get("subscription")
    schedule["status"] = "released"
    schedule["released_at"] = now
    schedule["released_subscription"] = subscription_id
    schedule["subscription"] = None
    schedule["current_phase"] = None
    await tx.save(schedule)
    if subscription_id:
        subscription = await tx.find(str(subscription_id))
        if subscription is not None and subscription.get("schedule") == schedule["id"]:
            subscription["schedule"] = None
            await tx.save(subscription)
            await emit(tx, "customer.subscription.updated", subscription, {"schedule": schedule["id"]})
    await emit(tx, "subscription_schedule.released", schedule)
    return schedule


# Order of things due at the same second.
_PRIORITY = {
    "checkout_expiry": 0,
    "schedule_phase": 1,
    "trial_will_end": 2,
    "trial_end": 3,
    "cancel_at": 4,
    "renewal": 5,
    "finalize": 6,
    "retry": 7,
}


@dataclass(order=True)
class Due:
    at: int
    priority: int
    kind: str = field(compare=False)
    object_id: str = field(compare=True)


async def _due(tx: Transaction, until: int) -> list[Due]:
    """Everything Stripe would do on its own by `until`, in no particular order."""
    due: list[Due] = []

    def add(at: int, kind: str, object_id: str) -> None:
        if at <= until:
            due.append(Due(at, _PRIORITY[kind], kind, object_id))

    for session in await tx.all("checkout.session", lambda s: s.get("status") == "open"):
        add(int(session["expires_at"]), "checkout_expiry", session["id"])
    for schedule in await tx.all("subscription_schedule", lambda s: s.get("status") == "active"):
        if schedule.get("current_phase"):
            add(int(schedule["current_phase"]["end_date"]), "schedule_phase", schedule["id"])
    for subscription in await tx.all("subscription", lambda s: s.get("status") in LIVE_STATUSES):
        status = subscription["status"]
        if status == "trialing" and subscription.get("trial_end"):
            trial_end = int(subscription["trial_end"])
            notified = await tx.get_state(trial_notice_key(subscription["id"]), "")
            if notified != str(trial_end):
                notice = max(trial_end - TRIAL_WILL_END_NOTICE, int(subscription.get("trial_start") or 0))
                add(min(notice, trial_end), "trial_will_end", subscription["id"])
            add(trial_end, "trial_end", subscription["id"])
            continue
        if status not in BILLED_STATUSES:
            continue
        end = period_of(subscription)[1]
        cancel_at = subscription.get("cancel_at")
        if cancel_at is not None and int(cancel_at) <= end:
            add(int(cancel_at), "cancel_at", subscription["id"])
        else:
            add(end, "renewal", subscription["id"])
    for invoice in await tx.all("invoice", lambda i: i.get("status") in ("draft", "open")):
        if invoice["status"] == "draft" and invoice.get("automatically_finalizes_at"):
            add(int(invoice["automatically_finalizes_at"]), "finalize", invoice["id"])
        elif invoice["status"] == "open" and invoice.get("next_payment_attempt"):
            add(int(invoice["next_payment_attempt"]), "retry", invoice["id"])
    return due


async def _perform(tx: Transaction, config: SandboxConfig, due: Due) -> None:
    at = due.at
    obj = await tx.find(due.object_id)
    if obj is None:
        return
    if due.kind == "checkout_expiry":
        await expire_checkout(tx, obj, at)
    elif due.kind == "schedule_phase":
        await advance_schedule(tx, config, obj, at)
    elif due.kind == "trial_will_end":
        await notify_trial_will_end(tx, obj)
    elif due.kind == "trial_end":
        await end_trial(tx, config, obj, at)
    elif due.kind == "cancel_at":
        await _cancel_at_period_end(tx, config, obj, at)
    elif due.kind == "renewal":
        await renew(tx, config, obj, at)
    elif due.kind == "finalize":
        await finalize_and_charge(tx, config, obj, at)
    elif due.kind == "retry":
        paid = await attempt_payment(tx, obj, at)
        await settle_subscription(tx, config, obj, paid, at)


async def _cancel_at_period_end(tx: Transaction, config: SandboxConfig, subscription: Obj, at: int) -> None:
    """A subscription set to cancel ends; metered usage and pending items get a final invoice."""
    await final_invoice(tx, subscription, at, finalize_at=at + FINALIZE_DELAY)
    await cancel_subscription(tx, config, subscription, at, reason="cancellation_requested")


async def advance_clock(tx: Transaction, config: SandboxConfig, seconds: int) -> Obj:
    """Move the sandbox clock forward and do, in time order, what Stripe would meanwhile.

    Returns {"now", "advanced_by", "events": [{"id", "type", "created"}...]}.
    """
    if seconds < 0:
        raise parameter_invalid("seconds", "The sandbox clock only moves forward.")
    start = tx.now()
    target = start + seconds
    offset = tx.clock_offset
    first_event = len(tx.emitted)
    steps = 0
    while True:
        pending = await _due(tx, target)
        if not pending:
            break
        step = min(pending)
        with tx.at(max(step.at, start)):  # events carry the time they happened at
            await _perform(tx, config, step)
        steps += 1
        if steps > MAX_CLOCK_STEPS:
            raise StripeError(500, "The sandbox clock did not settle.", type="api_error")
    tx.clock_offset = offset + seconds
    await tx.set_state("clock_offset", str(tx.clock_offset))
    return {
        "now": tx.now(),
        "advanced_by": seconds,
        "events": [
            {"id": event["id"], "type": event["type"], "created": event["created"]}
            for event in tx.emitted[first_event:]
        ],
    }
