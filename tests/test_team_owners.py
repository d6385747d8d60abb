"""Everything follows the active owner (issue 27, part 4): the permission classes, quotas and
usage, `recordUsage` by organisation, the live updates; and one organisation never sees another's.
The served API over the test database (no Stripe needed), on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import insert, update

from billing.plans import load_catalog
from billing.realtime import publish_account_change
from billing.usage import UsageInput, record_usage
from db.engine import Database
from db.models import account_table, invoice_table
from examples.host_app import create_host_app
from tests.billing_flows import account
from tests.conftest import free_port, serve
from tests.graphql_support import (
    SERVICE_KEY,
    Api,
    error_codes,
    hs256_token,
    insert_account,
    serve_api,
    settings_for,
)
from tests.realtime_support import live_socket

GATED = "{ forecast { months } cohorts { name } }"
USAGE = '{ viewer { organizationId usage(feature: "api_calls") { used limit } } }'
INVOICES = "{ viewer { invoices { id } } }"
RECORD = """mutation($input: RecordUsageInput!) { recordUsage(input: $input) { userId orgId quantity } }"""
ORG_SUBSCRIPTION = "query($org: ID!) { organizationSubscription(orgId: $org) { tier seats } }"
QUIET = 0.5


def member(user_id: str, org_id: str) -> str:
    return hs256_token(user_id, o={"id": org_id, "rol": "member"})


async def seed(database: Database) -> None:
    """Organisation A on Pro with 3 seats; ada's own Starter plan; B has no plan."""
    await insert_account(database, "org:org_a", owner_kind="organization", tier="pro", seats=3)
    await insert_account(database, "ada", tier="starter")


@pytest.fixture
async def api(database: Database) -> AsyncIterator[Api]:
    await seed(database)
    async with serve_api(database, service_api_key=SERVICE_KEY) as served:
        yield served


