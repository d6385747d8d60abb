"""The revenue metrics of billing/revenue.py on a hand-made ledger (docs/metrics.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest

from billing.discounts import discount_terms
from billing.errors import BillingError
from billing.invoice_records import metered_prices, revenue_values
from billing.ledger import LedgerEntry
from billing.plans import load_catalog
from billing.revenue import MetricsInterval, compute_metrics, mrr_of

START = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def state(
    status: str = "active", amount: int | None = 1000, interval: str = "monthly", **more: Any
) -> dict[str, Any]:
    return {
        "status": status,
        "tier": "pro",
        "interval": interval,
        "unit_amount": amount,
        "quantity": 1,
        **more,
    }


class Ledger:
    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []
        self.last: dict[int, dict[str, Any]] = {}

    def add(self, account: int, at: datetime, after: dict[str, Any], kind: str = "change") -> None:
        before = self.last.get(account)
        self.entries.append(
            LedgerEntry(
                id=len(self.entries) + 1,
                account_id=account,
                user_id=f"u{account}",
                stripe_customer_id=None,
                kind=kind,
                changed=[],
                before=before,
                after=after,
                causes=[],
                effective_at=at,
                recorded_at=at,
            )
        )
        self.last[account] = after


def test_mrr_of_one_state() -> None:
    assert mrr_of(state()) == 1000
    assert mrr_of(state(status="past_due")) == 1000  # until canceled
    for status in ("trialing", "canceled", "unpaid", "paused", "incomplete", "none"):
        assert mrr_of(state(status=status)) == 0
    assert mrr_of(state(amount=9900, interval="annual")) == Fraction(9900, 12)
    assert mrr_of(state(quantity=3)) == 3000
    assert mrr_of(state(discounts=[{"percent_off": 25}])) == 750
    assert mrr_of(state(discounts=[{"amount_off": 300}])) == 700
    assert mrr_of(state(discounts=["di_only_an_id"])) == 1000
    catalog = load_catalog()
    pro_monthly = catalog.price(*_pro_monthly()).amount
    assert mrr_of(state(amount=None), catalog) == pro_monthly  # an initial row: the catalog's price


def _pro_monthly() -> Any:
    from db.enums import BillingInterval, Tier

    return Tier.PRO, BillingInterval.MONTHLY


def test_movements_per_day_of_effective_at() -> None:
    ledger = Ledger()
    ledger.add(1, START - DAY, state(), kind="initial")  # before the range: the starting MRR
    ledger.add(2, START + timedelta(hours=3), state(status="trialing"))  # a trial: no MRR
    ledger.add(2, START + DAY + timedelta(hours=1), state())  # converts: new
    ledger.add(3, START + DAY + timedelta(hours=2), state(amount=12000, interval="annual"))  # new, 1000/month
    ledger.add(1, START + 2 * DAY, state(amount=3000))  # upgrade: expansion 2000
    ledger.add(3, START + 2 * DAY, state(amount=6000, interval="annual"))  # contraction 500
    ledger.add(1, START + 3 * DAY, state(status="past_due", amount=3000))  # still counted
    ledger.add(1, START + 4 * DAY, state(status="canceled", amount=3000))  # churned 3000
    ledger.add(1, START + 5 * DAY, state(amount=1000))  # reactivation
    ledger.add(4, START + 9 * DAY, state())  # after the range: not in it

    metrics = compute_metrics(ledger.entries, START, START + 6 * DAY)
    days = [(b.start.day, b.mrr, {k: v for k, v in b.movements.items() if v}) for b in metrics.buckets]
    assert days == [
        (1, 1000, {}),
        (2, 3000, {"new": 2000}),
        (3, 4500, {"expansion": 2000, "contraction": -500}),
        (4, 4500, {}),
        (5, 1500, {"churned": -3000}),
        (6, 2500, {"reactivation": 1000}),
    ]
    assert metrics.mrr == 2500 and metrics.arr == 30000
    assert metrics.subscribers == {("active", "pro"): 3}
    assert sum(b.net_new for b in metrics.buckets) == metrics.mrr - 1000  # MRR at the start: 1000

    weekly = compute_metrics(ledger.entries, START, START + 14 * DAY, MetricsInterval.WEEK)
    assert weekly.buckets[0].start == START  # clipped to `from`
    assert all(b.start.weekday() == 0 for b in weekly.buckets[1:])
    assert sum(b.net_new for b in weekly.buckets) == weekly.mrr - 1000
    monthly = compute_metrics(ledger.entries, START, START + 40 * DAY, MetricsInterval.MONTH)
    assert [b.start.month for b in monthly.buckets] == [3, 4]


def test_an_initial_row_is_never_new_revenue() -> None:
    ledger = Ledger()
    ledger.add(1, START + DAY, state(), kind="initial")
    metrics = compute_metrics(ledger.entries, START, START + 3 * DAY)
    assert sum(b.net_new for b in metrics.buckets) == 0 and metrics.mrr == 1000


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(BillingError):
        compute_metrics([], START, START)
    with pytest.raises(BillingError, match="at most"):
        compute_metrics([], START, START + 1000 * DAY)


def test_trials_churn_and_failed_payments() -> None:
    ledger = Ledger()
    ledger.add(1, START - DAY, state(), kind="initial")  # paying at the start: 1000
    ledger.add(2, START - DAY, state(amount=3000), kind="initial")  # paying at the start: 3000
    ledger.add(3, START + DAY, state(status="trialing"))
    ledger.add(3, START + 2 * DAY, state())  # converts
    ledger.add(4, START + DAY, state(status="trialing"))
    ledger.add(4, START + 2 * DAY, state(status="canceled"))  # lapses
    ledger.add(1, START + DAY, state(status="past_due"))  # a renewal fails
    ledger.add(1, START + 2 * DAY, state())  # recovered
    ledger.add(2, START + 3 * DAY, state(status="past_due", amount=3000))  # fails
    ledger.add(2, START + 4 * DAY, state(status="canceled", amount=3000))  # churns

    metrics = compute_metrics(ledger.entries, START, START + 5 * DAY)
    counts = metrics.counts
    assert (counts.trials_started, counts.trials_converted, counts.trials_lapsed) == (2, 1, 1)
    assert metrics.trial_conversion_rate == 0.5
    assert (counts.payments_failed, counts.payments_recovered, counts.recovered_mrr) == (2, 1, 1000)
    assert counts.churned_subscribers == 1 and metrics.paying_at_start == 2
    assert metrics.logo_churn_rate == 0.5
    assert metrics.mrr_at_start == 4000 and metrics.mrr == 2000
    assert metrics.revenue_churn_rate == 3000 / 4000  # churned 3000, nothing won back (new is not)


def test_a_repeating_discount_counts_until_its_end_then_mrr_steps_back_up() -> None:
    ends = START + 3 * DAY + timedelta(hours=5)
    discount = {"id": "di_1", "percent_off": 20.0, "duration": "repeating", "end": ends.isoformat()}
    forever = {"id": "di_2", "amount_off": 100, "currency": "usd", "duration": "forever", "end": None}
    assert mrr_of(state(discounts=[discount]), at=ends - timedelta(seconds=1)) == 800
    assert mrr_of(state(discounts=[discount]), at=ends) == 1000  # it applies before its end, not at it
    assert mrr_of(state(currency="usd", discounts=[forever]), at=ends) == 900
    assert mrr_of(state(currency="eur", discounts=[forever]), at=ends) == 1000  # another currency's

    ledger = Ledger()
    ledger.add(1, START + timedelta(hours=1), state(discounts=[discount]))
    ledger.add(2, START + timedelta(hours=2), state(currency="usd", discounts=[forever]))
    # Stripe removes the ended discount at the next invoice: a row that changes no MRR.
    ledger.add(1, ends + 2 * DAY, state(discounts=[]))
    metrics = compute_metrics(ledger.entries, START, START + 7 * DAY)
    by_day = {bucket.start.day: bucket for bucket in metrics.buckets}
    assert by_day[1].movements["new"] == 800 + 900
    assert by_day[4].movements["expansion"] == 200  # the discount's end, on its day
    assert [bucket.mrr for bucket in metrics.buckets] == [1700, 1700, 1700, 1900, 1900, 1900, 1900]
    assert sum(bucket.net_new for bucket in metrics.buckets) == metrics.mrr == 1900
    # A range starting after the end: MRR at its start is the undiscounted one, and no movement.
    later = compute_metrics(ledger.entries, START + 5 * DAY, START + 7 * DAY)
    assert later.mrr_at_start == 1900 and later.total("expansion") == 0


def test_discount_terms_stop_at_the_first_invoice_they_no_longer_reduce() -> None:
    def ts(moment: datetime) -> int:
        return int(moment.timestamp())

    trial_end = START + 14 * DAY  # the anchor: renewals on the 15th
    coupon = {"id": "c", "percent_off": 20.0, "duration": "repeating", "amount_off": None, "currency": None}
    subscription = {
        "billing_cycle_anchor": ts(trial_end),
        "trial_end": ts(trial_end),
        "items": {
            "data": [{"price": {"id": "p", "recurring": {"interval": "month", "usage_type": "licensed"}}}]
        },
        "discounts": [
            {
                "id": "di_r",
                "source": {"coupon": coupon},
                "start": ts(START),
                "end": ts(START.replace(month=5)),
            },
            {
                "id": "di_o",
                "source": {"coupon": {**coupon, "duration": "once"}},
                "start": ts(START),
                "end": None,
            },
            {
                "id": "di_f",
                "source": {"coupon": {**coupon, "duration": "forever"}},
                "start": ts(START),
                "end": None,
            },
        ],
    }
    terms = {found["id"]: found for found in discount_terms(subscription)}
    # Repeating until 1 May: the invoice of 15 April is discounted for its whole period.
    assert terms["di_r"]["mrr_end"] == datetime(2026, 5, 15, tzinfo=UTC).isoformat()
    # Once: the first paid period, after the trial.
    assert terms["di_o"]["mrr_end"] == datetime(2026, 4, 15, tzinfo=UTC).isoformat()
    assert terms["di_f"]["mrr_end"] is None and terms["di_f"]["percent_off"] == 20.0
    assert discount_terms({"discounts": ["di_only_an_id"]}) == ({"id": "di_only_an_id"},)


def test_an_invoices_revenue_columns() -> None:
    def line(price: str, amount: int, off: int = 0) -> dict[str, Any]:
        return {
            "amount": amount,
            "pricing": {"price_details": {"price": price}},
            "discount_amounts": [{"amount": off, "discount": "di_1"}] if off else [],
        }

    invoice = {
        "attempt_count": 2,
        "status_transitions": {"finalized_at": 1_800_000_000, "paid_at": 1_800_300_000},
        "lines": {"data": [line("price_plan", 2900, 725), line("price_calls", 1200, 300)]},
        "total_discount_amounts": [{"amount": 1025, "discount": "di_1"}],
    }
    subscriptions = [
        {
            "items": {
                "data": [
                    {"price": {"id": "price_plan", "recurring": {"usage_type": "licensed"}}},
                    {"price": {"id": "price_calls", "recurring": {"usage_type": "metered"}}},
                ]
            }
        }
    ]
    assert metered_prices(subscriptions) == {"price_calls"}
    values = revenue_values(invoice, metered_prices(subscriptions))
    assert values["metered_amount"] == 900 and values["discount_amount"] == 1025  # net of its discount
    assert values["attempt_count"] == 2
    assert values["finalized_at"] == datetime.fromtimestamp(1_800_000_000, tz=UTC)
    assert values["paid_at"] == datetime.fromtimestamp(1_800_300_000, tz=UTC)
