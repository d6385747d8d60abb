"""Invoices built, stored, finalized and paid, and what a payment outcome does to the subscription.

Canceling a subscription is here too: it is where dunning ends (`settle_subscription`).
"""

from __future__ import annotations

from stripe_sandbox.api import SandboxConfig
from stripe_sandbox.engine import discounts
from stripe_sandbox.engine.invoice_lines import (
    Line,
    create_invoice_item,
    pending_lines,
    proration_line,
    render_line,
    usage_line,
)
from stripe_sandbox.engine.payments import attempt_payment, emit, reload, subscription_of
from stripe_sandbox.engine.periods import BILLED_STATUSES, Obj, is_metered, item_period, items_of
from stripe_sandbox.errors import StripeError, card_declined
from stripe_sandbox.store import Transaction, new_id


def customer_address(customer: Obj) -> Obj | None:
    address = customer.get("address")
    return dict(address) if isinstance(address, dict) else None


def apply_balance(invoice: Obj, balance: int) -> int:
    """Apply the customer's balance (negative = credit) to the invoice; returns the balance left."""
    due = int(invoice["total"]) + balance
    invoice["starting_balance"] = balance
    invoice["amount_due"] = max(due, 0)
    invoice["amount_remaining"] = max(invoice["amount_due"] - invoice["amount_paid"], 0)
    return min(due, 0)


def build_invoice(
    *,
    customer: Obj,
    subscription: Obj | None,
    lines: list[Line],
    billing_reason: str,
    period: tuple[int, int],
    now: int,
    preview: bool = False,
) -> Obj:
    """A draft invoice (not stored) with its lines and amounts."""
    invoice_id = new_id("upcoming_in" if preview else "in")
    total = sum(line.amount for line in lines)
    currency = lines[0].currency if lines else str((subscription or {}).get("currency") or "usd")
    tax_enabled = bool(((subscription or {}).get("automatic_tax") or {}).get("enabled"))
    invoice: Obj = {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "Stripe sandbox",
        "account_tax_ids": None,
        "amount_due": total,
        "amount_overpaid": 0,
        "amount_paid": 0,
        "amount_remaining": total,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": not preview,
        "automatic_tax": {
            "enabled": tax_enabled,
            "disabled_reason": None,
            "liability": {"type": "self"} if tax_enabled else None,
            "provider": "stripe" if tax_enabled else None,
            "status": "complete" if tax_enabled else None,
        },
        "automatically_finalizes_at": None,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "confirmation_secret": None,
        "created": now,
        "currency": currency,
        "custom_fields": None,
        "customer": customer["id"],
        "customer_account": None,
        "customer_address": customer_address(customer),
        "customer_email": customer.get("email"),
        "customer_name": customer.get("name"),
        "customer_phone": customer.get("phone"),
        "customer_shipping": customer.get("shipping"),
        "customer_tax_exempt": customer.get("tax_exempt", "none"),
        "customer_tax_ids": [],
        "default_payment_method": (subscription or {}).get("default_payment_method"),
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "due_date": None,
        "effective_at": None,
        "ending_balance": None,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": {
            "object": "list",
            "data": [render_line(line, invoice_id, preview=preview) for line in lines],
            "has_more": False,
            "total_count": len(lines),
            "url": f"/v1/invoices/{invoice_id}/lines",
        },
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None,
        "number": None,
        "on_behalf_of": None,
        "parent": None
        if subscription is None
        else {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {
                "metadata": dict(subscription.get("metadata") or {}),
                "subscription": subscription["id"],
            },
        },
        "payment_settings": {
            "default_mandate": None,
            "payment_method_options": None,
            "payment_method_types": None,
        },
        "period_end": period[1],
        "period_start": period[0],
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": "draft",
        "status_transitions": {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        # Since 2025-03-31.basil the subscription lives under parent.subscription_details.
        "subscription": None,
        "subtotal": total,
        "subtotal_excluding_tax": total,
        "test_clock": None,
        "total": total,
        "total_discount_amounts": [],
        "total_excluding_tax": total,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": None,
    }
    apply_balance(invoice, int(customer.get("balance") or 0))
    return invoice


