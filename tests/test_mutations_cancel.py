"""cancelSubscription and resumeSubscription over HTTP with real user tokens, against the sandbox."""

from __future__ import annotations

import pytest

from billing import plan_changes
from billing.errors import BillingError, ErrorCode
from billing.stripe_objects import stripe_time
from tests.billing_flows import advance, wait_for_account
from tests.graphql_support import error_codes
from tests.live import SUBSCRIPTION, Live, iso, item_of
from tests.stripe_faults import FaultyAt

DAY = 86_400

CANCEL = f"mutation($atPeriodEnd: Boolean!) {{ cancelSubscription(atPeriodEnd: $atPeriodEnd) {{ {SUBSCRIPTION} }} }}"
CANCEL_DEFAULT = f"mutation {{ cancelSubscription {{ {SUBSCRIPTION} }} }}"
RESUME = f"mutation {{ resumeSubscription {{ {SUBSCRIPTION} }} }}"


async def ok(live: Live, user_id: str, query: str, field: str, **variables: object) -> dict[str, object]:
    result = await live.graphql(user_id, query, dict(variables))
    assert "errors" not in result, result
    subscription: dict[str, object] = result["data"][field]
    return subscription


async def test_cancel_at_the_period_end_then_resume(live: Live) -> None:
    _customer, subscription_id = await live.subscribe("c1", "starter_monthly")
    end = item_of(await live.subscription(subscription_id)).current_period_end

    canceled = await ok(live, "c1", CANCEL_DEFAULT, "cancelSubscription")  # atPeriodEnd defaults to true

    assert (canceled["status"], canceled["tier"], canceled["cancelAtPeriodEnd"]) == (
        "ACTIVE",
        "STARTER",
        True,
    )
    assert canceled["currentPeriodEnd"] == iso(end)  # paid time is kept
    assert canceled["canceledAt"] is not None
    assert (await live.subscription(subscription_id)).cancel_at_period_end is True
    await wait_for_account(live.service.database, "c1", cancel_at_period_end=True)
    again = await ok(live, "c1", CANCEL, "cancelSubscription", atPeriodEnd=True)  # a retry changes nothing
    assert again == canceled

    resumed = await ok(live, "c1", RESUME, "resumeSubscription")

    assert (resumed["status"], resumed["cancelAtPeriodEnd"], resumed["canceledAt"]) == ("ACTIVE", False, None)
    after = await live.subscription(subscription_id)
    assert (after.cancel_at_period_end, after.cancel_at) == (False, None)
    await wait_for_account(live.service.database, "c1", cancel_at_period_end=False)
    assert await ok(live, "c1", RESUME, "resumeSubscription") == resumed  # nothing to resume: unchanged

    await advance(live.service, end - (await advance(live.service, 0))["now"] + 2 * 3_600)
    await wait_for_account(
        live.service.database, "c1", status="active", current_period_start=stripe_time(end)
    )


async def test_cancel_now_ends_the_subscription(live: Live) -> None:
    _customer, subscription_id = await live.subscribe("c2", "pro_monthly")
    await advance(live.service, 3 * DAY)

    canceled = await ok(live, "c2", CANCEL, "cancelSubscription", atPeriodEnd=False)

    assert (canceled["status"], canceled["tier"]) == ("CANCELED", "PRO")
    assert (await live.subscription(subscription_id)).status == "canceled"
    assert (await live.viewer("c2"))["status"] == "CANCELED"
    row = await wait_for_account(live.service.database, "c2", status="canceled")
    assert row.canceled_at is not None
    for query in (RESUME, CANCEL_DEFAULT):
        assert error_codes(await live.graphql("c2", query)) == ["NO_SUBSCRIPTION"]


