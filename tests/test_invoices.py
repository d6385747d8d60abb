"""viewer.invoices: the invoice table kept by the webhook sync (and by confirmCheckoutSession), newest first."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from billing.stripe_gateway import StripeGateway
from db.engine import Database
from db.models import invoice_table
from tests.billing_flows import account, advance, setup_catalog
from tests.checkout_flows import gql, settle, subscribe_via_api, token
from tests.conftest import DbTarget, Service, running_service
from tests.gateways import open_sandbox_gateway
from tests.graphql_support import error_codes, insert_account, only_error

INVOICES = """query($first: Int) {
  viewer {
    invoices(first: $first) {
      id number status amountDue amountPaid total currency hostedInvoiceUrl invoicePdf
      periodStart periodEnd created
    }
  }
}"""
DEFAULT = "{ viewer { invoices { id } } }"


async def invoices(service: Service, user_token: str, first: int | None = None) -> list[dict[str, Any]]:
    result = await gql(service, INVOICES, {"first": first}, token=user_token)
    assert "errors" not in result, result
    found: list[dict[str, Any]] = result["data"]["viewer"]["invoices"]
    return found


@pytest.fixture
async def lagging(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Service]:
    async with running_service(database, sandbox_db, webhook_worker=False) as service:
        yield service


async def test_confirming_a_checkout_lists_its_first_invoice_at_once(lagging: Service) -> None:
    async with open_sandbox_gateway(lagging.url) as gateway:
        await setup_catalog(gateway)
        user = token("una")
        assert await invoices(lagging, user) == []
        await subscribe_via_api(lagging, user)  # no webhook worker: only the confirmation syncs
        (first,) = await invoices(lagging, user)
        row = await account(lagging.database, "una")
        subscription = await gateway.v1.subscriptions.retrieve_async(row.stripe_subscription_id)
        assert first["id"] == subscription.latest_invoice
        assert first["status"] == "paid" and first["total"] == 0 and first["currency"] == "usd"  # the trial


async def test_invoices_after_a_paid_checkout_and_the_first_renewal_newest_first(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    await setup_catalog(stripe_gateway)
    user = token("vic")
    await subscribe_via_api(service, user, "STARTER", "MONTHLY")
    await advance(service, 15 * 24 * 3600)  # the trial ends: the first charge, finalized an hour later
    await settle(service)

    listed = await invoices(service, user)
    assert [invoice["status"] for invoice in listed] == ["paid", "paid"]
    renewal, trial = listed
    assert trial["total"] == 0 and trial["amountDue"] == 0
    assert (renewal["amountDue"], renewal["amountPaid"], renewal["total"]) == (2900, 2900, 2900)
    assert renewal["created"] > trial["created"]
    row = await account(service.database, "vic")
    stripe_invoice = await stripe_gateway.v1.invoices.retrieve_async(renewal["id"])
    assert stripe_invoice.customer == row.stripe_customer_id
    assert renewal["number"] == stripe_invoice.number and renewal["number"]
    assert renewal["hostedInvoiceUrl"] == stripe_invoice.hosted_invoice_url
    assert renewal["invoicePdf"] == stripe_invoice.invoice_pdf
    assert datetime.fromisoformat(renewal["periodStart"]) == datetime.fromtimestamp(
        stripe_invoice.period_start, UTC
    )
    assert datetime.fromisoformat(renewal["periodEnd"]) == datetime.fromtimestamp(
        stripe_invoice.period_end, UTC
    )
    assert await invoices(service, user, first=1) == [renewal]


async def insert_invoices(
    database: Database, customer_id: str, count: int, *, prefix: str = "in", **fields: Any
) -> list[str]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = []
    async with database.write() as conn:
        for n in range(count):
            invoice_id = f"{prefix}_{customer_id}_{n:03d}"
            ids.append(invoice_id)
            values: dict[str, Any] = {
                "id": invoice_id,
                "stripe_customer_id": customer_id,
                "number": f"N-{n:03d}",
                "status": "paid",
                "currency": "usd",
                "amount_due": 100 + n,
                "amount_paid": 100 + n,
                "amount_remaining": 0,
                "total": 100 + n,
                "created": start + timedelta(days=n),
                "synced_at": start,
                **fields,
            }
            await conn.execute(insert(invoice_table).values(**values))
    return ids


async def test_first_is_capped_at_100_and_below_1_is_bad_user_input(service: Service) -> None:
    await insert_account(service.database, "wes", status="active")
    ids = await insert_invoices(service.database, "cus_wes", 105)
    user = token("wes")

    assert len(await invoices(service, user, first=1000)) == 100
    newest = [invoice["id"] for invoice in await invoices(service, user, first=3)]
    assert newest == [ids[104], ids[103], ids[102]]
    default = await gql(service, DEFAULT, token=user)
    assert len(default["data"]["viewer"]["invoices"]) == 10
    explicit_null = await gql(service, INVOICES, {"first": None}, token=user)
    assert len(explicit_null["data"]["viewer"]["invoices"]) == 10
    for bad in (0, -5):
        result = await gql(service, INVOICES, {"first": bad}, token=user)
        error = only_error(result)
        assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "first"}
        assert error["path"] == ["viewer", "invoices"]


async def test_only_the_viewers_finalized_invoices(service: Service) -> None:
    await insert_account(service.database, "xena", status="active")
    await insert_account(service.database, "yuri", status="active")
    mine = await insert_invoices(service.database, "cus_xena", 2)
    await insert_invoices(service.database, "cus_xena", 1, prefix="draft", status="draft", number=None)
    await insert_invoices(service.database, "cus_yuri", 3)
    listed = await invoices(service, token("xena"))
    assert [invoice["id"] for invoice in listed] == [mine[1], mine[0]]
    assert listed[0] == {
        "id": mine[1],
        "number": "N-001",
        "status": "paid",
        "amountDue": 101,
        "amountPaid": 101,
        "total": 101,
        "currency": "usd",
        "hostedInvoiceUrl": None,
        "invoicePdf": None,
        "periodStart": None,
        "periodEnd": None,
        "created": "2026-01-02T00:00:00+00:00",
    }
    assert await invoices(service, token("nobody")) == []
    assert error_codes(await gql(service, DEFAULT, token="not-a-token")) == ["UNAUTHENTICATED"]
