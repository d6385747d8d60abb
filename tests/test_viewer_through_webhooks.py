"""The viewer before and after a subscription made in the sandbox and applied by the webhook route."""

from __future__ import annotations

import httpx

from tests.billing_flows import advance, card_fails, subscribe, wait_for_account
from tests.conftest import Service
from tests.graphql_support import hs256_token
from tests.live import Live

VIEWER = "{ viewer { id subscription { status tier interval hasAccess cancelAtPeriodEnd priceId currentPeriodEnd } } }"
DAY = 86_400


async def viewer(service: Service, user_id: str) -> dict[str, object]:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{service.url}/graphql",
            json={"query": VIEWER},
            headers={"Authorization": f"Bearer {hs256_token(user_id)}"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    result: dict[str, object] = body["data"]["viewer"]["subscription"]
    return result


async def test_the_viewer_follows_the_subscription_through_the_webhook_route(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    before = await viewer(service, "u1")
    assert (before["status"], before["tier"], before["hasAccess"]) == ("NONE", "NONE", False)

    customer_id, _ = await subscribe(service, gateway, prices, "u1", "pro_annual")
    await wait_for_account(service.database, "u1", status="trialing")
    during = await viewer(service, "u1")
    assert (during["status"], during["tier"], during["interval"], during["hasAccess"]) == (
        "TRIALING",
        "PRO",
        "ANNUAL",
        True,
    )
    assert during["priceId"] == prices["pro_annual"]

    await card_fails(service, customer_id)
    await advance(service, 15 * DAY)  # the trial ends and the first charge fails
    await wait_for_account(service.database, "u1", status="past_due")
    late = await viewer(service, "u1")
    assert (late["status"], late["tier"], late["hasAccess"]) == (
        "PAST_DUE",
        "PRO",
        True,
    )  # within the grace period

    await advance(service, 30 * DAY)  # every retry fails: canceled
    await wait_for_account(service.database, "u1", status="canceled")
    after = await viewer(service, "u1")
    assert (after["status"], after["hasAccess"]) == ("CANCELED", False)
