"""The console's HTML: server-rendered, no script, no inline style (graph/static/admin.css)."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import HTMLResponse

from billing.account_lookup import AccountEvent, AccountFound
from billing.customers import InvoiceRecord
from billing.host_events.admin import HostEventRow
from billing.ledger import LedgerEntry
from billing.operations import AccountBrief, InboxEvent
from billing.owners import owner_of
from billing.revenue import MOVEMENTS, RevenueMetrics
from billing.usage.reporting import FlaggedReport
from billing.usage.windows import Entitlement
from graph.admin.session import ADMIN_PATH, hidden_field
from graph.front_door import PAGE_POLICY, STATIC_PATH, html_page

NOTICES = {
    "synced": "Synced from Stripe: {id}.",
    "unchanged": "Synced from Stripe: {id} was already up to date (no ledger row).",
    "replayed": "Event {id} replayed: {outcome}.",
    "retried": "Usage aggregate {id} queued again and reported: {outcome}.",
    "host-replayed": "Host event {id} replayed: {outcome}.",
    "signed-out": "Signed out.",
}


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def root(request: Request) -> str:
    return esc(request.scope.get("root_path", ""))


def admin_url(request: Request, path: str = "") -> str:
    return f"{root(request)}{ADMIN_PATH}{path}"


def moment(value: datetime | None) -> str:
    return "-" if value is None else esc(value.strftime("%Y-%m-%d %H:%M UTC"))


def money(cents: int, currency: str) -> str:
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) / 100:,.2f} {esc(currency.upper())}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str, css: str = "") -> str:
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted empty">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(name)}</th>" for name in headers)
    return f'<table class="{esc(css)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def button(request: Request, action: str, label: str, csrf: str, css: str = "") -> str:
    return (
        f'<form method="post" action="{admin_url(request, action)}" class="inline">{hidden_field(csrf)}'
        f'<button type="submit" class="{esc(css)}">{esc(label)}</button></form>'
    )


def layout(
    request: Request,
    title: str,
    body: str,
    *,
    operator: str | None = None,
    csrf: str | None = None,
    status: int = 200,
) -> HTMLResponse:
    nav = ""
    if operator is not None and csrf is not None:
        links = "".join(
            f'<a href="{admin_url(request, path)}">{label}</a>'
            for path, label in (("", "Overview"), ("/accounts", "Accounts"), ("/operations", "Operations"))
        )
        nav = (
            f'<nav class="admin-nav"><strong>Billing admin</strong>{links}'
            f'<span class="who">{esc(operator)}</span>'
            f"{button(request, '/sign-out', 'Sign out', csrf, 'quiet')}</nav>"
        )
    notice = _notice(request)
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} · Billing admin</title>"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{root(request)}{STATIC_PATH}/admin.css">'
        f"</head><body>{nav}<main><h1>{esc(title)}</h1>{notice}{body}</main></body></html>"
    )
    response = html_page(document, PAGE_POLICY, status=status)
    # Not the front door's `no-referrer`: under it a browser posts forms with `Origin: null`, and
    # the forms' check wants this origin (graph/admin/session.py). Nothing leaves for another site.
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _notice(request: Request) -> str:
    template = NOTICES.get(request.query_params.get("notice", ""))
    if template is None:
        return ""
    text = template.format(
        id=request.query_params.get("id", "")[:200], outcome=request.query_params.get("outcome", "")[:40]
    )
    return f'<p class="notice" role="status">{esc(text)}</p>'


def sign_in(request: Request, csrf: str, *, development: bool, error: str | None = None) -> str:
    problem = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    act_as = ""
    if development:
        act_as = (
            "<h2>Development: act as a test user</h2>"
            '<p class="muted">As the front door\'s “act as a test user”: a development token for '
            "this user id, accepted only when the user is named in <code>ADMIN_USER_IDS</code>.</p>"
            f'<form method="post" action="{admin_url(request, "/sign-in")}" class="stack">'
            f'{hidden_field(csrf)}<label for="act-as-user">User id</label>'
            '<input id="act-as-user" name="act_as" autocomplete="off" spellcheck="false" required '
            'maxlength="200"><button id="act-as-button" type="submit">Act as this user</button></form>'
        )
    return (
        f"{problem}<p>Sign in with an operator's token: a user token of someone named in "
        "<code>ADMIN_USER_IDS</code> or carrying <code>AUTH_ADMIN_CLAIM</code> = "
        "<code>AUTH_ADMIN_VALUE</code>, or the service key. The browser then keeps a signed "
        "session cookie for an hour.</p>"
        f'<form method="post" action="{admin_url(request, "/sign-in")}" class="stack">'
        f'{hidden_field(csrf)}<label for="token">Operator token</label>'
        '<input id="token" name="token" type="password" autocomplete="off" required maxlength="8192">'
        f'<button id="sign-in-button" type="submit">Sign in</button></form>{act_as}'
    )


def refused(request: Request, reason: str, *, status: int) -> HTMLResponse:
    body = (
        f'<p class="error" role="alert">{esc(reason)}</p>'
        f'<p><a href="{admin_url(request, "/sign-in")}">Sign in as an operator</a></p>'
    )
    return layout(request, "Operators only", body, status=status)


def _figure(label: str, value: str, note: str = "", ident: str = "") -> str:
    id_attr = f' id="{esc(ident)}"' if ident else ""
    note_html = f'<span class="muted">{esc(note)}</span>' if note else ""
    return (
        f'<div class="figure"><span class="label">{esc(label)}</span>'
        f"<strong{id_attr}>{value}</strong>{note_html}</div>"
    )


def overview(
    request: Request,
    metrics: RevenueMetrics,
    currency: str,
    trials: Sequence[AccountBrief],
    past_due: Sequence[AccountBrief],
) -> str:
    totals = {name: metrics.total(name) for name in MOVEMENTS}
    figures = (
        '<div class="figures">'
        + _figure("MRR now", money(metrics.mrr, currency), "net of discounts, tax and trials excluded", "mrr")
        + _figure("ARR now", money(metrics.arr, currency), "MRR x 12", "arr")
        + _figure("Net new MRR, 90 days", money(sum(totals.values()), currency), "", "net-new")
        + _figure("MRR 90 days ago", money(metrics.mrr_at_start, currency))
        + "</div>"
    )
    movements = table(
        ["Movement", "90 days"],
        [[esc(name), money(value, currency)] for name, value in totals.items()],
        "No movements.",
        "narrow",
    )
    charts = (
        f'<img class="chart" src="{admin_url(request, "/charts/mrr.svg")}" alt="MRR over the last 90 days" '
        'width="900" height="320">'
        f'<img class="chart" src="{admin_url(request, "/charts/movements.svg")}" '
        'alt="MRR movements per day over the last 90 days" width="900" height="320">'
    )
    subscribers = table(
        ["Status", "Tier", "Accounts"],
        [
            [esc(status), esc(tier), str(count)]
            for (status, tier), count in sorted(metrics.subscribers.items())
        ],
        "No subscribers yet.",
        "narrow",
    )
    return (
        f"{figures}<h2>MRR over 90 days</h2>{charts}<h2>Movements</h2>{movements}"
        f"<h2>Subscribers by status and tier</h2>{subscribers}"
        f"<h2>Trials ending this week</h2>{_accounts(request, trials, 'No trial ends in the next 7 days.')}"
        f"<h2>Past-due accounts</h2>{_accounts(request, past_due, 'No account is past due.')}"
    )


def owner_label(user_id: str) -> str:
    """An account's owner (billing/owners.py): `user <id>` or `organisation <id>`."""
    owner = owner_of(user_id)
    return f"organisation {owner.id}" if owner.is_organization else f"user {owner.id}"