@pytest.fixture
async def host(database: Database) -> AsyncIterator[Api]:
    """The example host app: billing's queries and its own fields gated by tier and feature."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_host_app(settings_for(url, service_api_key=SERVICE_KEY), database=database)
    await seed(database)
    async with serve(app, port):
        yield Api(url=url, app=app)


async def test_gated_fields_judge_the_viewer_by_the_active_organisation(host: Api) -> None:
    allowed = await host.query(GATED, token=member("ada", "org_a"))
    assert "errors" not in allowed, allowed
    assert allowed["data"]["forecast"]["months"] == 3
    # The same user on their own (Starter) plan, and as a member of B (no plan): refused.
    for token in (hs256_token("ada"), member("ada", "org_b")):
        refused = await host.query(GATED, token=token)
        assert sorted(error_codes(refused)) == ["FEATURE_NOT_IN_PLAN", "FORBIDDEN_TIER"], refused


async def test_usage_is_recorded_and_counted_per_owner(api: Api) -> None:
    recorded = await api.query(
        RECORD,
        {"input": {"orgId": "org_a", "feature": "api_calls", "quantity": 5, "idempotencyKey": "k1"}},
        token=SERVICE_KEY,
    )
    assert "errors" not in recorded, recorded
    assert recorded["data"]["recordUsage"] == {"userId": "org:org_a", "orgId": "org_a", "quantity": 5}
    personal = await api.query(
        RECORD,
        {"input": {"userId": "ada", "feature": "api_calls", "quantity": 2, "idempotencyKey": "k1"}},
        token=SERVICE_KEY,
    )
    assert personal["data"]["recordUsage"]["orgId"] is None
    both = await api.query(
        RECORD,
        {
            "input": {
                "userId": "ada",
                "orgId": "org_a",
                "feature": "api_calls",
                "quantity": 1,
                "idempotencyKey": "k",
            }
        },
        token=SERVICE_KEY,
    )
    assert error_codes(both) == ["BAD_USER_INPUT"]

    seen = {
        name: (await api.query(USAGE, token=token))["data"]["viewer"]
        for name, token in (
            ("a-bob", member("bob", "org_a")),
            ("a-ada", member("ada", "org_a")),
            ("ada", hs256_token("ada")),
            ("b-bob", member("bob", "org_b")),
        )
    }
    assert (
        seen["a-bob"] == seen["a-ada"] == {"organizationId": "org_a", "usage": {"used": 5, "limit": 100000}}
    )
    assert seen["ada"] == {"organizationId": None, "usage": {"used": 2, "limit": 10000}}
    assert seen["b-bob"]["usage"]["used"] == 0


async def test_a_member_of_one_organisation_never_sees_anothers_state(api: Api, database: Database) -> None:
    now = datetime.now(UTC)
    async with database.write() as conn:
        await conn.execute(
            insert(invoice_table).values(
                id="in_a",
                stripe_customer_id="cus_org:org_a",
                status="paid",
                currency="usd",
                amount_due=3750,
                amount_paid=3750,
                amount_remaining=0,
                total=3750,
                created=now - timedelta(days=1),
                synced_at=now,
            )
        )
    assert (await api.query(INVOICES, token=member("bob", "org_a")))["data"]["viewer"]["invoices"] == [
        {"id": "in_a"}
    ]
    for token in (member("bob", "org_b"), hs256_token("bob")):
        assert (await api.query(INVOICES, token=token))["data"]["viewer"]["invoices"] == []
        viewer = await api.query("{ viewer { subscription { tier seats } } }", token=token)
        assert viewer["data"]["viewer"]["subscription"] == {"tier": "NONE", "seats": None}
        # The service's id-taking fields are the service's alone.
        refused = await api.query(ORG_SUBSCRIPTION, {"org": "org_a"}, token=token)
        assert error_codes(refused) == ["FORBIDDEN"]
    served = await api.query(ORG_SUBSCRIPTION, {"org": "org_a"}, token=SERVICE_KEY)
    assert served["data"]["organizationSubscription"] == {"tier": "PRO", "seats": 3}


async def test_an_organisations_change_reaches_its_connected_members_only(
    api: Api, database: Database
) -> None:
    async with (
        live_socket(api.url, member("bob", "org_a")) as bob,
        live_socket(api.url, member("cy", "org_a")) as cy,
        live_socket(api.url, member("dan", "org_b")) as dan,
        live_socket(api.url, hs256_token("bob")) as personal,
    ):
        for socket in (bob, cy, dan, personal):
            await socket.subscribe()
        for socket in (bob, cy):
            assert (await socket.next_state())[1]["tier"] == "PRO"
        for socket in (dan, personal):
            assert (await socket.next_state())[1]["tier"] == "NONE"
        row = await account(database, "org:org_a")
        async with database.write() as conn:
            await conn.execute(
                update(account_table).where(account_table.c.id == row.id).values(cancel_at_period_end=True)
            )
            await publish_account_change(conn, database, row.id)
        for socket in (bob, cy):
            _at, state = await socket.state_where(lambda s: s["cancelAtPeriodEnd"] is True)
            assert state["tier"] == "PRO"
        await asyncio.sleep(QUIET)
        assert dan.unread() == [] and personal.unread() == []


async def test_a_socket_is_closed_when_its_token_expires_and_hears_nothing_after(
    api: Api, database: Database
) -> None:
    # `exp` is whole seconds, so the socket lives 5 to 6 s: time enough, on a loaded machine, to
    # open both sockets and subscribe (2 s left as little as 1 s, and eve was closed before it).
    short = hs256_token("eve", ttl=timedelta(seconds=6), o={"id": "org_a", "rol": "member"})
    async with live_socket(api.url, short) as eve, live_socket(api.url, member("bob", "org_a")) as bob:
        for socket in (eve, bob):
            await socket.subscribe()
            assert (await socket.next_state())[1]["tier"] == "PRO"
        assert await eve.closed_with(within=15) == 4403
        row = await account(database, "org:org_a")
        async with database.write() as conn:
            await conn.execute(
                update(account_table).where(account_table.c.id == row.id).values(cancel_at_period_end=True)
            )
            await publish_account_change(conn, database, row.id)
        await bob.state_where(lambda s: s["cancelAtPeriodEnd"] is True)  # the member still connected hears it
        assert bob.closed is None
        assert [m for m in eve.unread() if m.get("type") == "next"] == []


async def test_operators_see_the_owner_of_an_account(api: Api) -> None:
    query = (
        "query($u: ID!) { billingAccount(userId: $u) { userId organizationId subscription { tier seats } } }"
    )
    found = await api.query(query, {"u": "org:org_a"}, token=SERVICE_KEY)
    assert found["data"]["billingAccount"] == {
        "userId": "org:org_a",
        "organizationId": "org_a",
        "subscription": {"tier": "PRO", "seats": 3},
    }
    personal = await api.query(query, {"u": "ada"}, token=SERVICE_KEY)
    assert personal["data"]["billingAccount"]["organizationId"] is None


async def test_a_quota_is_the_organisations_and_a_members_use_counts_against_it(
    host: Api, database: Database
) -> None:
    """WithinQuota judges the organisation's usage; the host app's in-process recording (the
    example's `lookup`) counts the member's use against the organisation, not the member."""
    await record_usage(
        database=database,
        catalog=load_catalog(),
        records=[UsageInput("org:org_a", "api_calls", 99_999, "bulk")],
    )
    lookup = '{ lookup(query: "abc") { answer } }'
    first = await host.query(lookup, token=member("bob", "org_a"))
    assert first["data"]["lookup"] == {"answer": "cba"}, first
    refused = await host.query(lookup, token=member("cy", "org_a"))  # the 100,000th use was bob's
    assert error_codes(refused) == ["QUOTA_EXCEEDED"], refused
    personal = await host.query(lookup, token=hs256_token("bob"))  # bob's own plan: none
    assert error_codes(personal) == ["FEATURE_NOT_IN_PLAN"], personal
    own = await host.query(lookup, token=hs256_token("ada"))  # ada's own Starter quota is untouched
    assert own["data"]["lookup"] == {"answer": "cba"}, own
    usage = await host.query(USAGE, token=member("ada", "org_a"))
    assert usage["data"]["viewer"]["usage"]["used"] == 100_000


async def test_the_admin_console_names_an_accounts_owner(api: Api) -> None:
    headers = {"Sec-Fetch-Site": "same-origin", "Origin": api.url}
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=headers) as client:
        form = await client.get("/admin/sign-in")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert csrf is not None, form.text
        signed_in = await client.post(
            "/admin/sign-in", data={"token": SERVICE_KEY, "csrf_token": csrf.group(1)}
        )
        assert signed_in.status_code == 303, signed_in.text
        found = await client.get("/admin/accounts", params={"q": "org:org_a"})
        assert found.status_code == 303 and found.headers["location"] == "/admin/accounts/org%3Aorg_a"
        page = (await client.get(found.headers["location"])).text
        personal = (await client.get("/admin/accounts/ada")).text
    assert "<td>organisation org_a</td>" in page
    assert "<td>user ada</td>" in personal