@pytest.mark.parametrize("at_period_end", [True, False], ids=["at_period_end", "now"])
async def test_canceling_releases_a_pending_downgrade_first(live: Live, at_period_end: bool) -> None:
    _customer, subscription_id = await live.subscribe("c3", "pro_monthly")
    pending = await live.change("c3", "STARTER", "MONTHLY")
    schedule_id = (await live.subscription(subscription_id)).schedule
    assert pending["pendingChange"] is not None and schedule_id is not None

    canceled = await ok(live, "c3", CANCEL, "cancelSubscription", atPeriodEnd=at_period_end)

    assert canceled["pendingChange"] is None
    assert canceled["status"] == ("ACTIVE" if at_period_end else "CANCELED")
    assert canceled["cancelAtPeriodEnd"] is at_period_end
    schedule = await live.gateway.v1.subscription_schedules.retrieve_async(str(schedule_id))
    assert schedule.status == "released"  # released, not canceled with the subscription
    after = await live.subscription(subscription_id)
    assert after.schedule is None
    assert item_of(after).price.id == live.prices["pro_monthly"]
    row = await wait_for_account(live.service.database, "c3", pending_tier=None)
    assert row.stripe_schedule_id is None


async def test_without_a_subscription_there_is_nothing_to_cancel_or_resume(live: Live) -> None:
    for query in (CANCEL_DEFAULT, RESUME):
        assert error_codes(await live.graphql("nobody", query)) == ["NO_SUBSCRIPTION"]
        assert error_codes(await live.graphql(None, query)) == ["UNAUTHENTICATED"]


@pytest.mark.parametrize(
    ("query", "variables"),
    [(CANCEL, {"atPeriodEnd": True}), (CANCEL, {"atPeriodEnd": False}), (RESUME, {})],
    ids=["cancel_at_period_end", "cancel_now", "resume"],
)
async def test_a_stripe_outage_is_provider_unavailable_and_changes_nothing(
    live: Live, query: str, variables: dict[str, object]
) -> None:
    _customer, subscription_id = await live.subscribe("c4", "pro_monthly")
    if query == RESUME:
        await ok(live, "c4", CANCEL_DEFAULT, "cancelSubscription")
    else:
        await live.change("c4", "STARTER", "MONTHLY")  # a pending change that must survive
    await live.settle()
    state_before = await live.state("c4")
    stripe_before = (await live.subscription(subscription_id)).to_dict()

    await live.outage()
    result = await live.graphql("c4", query, variables)
    await live.clear_faults()

    assert error_codes(result) == ["BILLING_PROVIDER_UNAVAILABLE"]
    assert result["data"] is None
    assert await live.state("c4") == state_before
    assert (await live.subscription(subscription_id)).to_dict() == stripe_before


async def test_a_pending_change_released_for_a_cancellation_that_fails_is_put_back(live: Live) -> None:
    _customer, subscription_id = await live.subscribe("c5", "pro_monthly")
    await live.change("c5", "STARTER", "MONTHLY")
    schedule_id = (await live.subscription(subscription_id)).schedule
    # Stripe fails once the schedule is released, on the cancellation itself (both attempts).
    gateway = FaultyAt(
        live.service, "cancel subscription at period end", f"/v1/subscriptions/{subscription_id}", 2
    )
    try:
        with pytest.raises(BillingError) as failed:
            await plan_changes.cancel_subscription(
                database=live.service.database,
                gateway=gateway,
                locks=live.service.app.state.events.locks,
                user_id="c5",
                at_period_end=True,
            )
    finally:
        await gateway.close()
        await live.clear_faults()

    assert failed.value.code is ErrorCode.BILLING_PROVIDER_UNAVAILABLE
    after = await live.subscription(subscription_id)
    assert after.cancel_at_period_end is False
    assert after.schedule is not None and after.schedule != schedule_id  # a new schedule, same phases
    restored = await live.gateway.v1.subscription_schedules.retrieve_async(str(after.schedule))
    assert [phase["items"][0]["price"] for phase in restored.phases] == [
        live.prices["pro_monthly"],
        live.prices["starter_monthly"],
    ]
    assert restored.phases[1].start_date == item_of(after).current_period_end
    # The webhooks of the release and of the new schedule bring the account back to where it was.
    await live.settle()
    row = await wait_for_account(
        live.service.database, "c5", pending_tier="starter", cancel_at_period_end=False
    )
    assert row.stripe_schedule_id == after.schedule