def account_link(request: Request, user_id: str) -> str:
    return f'<a href="{admin_url(request, "/accounts/" + quote(user_id, safe=""))}">{esc(user_id)}</a>'


def _accounts(request: Request, accounts: Sequence[AccountBrief], empty: str) -> str:
    return table(
        ["User", "Email", "Customer", "Tier", "Status", "Trial ends", "Period ends"],
        [
            [
                account_link(request, a.user_id),
                esc(a.email),
                esc(a.stripe_customer_id),
                esc(a.tier),
                esc(a.status),
                moment(a.trial_end),
                moment(a.current_period_end),
            ]
            for a in accounts
        ],
        empty,
    )


def search(request: Request, query: str, missing: bool) -> str:
    result = f'<p class="error" role="alert">No account for “{esc(query)}”.</p>' if missing else ""
    return (
        f'<form method="get" action="{admin_url(request, "/accounts")}" class="stack">'
        '<label for="q">User id, email or Stripe customer id (<code>cus_…</code>)</label>'
        f'<input id="q" name="q" value="{esc(query)}" required maxlength="320" autocomplete="off" '
        'spellcheck="false"><button id="search-button" type="submit">Find the account</button></form>'
        f"{result}"
    )


def _json(value: Any) -> str:
    return esc(json.dumps(value, sort_keys=True, default=str))


def _ledger(entries: Sequence[LedgerEntry]) -> str:
    rows = []
    for entry in entries:
        before = entry.before or {}
        names = entry.changed or list(entry.after)
        changes = "<br>".join(
            f"<code>{esc(name)}</code>: {_json(before.get(name))} → {_json(entry.after.get(name))}"
            for name in names
        )
        causes = "<br>".join(
            esc(" ".join(str(cause[key]) for key in ("type", "id") if cause.get(key)))
            + (f' <span class="muted">by {esc(cause["operator"])}</span>' if cause.get("operator") else "")
            for cause in entry.causes
        )
        rows.append([moment(entry.effective_at), esc(entry.kind), changes, causes, moment(entry.recorded_at)])
    return table(["Effective", "Kind", "Changes", "Causes", "Recorded"], rows, "No ledger rows.", "ledger")


