"""The sandbox dashboard at the sandbox's root (`/sandbox/` in the service): see and drive it.

Server-rendered like the hosted pages (no JavaScript, no inline style, the pages' stylesheet):

- the clock, with "advance 1 day / 1 week / 1 month" and, per subscription, "to trial end" and
  "to period end": `POST /dashboard/clock` (`advance=day|week|month|trial_end|period_end`,
  `subscription`), which runs `clock.advance_clock` as `POST /_control/clock/advance` does;
- customers with their subscriptions, invoices and payment method, and "card works / card
  fails": `POST /dashboard/customers/{id}/card` (`fails=true|false`), as
  `POST /_control/customers/{id}/payment_method`;
- the event log (newest first) with delivery status, attempts, the last answer's status code and
  start, and "resend": `POST /dashboard/events/{id}/resend`, as `POST /_control/events/{id}/resend`.

Every form carries the CSRF token of `control.csrf`; every POST redirects (303) back here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from stripe_sandbox.api import SandboxHost, control
from stripe_sandbox.control import csrf
from stripe_sandbox.control.delivery import resend
from stripe_sandbox.control.pages import (
    ENDED_STATUSES,
    banner,
    day,
    esc,
    form,
    href,
    interval_label,
    lines_of,
    moment,
    money,
    page,
    root,
    see_other,
    unit_price,
)
from stripe_sandbox.engine import clock, payments, periods
from stripe_sandbox.errors import StripeError
from stripe_sandbox.store import Transaction, delivery_attempts, events

Obj = dict[str, Any]

EVENTS_SHOWN = 50
CUSTOMERS_SHOWN = 50
# The hosted pages' policy, with forms allowed to post to this origin only.
POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
    "object-src 'none'; frame-ancestors 'none'"
)
STEPS = {"day": ("1 day", periods.DAY), "week": ("1 week", 7 * periods.DAY)}


@dataclass
class EventRow:
    id: str
    type: str
    created: int
    object_id: str
    delivered: bool
    attempts: int
    status: int | None
    response: str
    error: str | None


async def _events(tx: Transaction, max_attempts: int) -> list[EventRow]:
    rows = (
        await tx.conn.execute(
            select(events.c.id, events.c.type, events.c.data, events.c.delivered, events.c.attempts)
            .order_by(events.c.seq.desc())
            .limit(EVENTS_SHOWN)
        )
    ).all()
    last: dict[str, Any] = {}
    if rows:
        found = await tx.conn.execute(
            select(delivery_attempts)
            .where(delivery_attempts.c.event_id.in_([row.id for row in rows]))
            .order_by(delivery_attempts.c.seq)
        )
        last = {attempt.event_id: attempt for attempt in found}
    shown = []
    for row in rows:
        data = json.loads(row.data)
        attempt = last.get(row.id)
        shown.append(
            EventRow(
                id=row.id,
                type=row.type,
                created=int(data.get("created") or 0),
                object_id=str(((data.get("data") or {}).get("object") or {}).get("id") or ""),
                delivered=bool(row.delivered),
                attempts=int(row.attempts),
                status=None if attempt is None else attempt.status,
                response="" if attempt is None else str(attempt.response),
                error=None if row.delivered or row.attempts < max_attempts else "gave up",
            )
        )
    return shown


def _delivery_status(row: EventRow) -> tuple[str, str]:
    """(label, css class) of an event's delivery."""
    if row.delivered:
        return "delivered", "paid"
    if row.error:
        return "failed", "past_due"
    return ("retrying" if row.attempts else "pending"), "open"


def _form(
    request: Request, token: str, action: str, label: str, fields: dict[str, str], kind: str = ""
) -> str:
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in fields.items())
    css = f' class="{kind}"' if kind else ""
    return (
        f'<form class="inline" method="post" action="{esc(root(request))}/dashboard/{esc(action)}">'
        f'{csrf.hidden_field(token)}{hidden}<button type="submit"{css}>{esc(label)}</button></form>'
    )