async def create_invoice(
    tx: Transaction,
    *,
    customer_id: str,
    subscription: Obj | None,
    lines: list[Line],
    billing_reason: str,
    period: tuple[int, int],
    now: int,
    finalize_at: int | None = None,
) -> Obj:
    """Store a draft invoice (emitting `invoice.created`), claiming its pending invoice items."""
    customer = await tx.get("customer", customer_id)
    invoice = build_invoice(
        customer=customer,
        subscription=subscription,
        lines=lines,
        billing_reason=billing_reason,
        period=period,
        now=now,
    )
    invoice["automatically_finalizes_at"] = finalize_at
    await discounts.apply_to_invoice(tx, invoice, lines, subscription)
    return await store_invoice(tx, invoice, lines)


async def store_invoice(tx: Transaction, invoice: Obj, lines: list[Line]) -> Obj:
    """Insert a built invoice, mark its invoice items as invoiced, emit `invoice.created`."""
    await tx.insert(invoice)
    for line in lines:
        if line.invoice_item is not None:
            item = await tx.find(line.invoice_item)
            if item is not None:
                item["invoice"] = invoice["id"]
                await tx.save(item)
    await emit(tx, "invoice.created", invoice)
    return invoice


async def finalize_invoice(tx: Transaction, config: SandboxConfig, invoice: Obj, now: int) -> Obj:
    """Draft -> open: number, hosted URLs, the customer's balance applied; `invoice.finalized`."""
    customer = await tx.get("customer", str(invoice["customer"]))
    sequence = int(customer.get("next_invoice_sequence") or 1)
    invoice["number"] = f"{customer.get('invoice_prefix') or 'SANDBOX'}-{sequence:04d}"
    customer["next_invoice_sequence"] = sequence + 1
    balance = int(customer.get("balance") or 0)
    ending = apply_balance(invoice, balance)
    invoice["ending_balance"] = ending
    customer["balance"] = ending
    await tx.save(customer)
    if ending != balance:
        await emit(tx, "customer.updated", customer, {"balance": balance})
    invoice["status"] = "open"
    invoice["automatically_finalizes_at"] = None
    invoice["effective_at"] = now
    invoice["status_transitions"]["finalized_at"] = now
    invoice["hosted_invoice_url"] = f"{config.base_url}/invoices/{invoice['id']}"
    invoice["invoice_pdf"] = f"{config.base_url}/invoices/{invoice['id']}/pdf"
    await tx.save(invoice)
    await emit(tx, "invoice.finalized", invoice)
    return invoice


async def settle_subscription(
    tx: Transaction, config: SandboxConfig, invoice: Obj, paid: bool, now: int
) -> None:
    """What a payment outcome means for the invoice's subscription (past_due, active, dunning end)."""
    subscription_id = subscription_of(invoice)
    subscription = None if subscription_id is None else await tx.find(subscription_id)
    if subscription is None or subscription.get("object") != "subscription":
        return
    status = subscription["status"]
    if paid:
        if status in ("past_due", "unpaid") and not await _unpaid_invoices(tx, subscription["id"]):
            subscription["status"] = "active"
            await tx.save(subscription)
            await emit(tx, "customer.subscription.updated", subscription, {"status": status})
        return
    if status == "active":
        subscription["status"] = status = "past_due"
        await tx.save(subscription)
        await emit(tx, "customer.subscription.updated", subscription, {"status": "active"})
    if invoice.get("next_payment_attempt") is None and status == "past_due":
        if config.dunning_final_action == "unpaid":
            subscription["status"] = "unpaid"
            await tx.save(subscription)
            await emit(tx, "customer.subscription.updated", subscription, {"status": "past_due"})
        else:
            await cancel_subscription(tx, config, subscription, now, reason="payment_failed")


async def _unpaid_invoices(tx: Transaction, subscription_id: str) -> list[Obj]:
    return await tx.all(
        "invoice",
        lambda inv: (
            inv.get("status") == "open"
            and subscription_of(inv) == subscription_id
            and int(inv.get("amount_remaining") or 0) > 0
        ),
    )


async def finalize_and_charge(
    tx: Transaction, config: SandboxConfig, invoice: Obj, now: int, *, succeed: bool | None = None
) -> bool:
    """Finalize a draft and, unless its subscription is `unpaid`, attempt payment."""
    await finalize_invoice(tx, config, invoice, now)
    subscription_id = subscription_of(invoice)
    subscription = None if subscription_id is None else await tx.find(subscription_id)
    if (
        subscription is not None
        and subscription.get("status") == "unpaid"
        and invoice["amount_remaining"] > 0
    ):
        return False  # Stripe stops attempting payment on an unpaid subscription's invoices
    paid = await attempt_payment(tx, invoice, now, succeed=succeed)
    await settle_subscription(tx, config, invoice, paid, now)
    return paid


