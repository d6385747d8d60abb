"""Invoices: list, retrieve, lines, pay, and `create_preview` (what a subscription change charges)."""

from __future__ import annotations

from typing import Any

from stripe.params import (
    InvoiceCreatePreviewParams,
    InvoiceListLinesParams,
    InvoiceListParams,
    InvoicePayParams,
    InvoiceRetrieveParams,
)

from stripe_sandbox.api import Call, created_filter, endpoint, paginate
from stripe_sandbox.engine import changes, invoicing, payments, periods
from stripe_sandbox.errors import StripeError, parameter_invalid, parameter_missing, unsupported


@endpoint("GET", "/v1/invoices", InvoiceListParams)
async def list_invoices(call: Call) -> dict[str, Any]:
    params = call.params
    for key in ("due_date", "customer_account"):
        if key in params:
            raise unsupported(key)
    in_range = created_filter(params)

    def wanted(invoice: dict[str, Any]) -> bool:
        return (
            in_range(invoice)
            and params.get("customer") in (None, invoice.get("customer"))
            and params.get("status") in (None, invoice.get("status"))
            and params.get("subscription") in (None, payments.subscription_of(invoice))
            and params.get("collection_method") in (None, invoice.get("collection_method"))
        )

    return paginate(await call.tx.all("invoice", wanted), params, call.url)


@endpoint("GET", "/v1/invoices/{id}", InvoiceRetrieveParams)
async def retrieve_invoice(call: Call) -> dict[str, Any]:
    return await call.tx.get("invoice", call.path["id"])


@endpoint("GET", "/v1/invoices/{id}/lines", InvoiceListLinesParams)
async def list_invoice_lines(call: Call) -> dict[str, Any]:
    invoice = await call.tx.get("invoice", call.path["id"])
    lines = invoice["lines"]
    return paginate(list(lines["data"]), call.params, str(lines["url"]))


@endpoint("POST", "/v1/invoices/{id}/pay", InvoicePayParams)
async def pay_invoice(call: Call) -> dict[str, Any]:
    for key in call.params:
        if key not in ("expand", "off_session"):
            raise unsupported(key)
    invoice = await call.tx.get("invoice", call.path["id"])
    return await invoicing.pay_invoice(call.tx, call.config, invoice, call.tx.now())


_PREVIEW_DETAILS = {
    "items",
    "proration_behavior",
    "proration_date",
    "billing_cycle_anchor",
    "cancel_at_period_end",
}


@endpoint("POST", "/v1/invoices/create_preview", InvoiceCreatePreviewParams)
async def create_preview(call: Call) -> dict[str, Any]:
    """The invoice a subscription change bills now, or else the subscription's next invoice."""
    tx = call.tx
    params = call.params
    for key in params:
        if key not in ("customer", "subscription", "subscription_details", "expand", "preview_mode"):
            raise unsupported(key)
    details = params.get("subscription_details") or {}
    for key in details:
        if key not in _PREVIEW_DETAILS:
            raise unsupported(f"subscription_details[{key}]")
    now = tx.now()
    subscription_id = params.get("subscription")
    if subscription_id is None:
        customer_id = params.get("customer")
        if customer_id is None:
            raise parameter_missing("customer")
        await tx.get("customer", customer_id, param="customer")
        if details.get("items"):
            raise unsupported(
                "subscription_details[items]", "previews of new subscriptions: pass `subscription`"
            )
        live = await tx.all(
            "subscription",
            lambda s: s.get("customer") == customer_id and s.get("status") in periods.LIVE_STATUSES,
        )
        if not live:
            raise StripeError(
                404,
                f"No upcoming invoices for customer: {customer_id}",
                code="invoice_upcoming_none",
            )
        subscription = min(live, key=lambda s: periods.period_of(s)[1])
    else:
        subscription = await tx.get("subscription", subscription_id, param="subscription")
        if params.get("customer") not in (None, subscription["customer"]):
            raise parameter_invalid("customer", "The subscription does not belong to this customer.")
    if subscription["status"] in ("canceled", "incomplete_expired"):
        raise StripeError(
            404,
            f"No upcoming invoices for subscription: {subscription['id']}",
            code="invoice_upcoming_none",
        )
    change = None
    reset = (details.get("billing_cycle_anchor") or {}).get("type") == "now"
    if details.get("items") or reset:
        behavior = str(details.get("proration_behavior") or "create_prorations")
        if details.get("proration_date") is not None and behavior == "none":
            raise parameter_invalid(
                "subscription_details[proration_date]",
                "proration_date cannot be set when proration_behavior is `none`.",
            )
        items = await changes.resolve_items(
            tx,
            subscription,
            details.get("items") or [],
            now,
            param="subscription_details[items]",
        )
        change = await changes.plan_change(
            tx,
            subscription,
            items,
            proration_behavior=behavior,
            now=now,
            proration_date=details.get("proration_date"),
            reset_anchor=reset,
        )
    if details.get("cancel_at_period_end"):
        raise StripeError(
            404,
            f"No upcoming invoices for subscription: {subscription['id']} (it ends at the period end).",
            code="invoice_upcoming_none",
        )
    return await changes.preview_change(tx, subscription, change, now)