def account(
    request: Request,
    found: AccountFound,
    invoices: Sequence[InvoiceRecord],
    usage: Sequence[Entitlement],
    events: Sequence[AccountEvent],
    csrf: str,
) -> str:
    s = found.state
    pending = (
        f"{esc(s.pending_tier)} {esc(s.pending_interval)} at {moment(s.pending_change_at)}"
        if s.pending_tier
        else "-"
    )
    state = table(
        ["Field", "Value"],
        [
            ["Owner", esc(owner_label(s.user_id))],
            ["Email", esc(s.email)],
            ["Stripe customer", esc(found.stripe_customer_id)],
            ["Status", f'<span id="account-status">{esc(s.status)}</span>'],
            ["Tier", esc(s.tier)],
            ["Interval", esc(s.interval)],
            ["Current period", f"{moment(s.current_period_start)} → {moment(s.current_period_end)}"],
            ["Trial ends", moment(s.trial_end)],
            ["Cancels at period end", "yes" if s.cancel_at_period_end else "no"],
            ["Pending change", pending],
        ],
        "",
        "narrow",
    )
    sync = (
        button(request, f"/accounts/{quote(s.user_id, safe='')}/sync", "Sync this account from Stripe", csrf)
        if found.stripe_customer_id
        else '<p class="muted">No Stripe customer: nothing to sync.</p>'
    )
    invoice_rows = [
        [
            esc(i.number or i.id),
            esc(i.status),
            money(i.total, i.currency),
            money(i.amount_paid, i.currency),
            moment(i.created),
        ]
        for i in invoices
    ]
    usage_rows = [
        [
            esc(u.feature),
            str(u.used),
            "unlimited" if u.limit is None else str(u.limit),
            "-" if u.remaining is None else str(u.remaining),
        ]
        for u in usage
    ]
    return (
        f"{state}{sync}<h2>Ledger (oldest first)</h2>{_ledger(found.ledger)}"
        "<h2>Invoices</h2>"
        + table(["Invoice", "Status", "Total", "Paid", "Created"], invoice_rows, "No invoices.")
        + "<h2>Usage this window</h2>"
        + table(["Feature", "Used", "Limit", "Remaining"], usage_rows, "No metered features.", "narrow")
        + f"<h2>Stripe events</h2>{events_table(request, events, csrf)}"
    )


def events_table(request: Request, events: Sequence[AccountEvent | InboxEvent], csrf: str) -> str:
    rows = []
    for event in events:
        action = ""
        if event.status == "failed":
            action = button(request, f"/events/{quote(event.id, safe='')}/replay", "Replay", csrf)
        rows.append(
            [
                f"<code>{esc(event.id)}</code>",
                esc(event.type),
                f'<span class="status-{esc(event.status)}">{esc(event.status)}</span>',
                str(event.attempts),
                esc(event.error),
                moment(event.received_at),
                action,
            ]
        )
    return table(
        ["Event", "Type", "Outcome", "Attempts", "Error", "Received", ""], rows, "No events.", "events"
    )


def _retry(request: Request, report: FlaggedReport, csrf: str) -> str:
    if report.status != "failed":
        return ""
    return button(request, f"/usage/{quote(report.id, safe='')}/retry", "Retry", csrf)


def operations(
    request: Request,
    events: Sequence[InboxEvent],
    usage: Sequence[FlaggedReport],
    host_events: Sequence[HostEventRow] | None,
    csrf: str,
) -> str:
    usage_rows = [
        [
            f"<code>{esc(r.id)}</code>",
            account_link(request, r.user_id),
            esc(r.feature),
            moment(r.minute),
            str(r.quantity),
            esc("at risk (near Stripe's 35-day limit)" if r.at_risk else r.status),
            str(r.attempts),
            esc(r.last_error),
            button(request, f"/usage/{quote(r.id, safe='')}/retry", "Retry", csrf)
            if r.status == "failed"
            else "",
        ]
        for r in usage
    ]
    if host_events is None:
        host = '<p class="muted">HOST_WEBHOOK_URL is not set: no host events are written.</p>'
    else:
        host = table(
            ["Id", "Type", "User", "Status", "Attempts", "Last answer", "Error", "Created", ""],
            [
                [
                    esc(h.id),
                    esc(h.type),
                    esc(h.user_id),
                    esc(h.status),
                    str(h.attempts),
                    esc(h.last_status_code),
                    esc(h.last_error),
                    moment(h.created_at),
                    button(request, f"/host-events/{h.id}/replay", "Replay", csrf),
                ]
                for h in host_events
            ],
            "No failed host events.",
        )
    return (
        f"<h2>Stripe events: failed and waiting</h2>{events_table(request, events, csrf)}"
        "<h2>Usage aggregates: failed, expired or close to Stripe's limit</h2>"
        + table(
            ["Aggregate", "User", "Feature", "Minute", "Quantity", "State", "Attempts", "Error", ""],
            usage_rows,
            "Nothing stuck.",
        )
        + f"<h2>Host events: failed</h2>{host}"
    )


def query_of(params: Mapping[str, str]) -> str:
    return params.get("q", "").strip()[:320]