async def pay_invoice(tx: Transaction, config: SandboxConfig, invoice: Obj, now: int) -> Obj:
    """`POST /v1/invoices/{id}/pay`: finalize a draft if needed and charge it now."""
    if invoice["status"] == "paid":
        raise StripeError(400, "Invoice is already paid", code="invoice_already_paid")
    if invoice["status"] not in ("draft", "open"):
        raise StripeError(
            400,
            f"You can only pay an invoice that is open, not {invoice['status']}.",
            code="invoice_not_editable",
        )
    if invoice["status"] == "draft":
        await finalize_invoice(tx, config, invoice, now)
    paid = await attempt_payment(tx, invoice, now)
    await settle_subscription(tx, config, invoice, paid, now)
    if not paid:
        raise card_declined()
    return await reload(tx, invoice)


async def final_invoice(
    tx: Transaction, subscription: Obj, at: int, *, finalize_at: int | None
) -> Obj | None:
    """The draft invoice of a subscription ending at `at`: its pending invoice items and the
    metered usage of the unfinished period (None when there is nothing to bill)."""
    customer_id = str(subscription["customer"])
    lines = await pending_lines(tx, subscription["id"])
    lines += [
        await usage_line(tx, item, customer_id, (item_period(item)[0], at))
        for item in items_of(subscription)
        if is_metered(item["price"])
    ]
    if not lines:
        return None
    invoice = await create_invoice(
        tx,
        customer_id=customer_id,
        subscription=subscription,
        lines=lines,
        billing_reason="subscription_cycle",
        period=(min(item_period(item)[0] for item in items_of(subscription)), at),
        now=at,
        finalize_at=finalize_at,
    )
    subscription["latest_invoice"] = invoice["id"]
    await tx.save(subscription)
    return invoice


async def cancel_subscription(
    tx: Transaction,
    config: SandboxConfig,
    subscription: Obj,
    now: int,
    *,
    reason: str = "cancellation_requested",
    invoice_now: bool = False,
    prorate: bool = False,
    details: Obj | None = None,
) -> Obj:
    """End a subscription now: `customer.subscription.deleted` (and its schedule canceled)."""
    subscription = await reload(tx, subscription)
    if subscription["status"] == "canceled":
        return subscription
    customer_id = str(subscription["customer"])
    billed = subscription["status"] in BILLED_STATUSES
    if prorate and billed:
        for item in items_of(subscription):
            if not is_metered(item["price"]):
                line = await proration_line(tx, item, item_period(item), now, credit=True)
                if line.amount:
                    await create_invoice_item(tx, customer_id, line, now)
    if invoice_now and billed:
        invoice = await final_invoice(tx, subscription, now, finalize_at=None)
        if invoice is not None:
            await finalize_invoice(tx, config, invoice, now)
            await attempt_payment(tx, invoice, now)
            subscription = await reload(tx, subscription)
    subscription["status"] = "canceled"
    subscription["canceled_at"] = subscription.get("canceled_at") or now
    subscription["ended_at"] = now
    subscription["cancel_at"] = (
        subscription.get("cancel_at") if subscription.get("cancel_at") == now else None
    )
    subscription["cancellation_details"] = {
        "comment": (details or {}).get("comment")
        or (subscription.get("cancellation_details") or {}).get("comment"),
        "feedback": (details or {}).get("feedback")
        or (subscription.get("cancellation_details") or {}).get("feedback"),
        "reason": reason,
    }
    await tx.save(subscription)
    schedule_id = subscription.get("schedule")
    if schedule_id:
        schedule = await tx.find(str(schedule_id))
        if schedule is not None and schedule["status"] in ("active", "not_started"):
            schedule["status"] = "canceled"
            schedule["canceled_at"] = now
            schedule["current_phase"] = None
            await tx.save(schedule)
            await emit(tx, "subscription_schedule.canceled", schedule)
    await emit(tx, "customer.subscription.deleted", subscription)
    return subscription