async def _customer_card(tx: Transaction, request: Request, token: str, customer: Obj, now: int) -> str:
    customer_id = str(customer["id"])
    subscriptions = await tx.all("subscription", lambda s: s.get("customer") == customer_id)
    invoices = await tx.all(
        "invoice", lambda i: i.get("customer") == customer_id and i.get("status") != "draft"
    )
    fails = await payments.payment_method_fails(tx, customer_id)
    method_id = (customer.get("invoice_settings") or {}).get("default_payment_method") or next(
        (s.get("default_payment_method") for s in subscriptions if s.get("default_payment_method")), None
    )
    method = None if not method_id else await tx.find(str(method_id))
    card = (method or {}).get("card") or {}
    described = (
        f"{str(card.get('brand') or 'card').title()} ending in {card.get('last4')}"
        if card
        else "No card on file"
    )
    warning = ' <span class="status past_due">charges fail</span>' if fails else ""
    details = (customer.get("email"), customer_id, _metadata(customer))
    heading = str(customer.get("name") or customer.get("email") or customer_id)
    parts = [
        f'<div class="card customer" id="{esc(customer_id)}">',
        f"<h2>{esc(heading)}</h2>",
        f"<p>{lines_of(*(v for v in details if v != heading))}</p>",
        f"<p>Payment method: {esc(described)}{warning}</p><p>",
        _form(request, token, f"customers/{customer_id}/card", "Card works", {"fails": "false"}, "secondary"),
        _form(request, token, f"customers/{customer_id}/card", "Card fails", {"fails": "true"}, "secondary"),
        "</p>",
    ]
    if subscriptions:
        rows = []
        for subscription in subscriptions:
            rows.append(await _subscription_row(tx, request, token, subscription, now))
        parts.append(
            "<h3>Subscriptions</h3><table><tr><th>Plan</th><th>Status</th><th>Period ends</th>"
            f"<th>Advance the clock</th></tr>{''.join(rows)}</table>"
        )
    if invoices:
        rows = [
            f"<tr><td>{esc(invoice.get('number') or invoice['id'])}</td>"
            f'<td><span class="status {esc(invoice["status"])}">{esc(invoice["status"])}</span></td>'
            f'<td class="num">{esc(money(invoice.get("total"), invoice.get("currency")))}</td>'
            f"<td>{esc(day(invoice.get('created')))}</td>"
            + (
                f'<td><a href="{href(invoice["hosted_invoice_url"])}">View</a></td>'
                if invoice.get("hosted_invoice_url")
                else "<td></td>"
            )
            + "</tr>"
            for invoice in invoices
        ]
        parts.append(
            '<h3>Invoices</h3><table><tr><th>Number</th><th>Status</th><th class="num">Total</th>'
            f"<th>Date</th><th></th></tr>{''.join(rows)}</table>"
        )
    parts.append("</div>")
    return "".join(parts)


def _metadata(obj: Obj) -> str:
    return ", ".join(f"{key}: {value}" for key, value in sorted((obj.get("metadata") or {}).items()))


