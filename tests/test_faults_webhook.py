"""Fault matrix, webhooks: forged, broken, repeated, reordered or failing deliveries to
`POST /webhooks/stripe` get their exact answer, and the database holds nothing it should not
(every state table compared row by row, `tests/db_snapshot.py`).

Rows, and where each is tested:

| row | where |
|---|---|
| missing `Stripe-Signature` header | `test_webhook_signature.py::test_no_header_at_all_is_400`; here: exact answer, every table unchanged (`test_a_refused_delivery_has_its_exact_answer_and_changes_nothing`) |
| malformed header (empty, garbage, bad or missing timestamp, no `v1`, blank values) | `test_webhook_signature.py::test_a_missing_or_malformed_header_is_400_and_nothing_is_stored`; here: the same test |
| wrong secret | `test_webhook_signature.py::test_the_wrong_secret_is_400`; here: the same test |
| tampered body (one byte changed after signing) | `test_webhook_signature.py::test_a_one_byte_change_to_the_body_is_400`; here: the same test |
| stale (> 300 s old) and future (> 300 s ahead) timestamps | `test_webhook_signature.py::test_the_timestamp_tolerance_is_300_seconds_both_ways`; here: the same test |
| rotated secrets: each configured secret accepted, a retired one refused | `test_webhook_signature.py::test_every_configured_secret_is_accepted_during_rotation`, `::test_a_retired_secret_is_refused_after_rotation`; here: the retired one with its exact answer and nothing changed, and a header carrying several `v1` signatures (as Stripe sends while a secret rolls) accepted when one matches (`test_a_header_with_several_signatures_is_accepted_when_one_matches`) |
| invalid JSON, not an object, no id, bad `created` | `test_webhook_signature.py::test_a_valid_signature_over_an_invalid_event_is_400`; here: exact answer, every table unchanged |
| oversized body | `test_webhook_signature.py::test_an_oversized_body_is_413` |
| malformed ids, types and times inside a signed event | `test_faults_bad_input.py::test_a_malformed_signed_event_is_400_and_nothing_is_stored` |
| unknown event type | `test_webhook_coverage.py::test_an_unknown_event_type_is_acknowledged_and_recorded_as_ignored`; here: exact answer, recorded `ignored` with its reason, nothing else written (`test_an_event_we_do_not_act_on_is_recorded_ignored_and_nothing_else_is_written`) |
| duplicates, one after the other | `test_webhook_idempotency.py::test_a_duplicate_delivered_later_is_acknowledged_and_ignored` |
| duplicates in parallel | `test_webhook_idempotency.py::test_ten_parallel_copies_cause_one_effect` |
| duplicates sent to two service processes | `test_webhook_idempotency.py::test_copies_sent_to_two_processes_cause_one_effect` (PostgreSQL) |
| out-of-order permutations | `test_webhook_ordering.py::test_every_permutation_with_stale_duplicates_ends_in_stripes_state`, `::test_an_update_before_its_create_still_converges`; random interleavings of generated lifecycles: `test_properties_webhooks.py` |
| a user's new customer (active, or canceled too) applied before the deletion of her old one | here: `test_a_new_customers_events_before_the_old_customers_deletion_still_link_the_new_one` (while the row still names the old customer as live, `billing.sync` asks Stripe about it, so the new customer is linked and the late deletion leaves it linked) |
| database error mid-handler: failure recorded, nothing half-applied, replay fixes it | `test_webhook_ordering.py::test_a_database_error_mid_handler_is_recorded_and_replay_fixes_it` (the account insert fails); here: the invoice write fails after the account was written in the same transaction, so neither is kept, and a replay writes both (`test_a_failure_after_the_account_write_keeps_neither_and_replay_writes_both`) |
| database down when the event arrives | `test_webhook_idempotency.py::test_a_database_outage_answers_503_so_stripe_retries_and_nothing_is_lost` |
| unknown customer | `test_webhook_coverage.py::test_an_unknown_customer_is_recorded_then_fixed_by_billing_sync` (known to Stripe, not to us); here: a customer Stripe does not know either, recorded `ignored` with its reason and nothing else written (the same test) |
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from billing.clock import utcnow
from billing.settings import DEV_WEBHOOK_SECRET
from billing.stripe_gateway import StripeGateway
from billing.webhooks import Envelope, requeue, store_event
from db.engine import Database
from db.models import event_table, invoice_table
from tests.billing_flows import account, raw_events, setup_catalog, subscribe
from tests.conftest import DbTarget, Service, running_service
from tests.db_snapshot import STATE_TABLES, unchanged
from tests.gateways import open_sandbox_gateway
from tests.graphql_support import insert_account
from tests.stripe_events import body_of, event, post_event, sign

NEW_SECRET = "whsec_faults_new_secret"
OLD_SECRET = "whsec_faults_old_secret"
OTHER_TABLES = tuple(table for table in STATE_TABLES if table is not event_table)


@pytest.fixture
async def quiet(database: Database, sandbox_db: DbTarget) -> AsyncIterator[tuple[Service, StripeGateway]]:
    """Two webhook secrets (rotation), no background worker, no sandbox deliveries: the test
    posts every event and runs the worker itself. The database already holds an account and
    an applied event, so a stray write or delete shows."""
    async with running_service(
        database,
        sandbox_db,
        stripe_webhook_secret=f"{NEW_SECRET},{OLD_SECRET}",
        webhook_worker=False,
        usage_reporter=False,
        sandbox={"deliver_webhooks": False},
    ) as service:
        await insert_account(database, "resident", tier="starter")
        applied = event("customer.updated", {"id": "cus_resident", "object": "customer", "metadata": {}})
        await store_event(database, Envelope(applied["id"], applied["type"], utcnow(), applied), now=utcnow())
        await service.app.state.events.drain()
        async with open_sandbox_gateway(service.url) as gateway:
            yield service, gateway


def genuine() -> dict[str, Any]:
    return event("customer.updated", {"id": "cus_resident", "object": "customer", "metadata": {}})


def refused(reason: str) -> dict[str, str]:
    return {"error": "invalid webhook", "reason": reason}


NO_MATCH = "no signature matches"
MALFORMED = "malformed Stripe-Signature header"
BAD_TIMESTAMP = "malformed Stripe-Signature timestamp"
OUT_OF_TOLERANCE = "signature timestamp outside the tolerance"


def _payload_and_header(case: str) -> tuple[bytes, str | None]:
    payload = body_of(genuine())
    now = int(time.time())
    headers: dict[str, tuple[bytes, str | None]] = {
        "missing header": (payload, None),
        "empty header": (payload, ""),
        "garbage header": (payload, "garbage"),
        "timestamp not a number": (payload, "t=notanumber,v1=abc"),
        "no v1 signature": (payload, f"t={now}"),
        "no timestamp": (payload, "v1=" + sign(payload, NEW_SECRET).split("v1=")[1]),
        "blank values": (payload, "t=,v1="),
        "v0 signature only": (payload, sign(payload, NEW_SECRET).replace("v1=", "v0=")),
        "wrong secret": (payload, sign(payload, "whsec_someone_else")),
        "retired secret": (payload, sign(payload, DEV_WEBHOOK_SECRET)),
        "tampered body": (payload.replace(b"cus_resident", b"cus_residenT"), sign(payload, NEW_SECRET)),
        "signature of another timestamp": (
            payload,
            sign(payload, NEW_SECRET, now).replace(f"t={now}", f"t={now + 1}"),
        ),
        "stale: 301 s old": (payload, sign(payload, NEW_SECRET, now - 301)),
        # A minute past the tolerance: a slow request cannot bring it back within (the exact
        # boundary is tested in test_webhook_signature).
        "future: 360 s ahead": (payload, sign(payload, NEW_SECRET, now + 360)),
        "invalid JSON": (b"{not json", sign(b"{not json", NEW_SECRET)),
        "JSON but not an object": (b"[1,2,3]", sign(b"[1,2,3]", NEW_SECRET)),
        "no event id": (b'{"type": "customer.updated"}', sign(b'{"type": "customer.updated"}', NEW_SECRET)),
    }
    return headers[case]


REFUSALS = [
    ("missing header", "missing Stripe-Signature header"),
    ("empty header", "missing Stripe-Signature header"),
    ("garbage header", MALFORMED),
    ("timestamp not a number", BAD_TIMESTAMP),
    ("no v1 signature", MALFORMED),
    ("no timestamp", MALFORMED),
    ("blank values", BAD_TIMESTAMP),
    ("v0 signature only", MALFORMED),
    ("wrong secret", NO_MATCH),
    ("retired secret", NO_MATCH),
    ("tampered body", NO_MATCH),
    ("signature of another timestamp", NO_MATCH),
    ("stale: 301 s old", OUT_OF_TOLERANCE),
    ("future: 360 s ahead", OUT_OF_TOLERANCE),
    ("invalid JSON", "body is not JSON"),
    ("JSON but not an object", "body is not a JSON object"),
    ("no event id", "event has no valid id"),
]


@pytest.mark.parametrize(("case", "reason"), REFUSALS, ids=[case for case, _ in REFUSALS])
async def test_a_refused_delivery_has_its_exact_answer_and_changes_nothing(
    quiet: tuple[Service, StripeGateway], case: str, reason: str
) -> None:
    service, _ = quiet
    payload, header = _payload_and_header(case)
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Stripe-Signature"] = header
    async with unchanged(service.database), httpx.AsyncClient() as client:
        response = await client.post(f"{service.url}/webhooks/stripe", content=payload, headers=headers)
        await service.app.state.events.drain()
    assert response.status_code == 400
    assert response.json() == refused(reason)


async def test_a_header_with_several_signatures_is_accepted_when_one_matches(
    quiet: tuple[Service, StripeGateway],
) -> None:
    service, _ = quiet
    evt = genuine()
    payload = body_of(evt)
    now = int(time.time())
    unknown = sign(payload, "whsec_not_ours", now).split(",")[1]
    header = f"{sign(payload, OLD_SECRET, now)},{unknown}"
    async with httpx.AsyncClient() as client:
        response = await post_event(client, service.url, payload, header=header)
    assert (response.status_code, response.json()) == (200, {"received": True, "duplicate": False})
    async with service.database.read() as conn:
        stored = (
            await conn.execute(select(event_table.c.status).where(event_table.c.id == evt["id"]))
        ).scalar_one()
    assert stored == "pending"  # stored once, waiting for the worker


async def stored_event(database: Database, event_id: str) -> Any:
    async with database.read() as conn:
        return (await conn.execute(select(event_table).where(event_table.c.id == event_id))).one()


IGNORED = {
    "unknown event type": (
        event("charge.refunded", {"id": "ch_1", "object": "charge", "customer": "cus_resident"}),
        "event type not handled",
    ),
    "a customer nobody knows": (
        event(
            "customer.subscription.updated",
            {"id": "sub_forged", "object": "subscription", "customer": "cus_nobody", "status": "active"},
        ),
        "unknown customer cus_nobody; run `billing sync`",
    ),
}


@pytest.mark.parametrize("case", sorted(IGNORED))
async def test_an_event_we_do_not_act_on_is_recorded_ignored_and_nothing_else_is_written(
    quiet: tuple[Service, StripeGateway], case: str
) -> None:
    service, _ = quiet
    evt, reason = IGNORED[case]
    async with unchanged(service.database, OTHER_TABLES), httpx.AsyncClient() as client:
        response = await post_event(client, service.url, evt, secret=NEW_SECRET)
        report = await service.app.state.events.drain()
    assert (response.status_code, response.json()) == (200, {"received": True, "duplicate": False})
    assert (report.processed, report.ignored, report.failed) == (0, 1, 0)
    row = await stored_event(service.database, evt["id"])
    assert (row.status, row.last_error, row.attempts) == ("ignored", reason, 1)


async def _fail_invoice_writes(database: Database) -> None:
    async with database.write() as conn:
        if database.is_postgres:
            await conn.execute(
                text(
                    "CREATE FUNCTION refuse_invoice() RETURNS trigger AS $$ "
                    "BEGIN RAISE EXCEPTION 'injected invoice failure'; END $$ LANGUAGE plpgsql"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse_invoice BEFORE INSERT OR UPDATE ON invoice "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_invoice()"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse_invoice BEFORE INSERT ON invoice "
                    "BEGIN SELECT RAISE(ABORT, 'injected invoice failure'); END"
                )
            )


async def _allow_invoice_writes(database: Database) -> None:
    async with database.write() as conn:
        if database.is_postgres:
            await conn.execute(text("DROP TRIGGER refuse_invoice ON invoice"))
            await conn.execute(text("DROP FUNCTION refuse_invoice()"))
        else:
            await conn.execute(text("DROP TRIGGER refuse_invoice"))


async def test_a_failure_after_the_account_write_keeps_neither_and_replay_writes_both(
    quiet: tuple[Service, StripeGateway],
) -> None:
    service, gateway = quiet
    database = service.database
    prices = await setup_catalog(gateway)
    customer_id, subscription_id = await subscribe(
        service, gateway, prices, "u-half", "starter_monthly", trial_days=None
    )
    (paid,) = [
        e
        for e in await raw_events(service, type="invoice.paid")
        if e["data"]["object"]["customer"] == customer_id
    ]
    invoice_id = paid["data"]["object"]["id"]

    await _fail_invoice_writes(database)
    try:
        async with unchanged(database, OTHER_TABLES), httpx.AsyncClient() as client:
            response = await post_event(client, service.url, paid, secret=NEW_SECRET)
            report = await service.app.state.events.drain()
    finally:
        await _allow_invoice_writes(database)
    assert (response.status_code, response.json()) == (200, {"received": True, "duplicate": False})
    assert report.failed == 1
    row = await stored_event(database, paid["id"])
    assert row.status == "pending" and "injected invoice failure" in row.last_error and row.attempts == 1
    assert await account(database, "u-half") is None  # the account write went with the invoice's

    assert await requeue(database, event_id=paid["id"], now=utcnow()) == 1  # `billing events replay`
    assert (await service.app.state.events.drain()).processed == 1
    kept = await account(database, "u-half")
    assert (kept.stripe_customer_id, kept.stripe_subscription_id, kept.status) == (
        customer_id,
        subscription_id,
        "active",
    )
    async with database.read() as conn:
        invoice = (await conn.execute(select(invoice_table).where(invoice_table.c.id == invoice_id))).one()
    assert (invoice.status, invoice.amount_paid, invoice.stripe_subscription_id) == (
        "paid",
        2900,
        subscription_id,
    )
    assert (await stored_event(database, paid["id"])).status == "processed"


@pytest.mark.parametrize("new_one_canceled", [False, True], ids=["new-one-active", "new-one-canceled-too"])
async def test_a_new_customers_events_before_the_old_customers_deletion_still_link_the_new_one(
    quiet: tuple[Service, StripeGateway], new_one_canceled: bool
) -> None:
    """The user paid through customer A; A is deleted in Stripe and the user pays again through
    customer B (made outside the API, as in the dashboard), maybe canceling that too. B's events
    are applied while A's deletion is still on its way: the row (still saying A is live) must
    not keep B out, or A's late deletion leaves the user linked to nobody."""
    service, gateway = quiet
    database = service.database
    prices = await setup_catalog(gateway)
    delivered: set[str] = set()

    async def deliver_new_events(held_back: frozenset[str] = frozenset()) -> None:
        async with httpx.AsyncClient() as client:
            for evt in await raw_events(service):
                if evt["id"] not in delivered and evt["id"] not in held_back:
                    assert (await post_event(client, service.url, evt, secret=NEW_SECRET)).status_code == 200
                    delivered.add(evt["id"])
        await service.app.state.events.drain()

    old, _ = await subscribe(service, gateway, prices, "u-moved", "starter_monthly", trial_days=None)
    await deliver_new_events()
    assert (await account(database, "u-moved")).stripe_customer_id == old
    await gateway.v1.customers.delete_async(old)
    deletion = frozenset(e["id"] for e in await raw_events(service)) - delivered  # late, as Stripe may be
    new, subscription_id = await subscribe(
        service, gateway, prices, "u-moved", "pro_monthly", trial_days=None
    )
    if new_one_canceled:
        await gateway.v1.subscriptions.cancel_async(subscription_id)

    await deliver_new_events(held_back=deletion)
    row = await account(database, "u-moved")
    assert (row.stripe_customer_id, row.stripe_subscription_id, row.status, row.tier) == (
        new,
        subscription_id,
        "canceled" if new_one_canceled else "active",
        "pro",
    )
    await deliver_new_events()  # the old customer's deletion arrives at last and changes nothing
    assert await account(database, "u-moved") == row
