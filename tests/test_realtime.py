"""Real-time billing state over graphql-transport-ws, against the running service on a real port.

A state change made the way production makes it (a signed webhook from the Stripe sandbox, a
`billing sync`) reaches the subscribed user within one second of its commit; nobody else hears
of it. Auth, the protocol's close codes and the websocket limits hold.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from db.engine import Database
from tests.billing_flows import settle, setup_catalog, subscribe
from tests.conftest import Service
from tests.graphql_support import SERVICE_KEY, hs256_token, insert_account, serve_api
from tests.realtime_support import DELIVERY, SUBSCRIPTION, live_socket, watch_commit

NEVER_SUBSCRIBED = {
    "status": "NONE",
    "tier": "NONE",
    "interval": None,
    "currentPeriodEnd": None,
    "cancelAtPeriodEnd": False,
    "hasAccess": False,
}
QUIET = 0.5  # how long a socket that must hear nothing is listened to, after the others heard


async def test_a_subscriber_gets_its_state_then_each_webhook_change_and_no_one_else_does(
    service: Service, stripe_gateway: Any
) -> None:
    prices = await setup_catalog(stripe_gateway)
    async with (
        live_socket(service.url, hs256_token("rt-ada")) as ada,
        live_socket(service.url, hs256_token("rt-bob")) as bob,
    ):
        await ada.subscribe()
        await bob.subscribe()
        assert (await ada.next_state())[1] == NEVER_SUBSCRIBED
        assert (await bob.next_state())[1] == NEVER_SUBSCRIBED

        # Checkout in the sandbox; its own delivery posts the signed webhooks to the service.
        committed = watch_commit(service.database, "rt-ada", status="trialing")
        _customer, subscription_id = await subscribe(service, stripe_gateway, prices, "rt-ada")
        at, state = await ada.state_where(lambda s: s["status"] == "TRIALING")
        assert at - await committed < DELIVERY
        assert state["tier"] == "STARTER" and state["interval"] == "MONTHLY" and state["hasAccess"] is True
        assert state["currentPeriodEnd"] is not None and state["cancelAtPeriodEnd"] is False

        # The customer cancels at the period end (customer.subscription.updated).
        committed = watch_commit(service.database, "rt-ada", cancel_at_period_end=True)
        await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
        at, state = await ada.state_where(lambda s: s["cancelAtPeriodEnd"] is True)
        assert at - await committed < DELIVERY
        assert state["status"] == "TRIALING" and state["hasAccess"] is True

        await settle(service.url, service.database)
        await asyncio.sleep(QUIET)
        assert bob.unread() == []  # another user's socket heard nothing
        assert ada.closed is None and bob.closed is None


async def test_one_user_on_two_sockets_gets_the_change_on_both(database: Database) -> None:
    async with serve_api(database) as api:
        token = hs256_token("rt-tabs")
        async with live_socket(api.url, token) as first, live_socket(api.url, token) as second:
            await first.subscribe()
            await second.subscribe("7")
            assert (await first.next_state())[1] == NEVER_SUBSCRIBED
            assert (await second.next_state("7"))[1] == NEVER_SUBSCRIBED
            # A row written without a notification is picked up by the next change signal only;
            # the one write path that publishes is billing.sync (tested end to end above).
            from billing.realtime import publish_account_change
            from tests.billing_flows import account

            await insert_account(database, "rt-tabs", status="active", tier="pro")
            row = await account(database, "rt-tabs")
            async with database.write() as conn:
                await publish_account_change(conn, database, row.id)
            for socket, operation in ((first, "1"), (second, "7")):
                _at, state = await socket.state_where(lambda s: s["status"] == "ACTIVE", operation)
                assert state["tier"] == "PRO" and state["hasAccess"] is True


# Auth and the protocol ------------------------------------------------------------------------


@pytest.mark.parametrize("credentials", ["missing", "garbage", "expired", "not-bearer"])
async def test_a_bad_or_missing_token_closes_the_socket_with_4403(
    database: Database, credentials: str
) -> None:
    from datetime import timedelta

    payload: dict[str, Any] = {
        "missing": {},
        "garbage": {"authorization": "Bearer not.a.token"},
        "expired": {"authorization": f"Bearer {hs256_token('rt-late', ttl=timedelta(minutes=-5))}"},
        "not-bearer": {"authorization": f"Basic {hs256_token('rt-basic')}"},
    }[credentials]
    async with serve_api(database) as api, live_socket(api.url, init=False) as socket:
        await socket.send({"type": "connection_init", "payload": payload})
        assert await socket.closed_with() == 4403
        assert socket.unread() == []  # no connection_ack


async def test_subscribing_before_connection_init_closes_the_socket_with_4401(database: Database) -> None:
    async with serve_api(database) as api, live_socket(api.url, init=False) as socket:
        await socket.subscribe()
        assert await socket.closed_with() == 4401
        assert socket.unread() == []


async def test_the_service_key_connects_but_has_no_billing_state_to_watch(database: Database) -> None:
    async with (
        serve_api(database, service_api_key=SERVICE_KEY) as api,
        live_socket(api.url, SERVICE_KEY) as socket,
    ):
        await socket.subscribe()
        message = (await socket.next_message()).message
        assert message["id"] == "1" and message["type"] in {"next", "error"}, message
        errors = message["payload"]["errors"] if message["type"] == "next" else message["payload"]
        assert [error["extensions"]["code"] for error in errors] == ["FORBIDDEN"]


async def test_queries_still_run_over_the_socket(database: Database) -> None:
    await insert_account(database, "rt-query", status="trialing", tier="starter")
    async with serve_api(database) as api, live_socket(api.url, hs256_token("rt-query")) as socket:
        await socket.subscribe("q", "{ viewer { subscription { status } } }")
        message = (await socket.next_message()).message
        assert message["payload"] == {"data": {"viewer": {"subscription": {"status": "TRIALING"}}}}
        assert (await socket.next_message()).message == {"id": "q", "type": "complete"}


# Limits ---------------------------------------------------------------------------------------


async def test_operations_per_connection_are_capped_by_ws_max_operations(database: Database) -> None:
    async with (
        serve_api(database, ws_max_operations=2) as api,
        live_socket(api.url, hs256_token("rt-cap")) as socket,
    ):
        await socket.subscribe("1")
        await socket.subscribe("2")
        assert (await socket.next_state("1"))[1] == NEVER_SUBSCRIBED
        assert (await socket.next_state("2"))[1] == NEVER_SUBSCRIBED
        await socket.subscribe("3")
        refused = (await socket.next_message("3")).message
        assert refused["id"] == "3" and refused["type"] == "error", refused
        assert [error["extensions"]["code"] for error in refused["payload"]] == ["RATE_LIMITED"]
        assert refused["payload"][0]["extensions"]["limit"] == 2

        await socket.send({"id": "1", "type": "complete"})  # frees a slot
        for _attempt in range(50):  # the server forgets the operation asynchronously
            await socket.subscribe("4")
            message = (await socket.next_message("4")).message
            if message["type"] == "next":
                break
            assert message["type"] == "error" and message["id"] == "4", message
            await asyncio.sleep(0.05)
        assert message == {
            "id": "4",
            "type": "next",
            "payload": {"data": {"billingStateChanged": NEVER_SUBSCRIBED}},
        }
        assert socket.closed is None


async def test_connections_per_process_are_capped_by_ws_max_connections(database: Database) -> None:
    async with serve_api(database, ws_max_connections=1) as api:
        async with live_socket(api.url, hs256_token("rt-one")) as first:
            async with live_socket(api.url, init=False) as second:
                assert await second.closed_with() == 1013  # try again later
            await first.subscribe()
            assert (await first.next_state())[1] == NEVER_SUBSCRIBED
        # The slot is free again once the first socket is gone.
        for _attempt in range(50):
            async with live_socket(api.url, init=False) as third:
                await third.send(
                    {
                        "type": "connection_init",
                        "payload": {"authorization": f"Bearer {hs256_token('rt-one')}"},
                    }
                )
                message = await third.next_message()
                if message.message.get("type") == "connection_ack":
                    break
            await asyncio.sleep(0.05)
        assert message.message == {"type": "connection_ack"}


async def test_the_subscription_is_in_the_schema(database: Database) -> None:
    async with serve_api(database) as api:
        result = await api.query("{ __schema { subscriptionType { name fields { name } } } }")
    assert result["data"]["__schema"]["subscriptionType"] == {
        "name": "BillingUpdates",
        "fields": [{"name": "billingStateChanged"}],
    }
    assert "billingStateChanged" in SUBSCRIPTION
