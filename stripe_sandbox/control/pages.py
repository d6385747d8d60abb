"""Hosted pages a person uses in a browser: Checkout, invoices (the portal: portal_pages.py),
and what every sandbox page shares (layout, escaping, the stylesheet and the favicon).

Plain server-rendered HTML (no JavaScript), every printed value HTML-escaped. Each action is a
form POST that runs the same engine functions as the API and the control routes, in one sandbox
transaction, so it emits the same events; then it redirects (303) as Stripe's pages do.

- `GET /checkout/{id}` (a session's `url`): plan, price and interval, trial, email, then
  `POST /checkout/{id}/pay` (as `POST /_control/checkout/{id}/complete {"outcome": "paid"}`,
  then 303 to the success URL, its `{CHECKOUT_SESSION_ID}` filled in: the session keeps the
  template, as on Stripe) or `POST /checkout/{id}/decline` (the card is refused: the page
  shows the decline and the session stays open, as on Stripe; "Cancel" links to cancel_url).
- The customer portal: `stripe_sandbox/control/portal_pages.py`.
- `GET /invoices/{id}` (an invoice's `hosted_invoice_url`): lines and amounts; an open invoice
  can be paid (`POST /invoices/{id}/pay`) or the card declined (`.../decline`, nothing changes).
  `GET /invoices/{id}/pdf` (`invoice_pdf`): the same as a one-page PDF.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from stripe_sandbox.api import SandboxHost, control
from stripe_sandbox.engine import creation, invoicing, payments, periods
from stripe_sandbox.errors import StripeError
from stripe_sandbox.store import Transaction

Obj = dict[str, Any]

ENDED_STATUSES = ("canceled", "incomplete_expired")
DECLINED = "Your card was declined. Try again, or use another card."
NOTICES = {
    "canceled": "Your subscription will be canceled at the end of the billing period.",
    "canceled_now": "Your subscription has been canceled.",
    "resumed": "Your subscription will renew: the pending cancellation is undone.",
    "card_works": "Your payment method has been updated.",
    "card_fails": "Your payment method has been updated (sandbox: charges to it will fail).",
    "paid": "Thank you: the invoice is paid.",
}


# HTML helpers ---------------------------------------------------------------------------------


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def lines_of(*values: object) -> str:
    """The given values, escaped, one per line; empty ones left out (no blank lines)."""
    return "<br>".join(esc(v) for v in values if v not in (None, ""))


def href(url: object) -> str:
    """An escaped link target; anything but http(s) or a path becomes inert."""
    text = "" if url is None else str(url)
    scheme = urlsplit(text).scheme.lower()
    if scheme in ("http", "https") or (text.startswith("/") and not text.startswith("//")):
        return esc(text)
    return "#"


def day(ts: object) -> str:
    if ts in (None, ""):
        return ""
    return datetime.fromtimestamp(int(str(ts)), UTC).strftime("%d %b %Y")


def moment(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%d %b %Y %H:%M UTC")


def money(amount: object, currency: object) -> str:
    return periods.format_amount(int(str(amount or 0)), str(currency or "usd"))


def unit_price(price: Obj) -> str:
    """A metered price as Stripe shows it: its amount per unit (sub-cent amounts kept)."""
    decimal = price.get("unit_amount_decimal")
    amount = (
        Decimal(str(decimal)) if decimal not in (None, "") else Decimal(int(price.get("unit_amount") or 0))
    )
    return f"{periods.format_amount(amount, str(price.get('currency') or 'usd'))} per unit"


def interval_label(price: Obj) -> str:
    recurring = price.get("recurring")
    if not recurring:
        return "one time"
    interval, count = periods.interval_of(price)
    return f"per {interval}" if count == 1 else f"every {count} {interval}s"


STYLESHEET = Path(__file__).with_name("pages.css")
# No inline script or style, nothing from another origin. No form-action: a form's 303 goes on to
# the app's success or return URL, another origin, as on Stripe.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "object-src 'none'; frame-ancestors 'none'"
)


def page(
    request: Request, title: str, body: str, *, status: int = 200, now: int | None = None
) -> HTMLResponse:
    clock = f" · sandbox clock {esc(moment(now))}" if now is not None else ""
    document = (
        "<!doctype html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<link rel="icon" href="{esc(root(request))}/favicon.svg" type="image/svg+xml">'
        f'<link rel="stylesheet" href="{esc(root(request))}/pages.css"></head><body><main>'
        f'<p><span class="badge">TEST MODE</span> <span class="muted">Stripe sandbox{clock}</span></p>'
        f"{body}</main></body></html>"
    )
    return HTMLResponse(
        document, status_code=status, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY}
    )


@control("GET", "/pages.css")
async def stylesheet(sandbox: SandboxHost, request: Request) -> Response:
    return Response(
        STYLESHEET.read_bytes(),
        media_type="text/css",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
    'fill="#635bff"/><path d="M20.5 11.6c-1.3-.7-2.8-1.1-4.2-1.1-1.5 0-2.4.5-2.4 1.4 0 2.6 7.8 1.4 '
    "7.8 6.9 0 2.9-2.4 4.7-5.9 4.7-1.8 0-3.8-.5-5.3-1.3v-3.3c1.5.9 3.5 1.5 5.3 1.5 1.5 0 2.4-.4 "
    '2.4-1.4 0-2.7-7.8-1.5-7.8-6.8 0-2.8 2.3-4.7 5.8-4.7 1.5 0 3 .3 4.3.8z" fill="#fff"/></svg>'
)


@control("GET", "/favicon.svg")
async def favicon(sandbox: SandboxHost, request: Request) -> Response:
    """The hosted pages' icon."""
    return Response(
        FAVICON,
        media_type="image/svg+xml",
        headers={"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


def banner(notice: str | None = None, error: str | None = None) -> str:
    parts = []
    if notice:
        parts.append(f'<div class="notice" role="status">{esc(notice)}</div>')
    if error:
        parts.append(f'<div class="error" role="alert">{esc(error)}</div>')
    return "".join(parts)


def missing(request: Request, what: str, object_id: str) -> HTMLResponse:
    return page(
        request,
        f"No such {what}",
        f'<div class="card"><h1>No such {esc(what)}</h1><p>{esc(object_id)} does not exist in this '
        "sandbox.</p></div>",
        status=404,
    )


def root(request: Request) -> str:
    """The sandbox's mount path as this request reached it (links stay on the same host)."""
    return str(request.scope.get("root_path", ""))


def success_redirect(session: Obj) -> str:
    """Where Checkout sends the customer: `success_url` with `{CHECKOUT_SESSION_ID}` filled in
    (the session keeps the template, as on Stripe)."""
    return str(session.get("success_url") or "").replace("{CHECKOUT_SESSION_ID}", str(session["id"]))


def see_other(url: str) -> Response:
    return RedirectResponse(url, status_code=303)


async def form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return dict(parse_qsl(body, keep_blank_values=True))


async def find(tx: Transaction, object_type: str, object_id: str) -> Obj | None:
    found = await tx.find(object_id)
    return found if found is not None and found.get("object") == object_type else None


# Checkout -------------------------------------------------------------------------------------


@dataclass
class CheckoutLine:
    name: str
    quantity: int | None
    amount: str
    interval: str
    metered: bool = False


def plan_title(names: list[str]) -> str:
    """Each product named once, in order (a plan's licensed and metered lines share no name)."""
    return ", ".join(dict.fromkeys(names))


@dataclass
class CheckoutView:
    session: Obj
    customer: Obj | None
    lines: list[CheckoutLine]
    trial_days: int | None
    trial_end: int | None
    now: int

    @property
    def expired(self) -> bool:
        return self.session["status"] == "expired" or (
            self.session["status"] == "open" and self.now >= int(self.session["expires_at"])
        )

    @property
    def email(self) -> str | None:
        found = (self.customer or {}).get("email") or self.session.get("customer_email")
        return None if found is None else str(found)


async def checkout_view(tx: Transaction, session_id: str) -> CheckoutView | None:
    session = await find(tx, "checkout.session", session_id)
    if session is None:
        return None
    now = tx.now()
    request: Obj = json.loads(await tx.get_state(creation.checkout_request_key(session_id), "{}"))
    lines = []
    for spec in request.get("line_items", []):
        price = await tx.get("price", spec["price"])
        quantity = spec.get("quantity")
        name = await periods.product_name(tx, price)
        if periods.is_metered(price):
            lines.append(
                CheckoutLine(name, None, unit_price(price), f"{interval_label(price)}, by usage", True)
            )
        else:
            amount = money(periods.price_amount(price, int(quantity or 1)), price.get("currency"))
            lines.append(CheckoutLine(name, quantity, amount, interval_label(price)))
    data = request.get("subscription_data") or {}
    trial_end = int(data["trial_end"]) if data.get("trial_end") is not None else None
    trial_days = int(data["trial_period_days"]) if data.get("trial_period_days") else None
    if trial_end is not None and trial_days is None:
        trial_days = max(1, math.ceil((trial_end - now) / periods.DAY))
    customer_id = session.get("customer")
    customer = None if not customer_id else await find(tx, "customer", str(customer_id))
    return CheckoutView(session, customer, lines, trial_days, trial_end, now)


def render_checkout(
    request: Request, view: CheckoutView, *, error: str | None = None, status: int = 200
) -> HTMLResponse:
    session = view.session
    base = f"{root(request)}/checkout/{session['id']}"
    cancel = session.get("cancel_url")
    back = f'<p><a href="{href(cancel)}">&larr; Cancel and go back</a></p>' if cancel else ""
    if session["status"] == "complete":
        body = (
            f'<div class="card"><h1>This checkout session is complete</h1>{banner(error=error)}'
            "<p>The payment went through and the subscription has started. Nothing more to do "
            "here.</p>"
            f'<p><a href="{href(success_redirect(session))}">Continue</a></p></div>'
        )
        return page(request, "Checkout complete", body, status=status, now=view.now)
    if view.expired:
        body = (
            f'<div class="card"><h1>This checkout session has expired</h1>{banner(error=error)}'
            f"<p>It expired on {esc(moment(min(int(session['expires_at']), view.now)))}. Start "
            f"a new checkout from the app.</p>{back}</div>"
        )
        return page(request, "Checkout expired", body, status=status if status != 200 else 410, now=view.now)

    rows = "".join(
        f"<tr><td>{esc(line.name)}"
        + (f' <span class="muted">&times; {esc(line.quantity)}</span>' if line.quantity else "")
        + f'</td><td class="num">{esc(line.amount)} <span class="muted">{esc(line.interval)}</span>'
        "</td></tr>"
        for line in view.lines
    )
    trial = ""
    if view.trial_days:
        until = f" (until {esc(day(view.trial_end))})" if view.trial_end else ""
        trial = f"<p><strong>{esc(view.trial_days)}-day free trial</strong>{until}</p>"
    today = money(session.get("amount_total"), session.get("currency"))
    customer = view.customer or {}
    who = ""
    if customer.get("name"):
        who += f"<p>Customer: <strong>{esc(customer['name'])}</strong></p>"
    if view.email:
        who += f"<p>Email: <strong>{esc(view.email)}</strong></p>"
        email_field = ""
    else:
        email_field = (
            '<p><label>Email<input type="email" name="email" required '
            'placeholder="you@example.com"></label></p>'
        )
    code_field = (
        '<p><label>Promotion code<input type="text" name="promotion_code" autocomplete="off"></label></p>'
        if session.get("allow_promotion_codes")
        else ""
    )
    body = (
        f'{back}<div class="card"><p class="muted">Subscribe to</p>'
        f"<h1>{esc(plan_title([line.name for line in view.lines if not line.metered]))}</h1>"
        f"<table>{rows}</table>{trial}"
        f'<p>Total due today: <span class="big">{esc(today)}</span></p>{who}</div>'
        f'<div class="card"><h2>Payment</h2>{banner(error=error)}'
        '<p class="muted">Card: 4242 4242 4242 4242 &middot; 12/34 &middot; 123 (sandbox test card)</p>'
        f'<form class="inline" method="post" action="{esc(base)}/pay">{email_field}{code_field}'
        '<button type="submit">Pay</button></form>'
        f'<form class="inline" method="post" action="{esc(base)}/decline">'
        '<button type="submit" class="secondary">Decline (the card is refused)</button></form>'
        "</div>"
    )
    return page(request, "Checkout", body, status=status, now=view.now)


@control("GET", "/checkout/{session_id}")
async def checkout_page(sandbox: SandboxHost, request: Request) -> Response:
    session_id = request.path_params["session_id"]
    async with sandbox.transaction() as tx:
        view = await checkout_view(tx, session_id)
    if view is None:
        return missing(request, "checkout session", session_id)
    return render_checkout(request, view)


@control("POST", "/checkout/{session_id}/pay")
async def checkout_pay(sandbox: SandboxHost, request: Request) -> Response:
    session_id = request.path_params["session_id"]
    fields = await form(request)
    error: StripeError | None = None
    try:
        async with sandbox.transaction() as tx:
            session = await find(tx, "checkout.session", session_id)
            if session is None:
                return missing(request, "checkout session", session_id)
            # The page asks for the email only when neither the customer nor the session has one.
            customer = await find(tx, "customer", str(session.get("customer") or ""))
            known = (customer or {}).get("email") or session.get("customer_email")
            email = None if known else (fields.get("email") or "").strip() or None
            code = (fields.get("promotion_code") or "").strip() or None
            result = await creation.complete_checkout(
                tx, sandbox.config, session_id, outcome="paid", email=email, promotion_code=code
            )
    except StripeError as exc:
        error = exc
    if error is not None:
        async with sandbox.transaction() as tx:
            view = await checkout_view(tx, session_id)
        assert view is not None
        return render_checkout(request, view, error=error.message, status=409)
    return see_other(success_redirect(result["session"]))


@control("POST", "/checkout/{session_id}/decline")
async def checkout_decline(sandbox: SandboxHost, request: Request) -> Response:
    session_id = request.path_params["session_id"]
    message = DECLINED
    status = 402
    async with sandbox.transaction() as tx:
        try:
            await creation.complete_checkout(tx, sandbox.config, session_id, outcome="declined")
        except StripeError as exc:
            if exc.status == 404:
                return missing(request, "checkout session", session_id)
            message, status = exc.message, 409
        view = await checkout_view(tx, session_id)
    assert view is not None
    return render_checkout(request, view, error=message, status=status)


# Invoices -------------------------------------------------------------------------------------


BILLED_TO = ("customer_name", "customer_email")


def render_invoice(
    request: Request,
    invoice: Obj,
    now: int,
    *,
    notice: str | None = None,
    error: str | None = None,
    status: int = 200,
) -> HTMLResponse:
    currency = invoice.get("currency")
    base = f"{root(request)}/invoices/{invoice['id']}"
    rows = "".join(
        f'<tr><td>{esc(line.get("description"))}<br><span class="muted">'
        f"{esc(day((line.get('period') or {}).get('start')))} &ndash; "
        f"{esc(day((line.get('period') or {}).get('end')))}</span></td>"
        f'<td class="num">{esc(line.get("quantity") or "")}</td>'
        f'<td class="num">{esc(money(line.get("amount"), currency))}</td></tr>'
        for line in (invoice.get("lines") or {}).get("data") or []
    )
    totals = "".join(
        f'<tr><td colspan="2">{esc(label)}</td>'
        f'<td class="num">{esc(money(invoice.get(key), currency))}</td></tr>'
        for label, key in (
            ("Subtotal", "subtotal"),
            ("Total", "total"),
            ("Amount due", "amount_due"),
            ("Amount paid", "amount_paid"),
            ("Amount remaining", "amount_remaining"),
        )
    )
    pay = ""
    if invoice["status"] == "open" and int(invoice.get("amount_remaining") or 0) > 0:
        pay = (
            '<div class="card"><h2>Pay this invoice</h2>'
            '<p class="muted">Card: 4242 4242 4242 4242 (sandbox test card)</p>'
            f'<form class="inline" method="post" action="{esc(base)}/pay">'
            f'<button type="submit">Pay {esc(money(invoice.get("amount_remaining"), currency))}</button>'
            "</form>"
            f'<form class="inline" method="post" action="{esc(base)}/decline">'
            '<button type="submit" class="secondary">Decline (the card is refused)</button></form></div>'
        )
    due = ""
    if invoice.get("next_payment_attempt"):
        due = f"<p>Next automatic payment attempt: {esc(day(invoice['next_payment_attempt']))}</p>"
    body = (
        f"{banner(notice, error)}"
        f'<div class="card"><p class="muted">{esc(invoice.get("account_name") or "Stripe sandbox")}</p>'
        f"<h1>Invoice {esc(invoice.get('number') or invoice['id'])} "
        f'<span class="status {esc(invoice["status"])}">{esc(invoice["status"])}</span></h1>'
        f"<p>Billed to {esc(' '.join(filter(None, (invoice.get(k) for k in BILLED_TO))))}"
        f"<br>Issued {esc(day(invoice.get('effective_at') or invoice.get('created')))}</p>{due}"
        f'<table><tr><th>Description</th><th class="num">Qty</th><th class="num">Amount</th></tr>'
        f"{rows}{totals}</table>"
        f'<p><a href="{esc(base)}/pdf">Download PDF</a></p></div>{pay}'
    )
    return page(request, f"Invoice {invoice.get('number') or invoice['id']}", body, status=status, now=now)


@control("GET", "/invoices/{invoice_id}")
async def invoice_page(sandbox: SandboxHost, request: Request) -> Response:
    invoice_id = request.path_params["invoice_id"]
    async with sandbox.transaction() as tx:
        invoice = await find(tx, "invoice", invoice_id)
        now = tx.now()
    if invoice is None:
        return missing(request, "invoice", invoice_id)
    return render_invoice(request, invoice, now, notice=NOTICES.get(request.query_params.get("notice", "")))


@control("POST", "/invoices/{invoice_id}/pay")
async def invoice_pay(sandbox: SandboxHost, request: Request) -> Response:
    """The customer pays an open invoice with a new card that works (as on Stripe's page)."""
    invoice_id = request.path_params["invoice_id"]
    async with sandbox.transaction() as tx:
        invoice = await find(tx, "invoice", invoice_id)
        if invoice is None:
            return missing(request, "invoice", invoice_id)
        now = tx.now()
        if invoice["status"] != "open" or int(invoice.get("amount_remaining") or 0) <= 0:
            return render_invoice(
                request,
                invoice,
                now,
                error=f"This invoice is {invoice['status']}: nothing to pay.",
                status=409,
            )
        paid = await payments.attempt_payment(tx, invoice, now, succeed=True)
        await invoicing.settle_subscription(tx, sandbox.config, invoice, paid, now)
    return see_other(f"{root(request)}/invoices/{invoice_id}?notice=paid")


@control("POST", "/invoices/{invoice_id}/decline")
async def invoice_decline(sandbox: SandboxHost, request: Request) -> Response:
    """The card entered on the page is refused: nothing changes (no attempt is recorded)."""
    invoice_id = request.path_params["invoice_id"]
    async with sandbox.transaction() as tx:
        invoice = await find(tx, "invoice", invoice_id)
        now = tx.now()
    if invoice is None:
        return missing(request, "invoice", invoice_id)
    return render_invoice(request, invoice, now, error=DECLINED, status=402)


@control("GET", "/invoices/{invoice_id}/pdf")
async def invoice_pdf(sandbox: SandboxHost, request: Request) -> Response:
    invoice_id = request.path_params["invoice_id"]
    async with sandbox.transaction() as tx:
        invoice = await find(tx, "invoice", invoice_id)
    if invoice is None:
        return missing(request, "invoice", invoice_id)
    currency = invoice.get("currency")
    lines = [
        str(invoice.get("account_name") or "Stripe sandbox") + " (test mode)",
        f"Invoice {invoice.get('number') or invoice['id']} - {invoice['status']}",
        f"Billed to {invoice.get('customer_name') or ''} {invoice.get('customer_email') or ''}".rstrip(),
        f"Issued {day(invoice.get('effective_at') or invoice.get('created'))}",
        "",
    ]
    for line in (invoice.get("lines") or {}).get("data") or []:
        lines.append(f"{line.get('description')}: {money(line.get('amount'), currency)}")
    lines += [
        "",
        f"Total: {money(invoice.get('total'), currency)}",
        f"Amount paid: {money(invoice.get('amount_paid'), currency)}",
        f"Amount remaining: {money(invoice.get('amount_remaining'), currency)}",
    ]
    filename = f"{invoice.get('number') or invoice['id']}.pdf"
    return Response(
        text_pdf(lines),
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{filename}"'},
    )


def text_pdf(lines: list[str]) -> bytes:
    """A one-page PDF showing `lines` in Helvetica (characters outside Latin-1 become '?')."""

    def literal(text: str) -> str:
        safe = text.encode("latin-1", errors="replace").decode("latin-1")
        return "(" + safe.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"

    commands = ["BT", "/F1 11 Tf", "14 TL", "56 780 Td"]
    for index, text in enumerate(lines):
        commands.append(f"{literal(text)} Tj" if index == 0 else f"{literal(text)} '")
    commands.append("ET")
    stream = "\n".join(commands).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)
