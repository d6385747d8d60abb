"""Which host events a change and the Stripe events applied with it make (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from billing.host_events.events import StripeTrigger, state_events, trigger_events
from db.enums import SubscriptionStatus as S

T1 = datetime(2026, 12, 1, tzinfo=UTC)
T2 = datetime(2027, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("changes", "after", "expected"),
    [
        ({}, S.ACTIVE, []),  # unchanged: nothing
        ({"current_period_start": (T1, T2), "current_period_end": (T1, T2)}, S.ACTIVE, []),  # a renewal
        (
            {"status": ("none", "trialing"), "stripe_subscription_id": (None, "sub_1")},
            S.TRIALING,
            ["subscription.created"],
        ),
        ({"status": ("incomplete", "active")}, S.ACTIVE, ["subscription.created"]),
        (
            {"status": ("canceled", "active"), "stripe_subscription_id": ("sub_1", "sub_2")},
            S.ACTIVE,
            ["subscription.created"],
        ),
        ({"status": ("trialing", "active")}, S.ACTIVE, ["subscription.updated"]),
        ({"tier": ("starter", "pro"), "stripe_price_id": ("p1", "p2")}, S.ACTIVE, ["subscription.updated"]),
        ({"cancel_at_period_end": (False, True)}, S.ACTIVE, ["subscription.updated"]),
        ({"pending_tier": (None, "starter")}, S.ACTIVE, ["subscription.updated"]),
        ({"status": ("active", "past_due")}, S.PAST_DUE, ["subscription.updated"]),
        ({"status": ("past_due", "active")}, S.ACTIVE, ["subscription.updated", "payment.recovered"]),
        ({"status": ("unpaid", "active")}, S.ACTIVE, ["subscription.updated", "payment.recovered"]),
        ({"status": ("active", "canceled")}, S.CANCELED, ["subscription.canceled"]),
        ({"status": ("past_due", "canceled")}, S.CANCELED, ["subscription.canceled"]),
        ({"status": ("incomplete", "incomplete_expired")}, S.INCOMPLETE_EXPIRED, []),  # never had it
        ({"stripe_customer_id": ("cus_1", "cus_2")}, S.ACTIVE, []),
    ],
)
def test_state_events(changes: dict[str, tuple[object, object]], after: S, expected: list[str]) -> None:
    assert state_events(changes, after) == expected


def test_events_named_by_stripe_events_carry_their_dedupe_keys() -> None:
    invoice = {"id": "in_1", "attempt_count": 2, "amount_due": 900, "amount_paid": 0, "currency": "usd"}
    [failed] = trigger_events(StripeTrigger("evt_1", "invoice.payment_failed", invoice))
    assert (failed.type, failed.dedupe_key) == ("payment.failed", "payment.failed:evt_1")
    assert failed.data["invoiceId"] == "in_1" and failed.data["attemptCount"] == 2
    [action] = trigger_events(StripeTrigger("evt_2", "invoice.payment_action_required", invoice))
    assert action.type == "payment.action_required"
    [paid] = trigger_events(StripeTrigger("evt_3", "invoice.paid", {**invoice, "amount_paid": 900}))
    assert (paid.type, paid.dedupe_key) == ("invoice.paid", "invoice.paid:in_1")  # once per invoice
    [ending] = trigger_events(
        StripeTrigger(
            "evt_4", "customer.subscription.trial_will_end", {"id": "sub_1", "trial_end": 1_800_000_000}
        )
    )
    assert (ending.type, ending.dedupe_key) == ("trial.ending", "trial.ending:sub_1:1800000000")
    session = {"id": "cs_1", "mode": "subscription", "subscription": "sub_1"}
    [checkout] = trigger_events(StripeTrigger("evt_5", "checkout.session.completed", session))
    assert (checkout.type, checkout.dedupe_key) == ("checkout.completed", "checkout.completed:cs_1")
    assert (
        trigger_events(StripeTrigger("evt_6", "checkout.session.completed", {**session, "mode": "payment"}))
        == []
    )
    assert trigger_events(StripeTrigger("evt_7", "invoice.payment_succeeded", invoice)) == []
    assert trigger_events(StripeTrigger("evt_8", "customer.subscription.updated", {"id": "sub_1"})) == []
