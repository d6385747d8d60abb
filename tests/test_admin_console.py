"""The admin console over HTTP (graph/admin/): sign-in, the session cookie, every page, the
anti-forgery token, and the actions that need no Stripe call. The served app is the real one
(`serve_api`); tests/test_admin_console_browser.py drives it in Chromium against the sandbox.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, update

from billing.ledger import Cause, account_ledger, record_change
from billing.revenue import MetricsInterval, bucket_start
from db.engine import Database
from db.models import account_table, event_table, host_event_table, report_table
from graph.front_door import PAGE_POLICY
from tests.graphql_support import (
    PRODUCTION,
    PRODUCTION_SECRET,
    SERVICE_KEY,
    Api,
    hs256_token,
    insert_account,
    serve_api,
)
from tests.host_receiver import SECRET as HOST_SECRET
from tests.host_receiver import run_host_receiver
from tests.live import Live, LiveOptions

ADMINS = {"admin_user_ids": "op-1", "service_api_key": SERVICE_KEY}
PAGES = ["/admin", "/admin/accounts", "/admin/accounts/op-1", "/admin/operations", "/admin/charts/mrr.svg"]
FIGURES = ("MRR now", "ARR now", "Subscribers", "Ledger", "Stripe events")


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None, page
    return found.group(1)


@asynccontextmanager
async def browser(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """A client that keeps cookies, as a browser, and sends what a same-origin form sends."""
    headers = {"Sec-Fetch-Site": "same-origin", "Origin": api.url}
    async with httpx.AsyncClient(base_url=api.url, timeout=30, headers=headers) as client:
        yield client


async def sign_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    form = await client.get("/admin/sign-in")
    assert form.status_code == 200
    return await client.post("/admin/sign-in", data={"token": token, "csrf_token": csrf_of(form.text)})


async def test_everyone_but_an_operator_is_refused_on_every_page(db: Database) -> None:
    await insert_account(db, "op-1")
    refused = {
        "nobody": None,
        "a user": hs256_token("user-1"),
        "an organisation admin": hs256_token("user-2", org_role="org:admin", o={"rol": "admin"}),
    }
    async with serve_api(db, **ADMINS) as api:
        for who, token in refused.items():
            async with browser(api) as client:
                if token is not None:
                    answer = await sign_in(client, token)
                    assert answer.status_code == 403, who
                    assert "is not an operator" in answer.text
                    assert "billing_admin" not in answer.cookies
                for path in PAGES:
                    page = await client.get(path)
                    assert page.status_code == 401, (who, path)
                    assert page.headers["content-security-policy"] == PAGE_POLICY
                    assert not [figure for figure in FIGURES if figure in page.text], (who, path)
                for path in (
                    "/admin/accounts/op-1/sync",
                    "/admin/events/evt_1/replay",
                    "/admin/usage/u/retry",
                ):
                    assert (await client.post(path, data={"csrf_token": "x" * 43})).status_code == 401
        async with browser(api) as client:  # a forged cookie is no session
            client.cookies.set("billing_admin", "eyJvcCI6Im9wLTEifQ.forged.sig", path="/admin")
            assert (await client.get("/admin")).status_code == 401


async def test_an_operator_signs_in_once_and_out(db: Database) -> None:
    async with serve_api(db, **ADMINS) as api:
        for token, operator in ((hs256_token("op-1"), "op-1"), (SERVICE_KEY, "service")):
            async with browser(api) as client:
                answer = await sign_in(client, token)
                assert answer.status_code == 303 and answer.headers["location"] == "/admin"
                cookie = next(
                    h for h in answer.headers.get_list("set-cookie") if h.startswith("billing_admin=")
                )
                attributes = {part.strip().lower() for part in cookie.split(";")}
                assert {"httponly", "samesite=strict", "path=/admin", "max-age=3600"} <= attributes
                assert "secure" not in attributes  # development, over http
                overview = await client.get("/admin")
                assert overview.status_code == 200 and operator in overview.text
                assert overview.headers["content-security-policy"] == PAGE_POLICY
                assert "<script" not in overview.text
                out = await client.post("/admin/sign-out", data={"csrf_token": csrf_of(overview.text)})
                assert out.status_code == 303
                assert (await client.get("/admin")).status_code == 401


async def test_an_operator_taken_off_the_list_is_signed_out_at_the_next_start(db: Database) -> None:
    async with serve_api(db, **ADMINS) as api, browser(api) as client:
        assert (await sign_in(client, hs256_token("op-1"))).status_code == 303
        cookie = client.cookies["billing_admin"]
    for admins, status in (("op-1", 200), ("op-2", 401)):  # the same secrets, so the same key
        async with serve_api(db, **(ADMINS | {"admin_user_ids": admins})) as api, browser(api) as client:
            client.cookies.set("billing_admin", cookie, path="/admin")
            page = await client.get("/admin")
            assert page.status_code == status, admins
            assert ("MRR now" in page.text) is (status == 200)


async def test_sign_in_needs_its_anti_forgery_token(db: Database) -> None:
    async with serve_api(db, **ADMINS) as api, browser(api) as client:
        await client.get("/admin/sign-in")
        answer = await client.post("/admin/sign-in", data={"token": hs256_token("op-1")})
        assert answer.status_code == 403 and "anti-forgery" in answer.text
        assert "billing_admin" not in answer.cookies
        form = await client.get("/admin/sign-in")
        cross_site = await client.post(
            "/admin/sign-in",
            data={"token": hs256_token("op-1"), "csrf_token": csrf_of(form.text)},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        assert cross_site.status_code == 403


async def test_in_production_the_cookies_are_secure(db: Database) -> None:
    settings = {**ADMINS, **PRODUCTION}
    async with serve_api(db, **settings) as api, browser(api) as client:
        form = await client.get("/admin/sign-in")
        assert "act_as" not in form.text  # no "act as a test user" in production
        (csrf_cookie,) = form.headers.get_list("set-cookie")
        assert "secure" in {part.strip().lower() for part in csrf_cookie.split(";")}
        token = csrf_of(form.text)
        # Over plain HTTP here, a client keeps no Secure cookie: send it as a browser would over HTTPS.
        cookie = {"Cookie": f"billing_admin_csrf={token}"}
        acting = await client.post(
            "/admin/sign-in", data={"act_as": "op-1", "csrf_token": token}, headers=cookie
        )
        assert acting.status_code == 401
        answer = await client.post(
            "/admin/sign-in",
            data={"token": hs256_token("op-1", secret=PRODUCTION_SECRET), "csrf_token": token},
            headers=cookie,
        )
        assert answer.status_code == 303
        session = next(h for h in answer.headers.get_list("set-cookie") if h.startswith("billing_admin="))
        assert "secure" in {part.strip().lower() for part in session.split(";")}


async def _paying_account(db: Database, user_id: str, amount: int) -> None:
    await insert_account(db, user_id)
    now = datetime.now(UTC)
    async with db.write() as conn:
        account_id = (
            await conn.execute(select(account_table.c.id).where(account_table.c.user_id == user_id))
        ).scalar_one()
        await record_change(
            conn,
            account_id=account_id,
            user_id=user_id,
            customer_id=f"cus_{user_id}",
            before=None,
            changes={"status": (None, "active"), "tier": (None, "pro"), "interval": (None, "monthly")},
            stripe_values={"quantity": 1, "unit_amount": amount, "currency": "usd", "discounts": []},
            causes=[Cause("billing sync")],
            effective=now - timedelta(days=5),
            now=now,
        )


async def test_the_overview_shows_the_numbers_of_billing_metrics(database: Database) -> None:
    await _paying_account(database, "payer-1", 2900)
    await _paying_account(database, "payer-2", 9900)
    async with serve_api(database, **ADMINS) as api, browser(api) as client:
        await sign_in(client, SERVICE_KEY)
        overview = (await client.get("/admin")).text
        now = datetime.now(UTC)
        start = bucket_start(now - timedelta(days=90), MetricsInterval.DAY)
        metrics = await api.query(
            "query($from: DateTime!, $to: DateTime!) { billingMetrics(from: $from, to: $to) { mrr arr } }",
            {"from": start.isoformat(), "to": now.isoformat()},
            token=SERVICE_KEY,
        )
        numbers = metrics["data"]["billingMetrics"]
        assert numbers["mrr"] == 12800
        assert f'id="mrr">{numbers["mrr"] / 100:,.2f} USD<' in overview
        assert f'id="arr">{numbers["arr"] / 100:,.2f} USD<' in overview
        for name in ("mrr", "movements"):
            chart = await client.get(f"/admin/charts/{name}.svg")
            assert chart.status_code == 200 and chart.headers["content-type"] == "image/svg+xml"
            assert chart.content.startswith(b"<?xml") and b"<svg" in chart.content
            assert b"<script" not in chart.content and b"http://" not in chart.content.replace(
                b"http://www.w3.org", b""
            ).replace(b"http://pygal.org", b"").replace(b"http://github.com/Kozea/pygal", b"")
        assert (await client.get("/admin/charts/other.svg")).status_code == 404


async def test_find_an_account_by_user_id_email_or_customer(database: Database) -> None:
    await _paying_account(database, "found-1", 2900)
    async with serve_api(database, **ADMINS) as api, browser(api) as client:
        await sign_in(client, SERVICE_KEY)
        for query in ("found-1", "FOUND-1@example.test", "cus_found-1"):
            answer = await client.get("/admin/accounts", params={"q": query})
            assert answer.status_code == 303 and answer.headers["location"] == "/admin/accounts/found-1", (
                query
            )
        page = (await client.get("/admin/accounts/found-1")).text
        assert "billing sync" in page and "Sync this account from Stripe" in page
        assert '<span id="account-status">active</span>' in page
        missing = await client.get("/admin/accounts", params={"q": "nobody@example.test"})
        assert missing.status_code == 404 and "No account" in missing.text


async def _failed_event(db: Database, event_id: str) -> None:
    now = datetime.now(UTC)
    payload: dict[str, Any] = {
        "id": event_id,
        "object": "event",
        "type": "balance.available",  # not one the service applies: ignored once replayed
        "created": int(now.timestamp()),
        "data": {"object": {"object": "balance"}},
    }
    async with db.write() as conn:
        await conn.execute(
            insert(event_table).values(
                id=event_id,
                type="balance.available",
                stripe_created=now,
                received_at=now,
                status="failed",
                attempts=8,
                last_error="boom: the sync failed",
                payload=payload,
            )
        )


async def _event_status(db: Database, event_id: str) -> tuple[str, int]:
    async with db.read() as conn:
        row = (
            await conn.execute(
                select(event_table.c.status, event_table.c.attempts).where(event_table.c.id == event_id)
            )
        ).one()
    return row.status, row.attempts


async def test_replay_a_failed_event_by_button_and_not_without_the_token(database: Database) -> None:
    event_id = f"evt_admin_{datetime.now(UTC).timestamp():.0f}"
    await _failed_event(database, event_id)
    async with serve_api(database, **ADMINS) as api, browser(api) as client:
        await sign_in(client, hs256_token("op-1"))
        operations = (await client.get("/admin/operations")).text
        assert event_id in operations and "boom: the sync failed" in operations
        action = f"/admin/events/{event_id}/replay"
        assert f'action="{action}"' in operations
        for forged in ({}, {"csrf_token": "y" * 43}):
            refused = await client.post(action, data=forged)
            assert refused.status_code == 403 and "anti-forgery" in refused.text
        cross = await client.post(
            action, data={"csrf_token": csrf_of(operations)}, headers={"Origin": "http://evil.test"}
        )
        assert cross.status_code == 403
        assert await _event_status(database, event_id) == ("failed", 8)  # nothing changed
        done = await client.post(action, data={"csrf_token": csrf_of(operations)})
        assert done.status_code == 303
        assert done.headers["location"] == f"/admin/operations?notice=replayed&id={event_id}&outcome=ignored"
        assert await _event_status(database, event_id) == ("ignored", 1)
        after = (await client.get(done.headers["location"])).text
        assert f"Event {event_id} replayed: ignored." in after
        assert f'action="{action}"' not in after  # no longer stuck
        missing = await client.post("/admin/events/evt_none/replay", data={"csrf_token": csrf_of(operations)})
        assert missing.status_code == 404


async def _account_id(database: Database, user_id: str) -> int:
    async with database.read() as conn:
        query = select(account_table.c.id).where(account_table.c.user_id == user_id)
        return int((await conn.execute(query)).scalar_one())


async def test_retry_a_failed_usage_aggregate_by_button(database: Database) -> None:
    await insert_account(database, "metered-1")
    now = datetime.now(UTC)
    minute = now.replace(second=0, microsecond=0) - timedelta(hours=1)
    async with database.write() as conn:
        await conn.execute(
            insert(report_table).values(
                id="ur_" + "a" * 32,
                account_id=await _account_id(database, "metered-1"),
                feature="api_calls",
                event_name="api_calls",
                stripe_customer_id="cus_metered-1",
                minute=minute,
                event_time=minute,
                quantity=7,
                status="failed",
                attempts=5,
                last_error="Stripe refused: no such meter",
                created_at=now,
            )
        )

    async def report() -> tuple[str, int]:
        async with database.read() as conn:
            query = select(report_table.c.status, report_table.c.attempts)
            row = (await conn.execute(query.where(report_table.c.id == "ur_" + "a" * 32))).one()
        return row.status, row.attempts

    # Stripe is a closed port here: the retried aggregate is sent once and waits to be tried again.
    settings = {**ADMINS, "stripe_api_base": "http://127.0.0.1:9", "usage_reporter": False}
    async with serve_api(database, **settings) as api, browser(api) as client:
        await sign_in(client, SERVICE_KEY)
        operations = (await client.get("/admin/operations")).text
        assert "no such meter" in operations
        action = f"/admin/usage/ur_{'a' * 32}/retry"
        assert f'action="{action}"' in operations
        assert (await client.post(action, data={})).status_code == 403
        assert await report() == ("failed", 5)  # nothing changed
        done = await client.post(action, data={"csrf_token": csrf_of(operations)})
        assert done.status_code == 303 and "notice=retried" in done.headers["location"]
        status, attempts = await report()
        assert status == "pending" and attempts <= 1  # queued again, from a fresh attempt count
        after = (await client.get("/admin/operations")).text
        assert f'action="{action}"' not in after  # no longer failed: nothing to retry
        again = await client.post(action, data={"csrf_token": csrf_of(after)})
        assert again.status_code == 404


async def test_replay_a_failed_host_event_by_button(database: Database) -> None:
    await insert_account(database, "hosted-1")
    now = datetime.now(UTC)
    async with run_host_receiver() as receiver:
        async with database.write() as conn:
            inserted = await conn.execute(
                insert(host_event_table)
                .values(
                    message_id="msg_admin_console_1",
                    type="subscription.updated",
                    account_id=await _account_id(database, "hosted-1"),
                    user_id="hosted-1",
                    payload={"type": "subscription.updated", "timestamp": now.isoformat(), "data": {}},
                    created_at=now,
                    status="failed",
                    attempts=9,
                    last_error="the endpoint answered 500",
                    last_status_code=500,
                )
                .returning(host_event_table.c.id)
            )
            event_id = inserted.scalar_one()
        settings = {
            **ADMINS,
            "host_webhook_url": receiver.url,
            "host_webhook_secret": HOST_SECRET,
            "host_events_worker": False,
        }
        async with serve_api(database, **settings) as api, browser(api) as client:
            await sign_in(client, hs256_token("op-1"))
            operations = (await client.get("/admin/operations")).text
            assert "the endpoint answered 500" in operations
            action = f"/admin/host-events/{event_id}/replay"
            assert (await client.post(action, data={"csrf_token": "z" * 43})).status_code == 403
            assert receiver.delivered == []
            done = await client.post(action, data={"csrf_token": csrf_of(operations)})
            assert done.status_code == 303
            assert "outcome=1+delivered" in done.headers["location"], done.headers["location"]
        assert [delivery.message_id for delivery in receiver.delivered] == ["msg_admin_console_1"]


@pytest.fixture
def live_options() -> LiveOptions:
    return LiveOptions(settings={"admin_user_ids": "op-1"})


async def test_sync_by_button_leaves_the_ledger_row_of_billing_sync_with_the_operator(live: Live) -> None:
    user = "drifted-1"
    await live.subscribe(user, "pro_monthly")
    await live.settle()
    database = live.service.database
    async with database.write() as conn:  # drift: the row says canceled, Stripe says active
        await conn.execute(
            update(account_table).where(account_table.c.user_id == user).values(status="canceled")
        )
    account_id = await _account_id(database, user)

    async def ledger() -> list[Any]:
        async with database.read() as conn:
            return await account_ledger(conn, account_id)

    rows_before = await ledger()
    api = Api(url=live.service.url, app=live.service.app)
    async with browser(api) as client:
        await sign_in(client, hs256_token("op-1"))
        page = (await client.get(f"/admin/accounts/{user}")).text
        action = f"/admin/accounts/{user}/sync"
        assert f'action="{action}"' in page
        assert (await client.post(action, data={})).status_code == 403
        assert await ledger() == rows_before  # nothing changed
        done = await client.post(action, data={"csrf_token": csrf_of(page)})
        assert done.status_code == 303
        assert done.headers["location"] == f"/admin/accounts/{user}?notice=synced&id={user}"
        after = (await client.get(done.headers["location"])).text
        assert '<span id="account-status">active</span>' in after
        assert "billing sync" in after and "by op-1" in after
    rows = await ledger()
    assert len(rows) == len(rows_before) + 1
    assert rows[-1].causes == [{"type": "billing sync", "operator": "op-1"}]
    assert rows[-1].before is not None and rows[-1].before["status"] == "canceled"
    assert rows[-1].after["status"] == "active"
    seen = await live.graphql(
        None,
        f'{{ billingAccount(userId: "{user}") {{ ledger {{ causes {{ type operator }} }} }} }}',
        token=hs256_token("op-1"),
    )
    causes = seen["data"]["billingAccount"]["ledger"][-1]["causes"]
    assert causes == [{"type": "billing sync", "operator": "op-1"}]
