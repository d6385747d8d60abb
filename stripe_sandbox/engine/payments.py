"""Events, payment methods, and charging an invoice: one attempt, and when dunning retries it."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

from stripe_sandbox.engine.periods import DAY, Obj
from stripe_sandbox.store import Transaction, new_id

RETRY_AFTER_DAYS = (3, 5, 7)  # after the first failed attempt


async def emit(tx: Transaction, event_type: str, obj: Obj, previous: Obj | None = None) -> None:
    """Emit a snapshot: later changes to `obj` in this transaction must not leak into the event."""
    await tx.emit(
        event_type,
        copy.deepcopy(obj),
        previous_attributes=None if previous is None else copy.deepcopy(previous),
    )


async def reload(tx: Transaction, obj: Obj) -> Obj:
    return await tx.get(str(obj["object"]), str(obj["id"]))


def _fails_key(customer_id: str) -> str:
    return f"pm_fails:{customer_id}"


async def set_payment_method_fails(tx: Transaction, customer_id: str, fails: bool) -> None:
    """Whether charges to this customer fail from now on."""
    await tx.get("customer", customer_id)
    await tx.set_state(_fails_key(customer_id), "1" if fails else "0")


async def payment_method_fails(tx: Transaction, customer_id: str) -> bool:
    return await tx.get_state(_fails_key(customer_id), "0") == "1"


async def _charge_fails(tx: Transaction, invoice: Obj) -> bool:
    customer_id = str(invoice["customer"])
    if await payment_method_fails(tx, customer_id):
        return True
    if invoice.get("default_payment_method"):
        return False
    customer = await tx.find(customer_id)
    default = ((customer or {}).get("invoice_settings") or {}).get("default_payment_method")
    return not default


async def create_payment_method(tx: Transaction, customer_id: str, now: int, email: str | None) -> Obj:
    """The card a customer entered in Checkout, attached to them."""
    method = {
        "id": new_id("pm"),
        "object": "payment_method",
        "allow_redisplay": "always",
        "billing_details": {
            "address": None,
            "email": email,
            "name": None,
            "phone": None,
            "tax_id": None,
        },
        "card": {
            "brand": "visa",
            "checks": {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": "pass"},
            "country": "US",
            "display_brand": "visa",
            "exp_month": 12,
            "exp_year": datetime.fromtimestamp(now, UTC).year + 4,
            "fingerprint": new_id("fp")[3:19],
            "funding": "credit",
            "generated_from": None,
            "last4": "4242",
            "networks": {"available": ["visa"], "preferred": None},
            "regulated_status": "unregulated",
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        },
        "created": now,
        "customer": customer_id,
        "customer_account": None,
        "livemode": False,
        "metadata": {},
        "type": "card",
    }
    await tx.insert(method)
    await emit(tx, "payment_method.attached", method)
    return method


def subscription_of(invoice: Obj) -> str | None:
    details = (invoice.get("parent") or {}).get("subscription_details") or {}
    value = details.get("subscription")
    if isinstance(value, dict):
        return str(value["id"])
    return value if isinstance(value, str) else None


def next_retry(invoice: Obj, now: int) -> int | None:
    """When the dunning schedule tries again after a failed attempt (None: retries exhausted)."""
    if subscription_of(invoice) is None:
        return None
    first = int(invoice["status_transitions"].get("finalized_at") or now)
    retries_done = int(invoice["attempt_count"]) - 1
    if retries_done >= len(RETRY_AFTER_DAYS):
        return None
    return max(first + RETRY_AFTER_DAYS[retries_done] * DAY, now + 1)


async def attempt_payment(tx: Transaction, invoice: Obj, now: int, *, succeed: bool | None = None) -> bool:
    """Charge an open invoice; True when it is paid. `succeed` overrides the payment method."""
    if invoice["amount_remaining"] > 0:
        ok = (not await _charge_fails(tx, invoice)) if succeed is None else succeed
        invoice["attempt_count"] = int(invoice["attempt_count"]) + 1
        invoice["attempted"] = True
        if not ok:
            invoice["next_payment_attempt"] = next_retry(invoice, now)
            await tx.save(invoice)
            await emit(tx, "invoice.payment_failed", invoice)
            return False
        invoice["amount_paid"] = int(invoice["amount_paid"]) + int(invoice["amount_remaining"])
        invoice["amount_remaining"] = 0
    invoice["attempted"] = True
    invoice["status"] = "paid"
    invoice["next_payment_attempt"] = None
    invoice["status_transitions"]["paid_at"] = now
    await tx.save(invoice)
    await emit(tx, "invoice.paid", invoice)
    await emit(tx, "invoice.payment_succeeded", invoice)
    return True