async def _subscription_row(
    tx: Transaction, request: Request, token: str, subscription: Obj, now: int
) -> str:
    names, prices = [], []
    for item in periods.items_of(subscription):
        price = item["price"]
        name = await periods.product_name(tx, price)
        if periods.is_metered(price):
            prices.append(f"{name} at {unit_price(price)}")
        else:
            names.append(name)
            amount = periods.price_amount(price, int(item.get("quantity") or 1))
            prices.append(f"{money(amount, price.get('currency'))} {interval_label(price)}")
    status = str(subscription["status"])
    period_end = periods.period_of(subscription)[1]
    buttons = []
    if status not in ENDED_STATUSES:
        trial_end = subscription.get("trial_end")
        if status == "trialing" and trial_end and int(trial_end) > now:
            buttons.append(
                _form(
                    request,
                    token,
                    "clock",
                    "To trial end",
                    {"advance": "trial_end", "subscription": subscription["id"]},
                )
            )
        if period_end > now:
            buttons.append(
                _form(
                    request,
                    token,
                    "clock",
                    "To period end",
                    {"advance": "period_end", "subscription": subscription["id"]},
                )
            )
    cancels = " (cancels then)" if subscription.get("cancel_at_period_end") else ""
    return (
        f"<tr><td><strong>{esc(', '.join(dict.fromkeys(names)) or subscription['id'])}</strong><br>"
        f'<span class="muted">{esc(" + ".join(prices))}</span></td>'
        f'<td><span class="status {esc(status)}">{esc(status.replace("_", " "))}</span></td>'
        f"<td>{esc(day(period_end))}{esc(cancels)}</td><td>{''.join(buttons)}</td></tr>"
    )


def _event_rows(request: Request, token: str, rows: list[EventRow]) -> str:
    if not rows:
        return "<p>No events yet.</p>"
    body = []
    for row in rows:
        label, css = _delivery_status(row)
        code = "" if row.status is None else str(row.status)
        body.append(
            f'<tr id="{esc(row.id)}"><td>{esc(moment(row.created))}</td>'
            f"<td><strong>{esc(row.type)}</strong><br>"
            f'<span class="muted">{esc(row.id)} &middot; {esc(row.object_id)}</span></td>'
            f'<td><span class="status {css}">{esc(label)}</span></td><td class="num">{esc(row.attempts)}</td>'
            f'<td class="num">{esc(code)}</td><td><code>{esc(row.response[:120])}</code></td>'
            f"<td>{_form(request, token, f'events/{row.id}/resend', 'Resend', {}, 'secondary')}</td></tr>"
        )
    return (
        '<table class="events"><tr><th>Created</th><th>Event</th><th>Delivery</th>'
        '<th class="num">Attempts</th>'
        f'<th class="num">Last code</th><th>Last response</th><th></th></tr>{"".join(body)}</table>'
    )


NOTICES = {
    "clock": "The clock moved forward.",
    "card_works": "Charges to this customer's card succeed from now on.",
    "card_fails": "Charges to this customer's card fail from now on.",
    "resent": "The event was sent again; its answer is in the event log.",
}


async def render(
    sandbox: SandboxHost, request: Request, token: str, *, error: str | None = None
) -> HTMLResponse:
    max_attempts = int(getattr(getattr(sandbox, "delivery", None), "max_attempts", 10))
    async with sandbox.transaction() as tx:
        now = tx.now()
        customers = (await tx.all("customer"))[:CUSTOMERS_SHOWN]
        cards = [await _customer_card(tx, request, token, customer, now) for customer in customers]
        rows = await _events(tx, max_attempts)
    steps = [
        _form(request, token, "clock", f"Advance {label}", {"advance": key})
        for key, (label, _s) in STEPS.items()
    ]
    steps.append(_form(request, token, "clock", "Advance 1 month", {"advance": "month"}))
    body = (
        '<div class="dashboard"><h1>Sandbox dashboard</h1>'
        f"{banner(NOTICES.get(request.query_params.get('notice', '')), error)}"
        '<div class="card"><h2>Clock</h2>'
        f'<p>Sandbox time: <strong id="sandbox-now">{esc(moment(now))}</strong></p>'
        f"<p>{''.join(steps)}</p>"
        '<p class="muted">Moving the clock does what Stripe would meanwhile: trials end, periods renew, '
        "payments are retried, cancellations take effect, each with its events.</p></div>"
        f"<h2>Customers</h2>{''.join(cards) or '<div class=card><p>No customers yet.</p></div>'}"
        f'<div class="card"><h2>Events</h2>{_event_rows(request, token, rows)}</div></div>'
    )
    response = page(request, "Sandbox dashboard", body, status=400 if error else 200, now=now)
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


@control("GET", "/")
async def dashboard(sandbox: SandboxHost, request: Request) -> Response:
    """The sandbox dashboard: customers, events and their deliveries, the clock."""
    token = csrf.token_of(request) or csrf.new_token()
    response = await render(sandbox, request, token)
    csrf.set_cookie(response, request, token)
    return response


async def _checked(request: Request) -> tuple[dict[str, str], Response | None]:
    fields = await form(request)
    why = csrf.refusal(request, fields)
    if why is None:
        return fields, None
    refused = page(
        request,
        "Refused",
        f'<div class="card"><h1>Refused</h1><p>{esc(why)}.</p>'
        f'<p><a href="{esc(root(request))}/">Back to the dashboard</a></p></div>',
        status=403,
    )
    refused.headers["Content-Security-Policy"] = POLICY
    return fields, refused


def _back(request: Request, notice: str, anchor: str = "") -> Response:
    return see_other(f"{root(request)}/?notice={notice}" + (f"#{anchor}" if anchor else ""))


async def _refuse(sandbox: SandboxHost, request: Request, message: str) -> Response:
    token = csrf.token_of(request) or csrf.new_token()
    return await render(sandbox, request, token, error=message)


@control("POST", "/dashboard/clock")
async def dashboard_clock(sandbox: SandboxHost, request: Request) -> Response:
    """Advance the sandbox clock by a step, or to a subscription's trial or period end."""
    fields, refused = await _checked(request)
    if refused is not None:
        return refused
    advance = fields.get("advance", "")
    try:
        async with sandbox.transaction() as tx:
            now = tx.now()
            if advance in STEPS:
                seconds = STEPS[advance][1]
            elif advance == "month":
                seconds = periods.add_intervals(now, "month", 1, 1) - now
            elif advance in ("trial_end", "period_end"):
                subscription = await tx.get(
                    "subscription", fields.get("subscription", ""), param="subscription"
                )
                target = (
                    int(subscription.get("trial_end") or 0)
                    if advance == "trial_end"
                    else periods.period_of(subscription)[1]
                )
                if target <= now:
                    return await _refuse(
                        sandbox, request, f"That {advance.replace('_', ' ')} has passed already."
                    )
                seconds = target - now
            else:
                return await _refuse(sandbox, request, "Choose how far to advance the clock.")
            await clock.advance_clock(tx, sandbox.config, seconds)
    except StripeError as exc:
        return await _refuse(sandbox, request, exc.message)
    return _back(request, "clock")


@control("POST", "/dashboard/customers/{customer_id}/card")
async def dashboard_card(sandbox: SandboxHost, request: Request) -> Response:
    """Make charges to a customer's card succeed or fail from now on."""
    fields, refused = await _checked(request)
    if refused is not None:
        return refused
    choice = fields.get("fails", "")
    if choice not in ("true", "false"):
        return await _refuse(sandbox, request, "Choose a card that works or one that fails.")
    customer_id = request.path_params["customer_id"]
    try:
        async with sandbox.transaction() as tx:
            await tx.get("customer", customer_id)
            await payments.set_payment_method_fails(tx, customer_id, choice == "true")
    except StripeError as exc:
        return await _refuse(sandbox, request, exc.message)
    return _back(request, "card_fails" if choice == "true" else "card_works", customer_id)


@control("POST", "/dashboard/events/{event_id}/resend")
async def dashboard_resend(sandbox: SandboxHost, request: Request) -> Response:
    """Send one event again now (the answer goes to the event log)."""
    _fields, refused = await _checked(request)
    if refused is not None:
        return refused
    event_id = request.path_params["event_id"]
    try:
        await resend(sandbox, event_id)
    except StripeError as exc:
        return await _refuse(sandbox, request, exc.message)
    except LookupError as exc:
        return await _refuse(sandbox, request, str(exc))
    return _back(request, "resent", event_id)
