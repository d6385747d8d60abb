"""The customer portal's hosted page (a portal session's `url`), as Stripe's portal behaves.

- `GET /portal/{id}`: each live subscription (plan named once, price, status, period end,
  pending cancellation), the payment method, invoice history, a link to `return_url`.
- "Cancel subscription" opens `GET /portal/{id}/subscriptions/{sub}/cancel`, Stripe's
  confirmation step (when it ends, and the reason survey when the configuration's
  `subscription_cancel.cancellation_reason` is enabled); its form posts `confirm=true` (and
  `feedback`) to `POST .../cancel`, which cancels now or at the period end as configured, and
  without `confirm` only redirects to the confirmation.
- `POST /portal/{id}/subscriptions/{sub}/resume` and `POST /portal/{id}/payment_method`
  (`fails=true|false`).

Each action is allowed only when the portal configuration enables the feature, runs the same
engine functions as the API in one sandbox transaction, then redirects (303) back to the portal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from stripe_sandbox.api import SandboxConfig, SandboxHost, control
from stripe_sandbox.control.pages import (
    ENDED_STATUSES,
    NOTICES,
    Obj,
    banner,
    day,
    esc,
    find,
    form,
    href,
    interval_label,
    lines_of,
    missing,
    money,
    page,
    plan_title,
    root,
    see_other,
    unit_price,
)
from stripe_sandbox.engine import changes, invoicing, payments, periods
from stripe_sandbox.errors import StripeError
from stripe_sandbox.store import Transaction

# Customer portal ------------------------------------------------------------------------------


@dataclass
class PortalSubscription:
    subscription: Obj
    plan: str
    price: str

    @property
    def id(self) -> str:
        return str(self.subscription["id"])

    @property
    def pending_cancel(self) -> bool:
        return bool(self.subscription.get("cancel_at_period_end") or self.subscription.get("cancel_at"))


@dataclass
class PortalView:
    session: Obj
    configuration: Obj
    customer: Obj
    subscriptions: list[PortalSubscription]
    invoices: list[Obj]
    card: Obj | None
    card_fails: bool
    now: int
    features: Obj = field(default_factory=dict)

    def enabled(self, feature: str) -> bool:
        return bool((self.features.get(feature) or {}).get("enabled"))


async def _subscription_view(tx: Transaction, subscription: Obj) -> PortalSubscription:
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
    return PortalSubscription(subscription, plan_title(names) or "Subscription", " + ".join(prices))


async def portal_view(tx: Transaction, session_id: str) -> PortalView | None:
    session = await find(tx, "billing_portal.session", session_id)
    if session is None:
        return None
    configuration = await tx.get("billing_portal.configuration", str(session["configuration"]))
    customer_id = str(session["customer"])
    customer = await tx.get("customer", customer_id)
    subscriptions = await tx.all(
        "subscription",
        lambda s: s.get("customer") == customer_id and s.get("status") not in ENDED_STATUSES,
    )
    invoices = await tx.all(
        "invoice", lambda i: i.get("customer") == customer_id and i.get("status") != "draft"
    )
    method_id = (customer.get("invoice_settings") or {}).get("default_payment_method") or next(
        (s.get("default_payment_method") for s in subscriptions if s.get("default_payment_method")), None
    )
    card = None if not method_id else await find(tx, "payment_method", str(method_id))
    return PortalView(
        session=session,
        configuration=configuration,
        customer=customer,
        subscriptions=[await _subscription_view(tx, s) for s in subscriptions],
        invoices=invoices,
        card=card,
        card_fails=await payments.payment_method_fails(tx, customer_id),
        now=tx.now(),
        features=configuration.get("features") or {},
    )


def _subscription_card(base: str, view: PortalView, item: PortalSubscription) -> str:
    subscription = item.subscription
    status = str(subscription["status"])
    period_end = periods.period_of(subscription)[1]
    lines = [
        f'<h2>{esc(item.plan)} <span class="status {esc(status)}">{esc(status.replace("_", " "))}'
        "</span></h2>",
        f"<p>{esc(item.price)}</p>",
    ]
    if status == "trialing" and subscription.get("trial_end"):
        lines.append(f"<p>Trial ends on <strong>{esc(day(subscription['trial_end']))}</strong>.</p>")
    if item.pending_cancel:
        ends = subscription.get("cancel_at") or period_end
        lines.append(f"<p>Cancels on <strong>{esc(day(ends))}</strong>.</p>")
    else:
        lines.append(f"<p>Current period ends on <strong>{esc(day(period_end))}</strong>; renews then.</p>")
    action = f"{base}/subscriptions/{subscription['id']}"
    cancel = view.features.get("subscription_cancel") or {}
    if item.pending_cancel:
        lines.append(
            f'<form method="post" action="{esc(action)}/resume">'
            '<button type="submit">Renew subscription (undo the cancellation)</button></form>'
        )
    elif cancel.get("enabled"):
        # As on Stripe's portal: the button opens a confirmation (with the reason survey, when
        # the configuration enables it); only the confirmation's form cancels.
        lines.append(
            f'<form method="get" action="{esc(action)}/cancel">'
            '<button type="submit" class="danger">Cancel subscription</button></form>'
        )
    return f'<div class="card">{"".join(lines)}</div>'


REASON_LABELS = {
    "too_expensive": "It's too expensive",
    "missing_features": "Some features are missing",
    "switched_service": "I'm switching to a different service",
    "unused": "I don't use the service enough",
    "customer_service": "Customer service was less than expected",
    "too_complex": "Ease of use was less than expected",
    "low_quality": "Quality was less than expected",
    "other": "Other reason",
}


def render_cancel_confirmation(request: Request, view: PortalView, item: PortalSubscription) -> HTMLResponse:
    """Stripe's "Cancel your plan" step: when it ends, the reason survey if enabled, confirm."""
    subscription = item.subscription
    base = f"{root(request)}/portal/{view.session['id']}"
    cancel = view.features.get("subscription_cancel") or {}
    period_end = periods.period_of(subscription)[1]
    if cancel.get("mode") == "immediately":
        when = "Your subscription will be canceled immediately."
    else:
        when = (
            f"Your subscription will be canceled, but is still available until the end of your "
            f"billing period on {day(period_end)}."
        )
    reason = cancel.get("cancellation_reason") or {}
    survey = ""
    if reason.get("enabled") and reason.get("options"):
        choices = "".join(
            f'<p><label class="choice"><input type="radio" name="feedback" value="{esc(option)}">'
            f"{esc(REASON_LABELS.get(option, option.replace('_', ' ')))}</label></p>"
            for option in reason["options"]
        )
        survey = f"<fieldset><legend>Why are you canceling? (optional)</legend>{choices}</fieldset>"
    body = (
        f'<p><a href="{esc(base)}">&larr; Back</a></p><div class="card"><h1>Cancel your plan</h1>'
        f"<p><strong>{esc(item.plan)}</strong> &middot; {esc(item.price)}</p><p>{esc(when)}</p>"
        f'<form method="post" action="{esc(base)}/subscriptions/{esc(subscription["id"])}/cancel">'
        f'<input type="hidden" name="confirm" value="true">{survey}'
        '<button type="submit" class="danger">Confirm cancellation</button></form>'
        f'<p><a href="{esc(base)}">Go back (keep the subscription)</a></p></div>'
    )
    return page(request, "Cancel your plan", body, now=view.now)


@control("GET", "/portal/{session_id}/subscriptions/{subscription_id}/cancel")
async def portal_cancel_confirmation(sandbox: SandboxHost, request: Request) -> Response:
    """The portal's cancellation step: confirm, and say why when the configuration asks."""
    session_id = request.path_params["session_id"]
    subscription_id = request.path_params["subscription_id"]
    async with sandbox.transaction() as tx:
        view = await portal_view(tx, session_id)
    if view is None:
        return missing(request, "portal session", session_id)
    item = next((i for i in view.subscriptions if i.id == subscription_id), None)
    if item is None:
        return render_portal(
            request, view, error="This subscription does not belong to this customer.", status=404
        )
    if not (view.features.get("subscription_cancel") or {}).get("enabled"):
        return render_portal(
            request, view, error="Canceling is not enabled in this portal's configuration.", status=403
        )
    return render_cancel_confirmation(request, view, item)


def render_portal(
    request: Request,
    view: PortalView,
    *,
    notice: str | None = None,
    error: str | None = None,
    status: int = 200,
) -> HTMLResponse:
    session, customer = view.session, view.customer
    base = f"{root(request)}/portal/{session['id']}"
    headline = (view.configuration.get("business_profile") or {}).get("headline")
    parts = [
        f'<p><a href="{href(session.get("return_url"))}">&larr; Return to the app</a></p>',
        f"<h1>{esc(headline or 'Manage your billing')}</h1>",
        banner(notice, error),
        '<div class="card"><h2>Account</h2>'
        f"<p>{lines_of(customer.get('name'), customer.get('email')) or 'No name or email on file.'}"
        "</p></div>",
    ]
    if view.subscriptions:
        parts += [_subscription_card(base, view, item) for item in view.subscriptions]
    else:
        parts.append('<div class="card"><h2>Subscription</h2><p>No current subscription.</p></div>')
    if view.enabled("payment_method_update"):
        if view.card is not None:
            card = view.card.get("card") or {}
            current = (
                f"{esc(str(card.get('brand') or 'card').title())} ending in {esc(card.get('last4'))}, "
                f"expires {esc(card.get('exp_month'))}/{esc(card.get('exp_year'))}"
            )
        else:
            current = "No payment method on file."
        warning = ' <span class="status past_due">charges fail (sandbox)</span>' if view.card_fails else ""
        parts.append(
            f'<div class="card"><h2>Payment method</h2><p>{current}{warning}</p>'
            f'<form class="inline" method="post" action="{esc(base)}/payment_method">'
            '<input type="hidden" name="fails" value="false">'
            '<button type="submit">Use a new card (works)</button></form>'
            f'<form class="inline" method="post" action="{esc(base)}/payment_method">'
            '<input type="hidden" name="fails" value="true">'
            '<button type="submit" class="secondary">Use a new card that will be declined</button></form>'
            "</div>"
        )
    if view.enabled("invoice_history"):
        rows = "".join(
            f"<tr><td>{esc(day(inv.get('created')))}</td><td>{esc(inv.get('number') or inv['id'])}</td>"
            f'<td class="num">{esc(money(inv.get("total"), inv.get("currency")))}</td>'
            f'<td><span class="status {esc(inv["status"])}">{esc(inv["status"])}</span></td>'
            + (
                f'<td><a href="{href(inv["hosted_invoice_url"])}">View</a></td>'
                if inv.get("hosted_invoice_url")
                else "<td></td>"
            )
            + "</tr>"
            for inv in view.invoices
        )
        table = (
            '<table><tr><th>Date</th><th>Number</th><th class="num">Amount</th><th>Status</th><th></th>'
            f"</tr>{rows}</table>"
            if rows
            else "<p>No invoices yet.</p>"
        )
        parts.append(f'<div class="card"><h2>Invoice history</h2>{table}</div>')
    return page(request, "Billing portal", "".join(parts), status=status, now=view.now)


async def _portal_response(
    sandbox: SandboxHost, request: Request, session_id: str, *, error: str, status: int
) -> Response:
    async with sandbox.transaction() as tx:
        view = await portal_view(tx, session_id)
    if view is None:
        return missing(request, "portal session", session_id)
    return render_portal(request, view, error=error, status=status)


@control("GET", "/portal/{session_id}")
async def portal_page(sandbox: SandboxHost, request: Request) -> Response:
    session_id = request.path_params["session_id"]
    async with sandbox.transaction() as tx:
        view = await portal_view(tx, session_id)
    if view is None:
        return missing(request, "portal session", session_id)
    return render_portal(request, view, notice=NOTICES.get(request.query_params.get("notice", "")))


class PortalRefusal(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


async def _portal_subscription(tx: Transaction, session_id: str, subscription_id: str) -> tuple[Obj, Obj]:
    """The portal session's configuration features and one of its customer's subscriptions."""
    session = await tx.get("billing_portal.session", session_id)
    configuration = await tx.get("billing_portal.configuration", str(session["configuration"]))
    subscription = await find(tx, "subscription", subscription_id)
    if subscription is None or subscription.get("customer") != session["customer"]:
        raise PortalRefusal("This subscription does not belong to this customer.", 404)
    return configuration.get("features") or {}, subscription


async def cancellable(tx: Transaction, session_id: str, subscription_id: str) -> tuple[Obj, Obj]:
    """The configuration's `subscription_cancel` and the subscription, if the portal may cancel it."""
    features, subscription = await _portal_subscription(tx, session_id, subscription_id)
    cancel = features.get("subscription_cancel") or {}
    if not cancel.get("enabled"):
        raise PortalRefusal("Canceling is not enabled in this portal's configuration.", 403)
    if subscription["status"] in ENDED_STATUSES:
        raise PortalRefusal("This subscription has already ended.", 409)
    return cancel, subscription


async def cancel_from_portal(
    tx: Transaction, config: SandboxConfig, session_id: str, subscription_id: str, feedback: str | None
) -> str:
    """What the portal's cancel button does, as configured; returns the notice key."""
    cancel, subscription = await cancellable(tx, session_id, subscription_id)
    details: Obj = {}
    options = (cancel.get("cancellation_reason") or {}).get("options") or []
    if feedback and feedback in options:
        details["feedback"] = feedback
    if cancel.get("mode") == "immediately":
        behavior = str(cancel.get("proration_behavior") or "none")
        await invoicing.cancel_subscription(
            tx,
            config,
            subscription,
            tx.now(),
            prorate=behavior != "none",
            invoice_now=behavior == "always_invoice",
            details=details or None,
        )
        return "canceled_now"
    params: Obj = {"cancel_at_period_end": True}
    if details:
        params["cancellation_details"] = details
    await changes.update_subscription(tx, config, subscription_id, params)
    return "canceled"


async def resume_from_portal(
    tx: Transaction, config: SandboxConfig, session_id: str, subscription_id: str
) -> str:
    """Undo a pending cancellation, as `POST /v1/subscriptions/{id} cancel_at_period_end=false`."""
    _features, subscription = await _portal_subscription(tx, session_id, subscription_id)
    if subscription["status"] in ENDED_STATUSES:
        raise PortalRefusal("This subscription has already ended.", 409)
    if not (subscription.get("cancel_at_period_end") or subscription.get("cancel_at")):
        raise PortalRefusal("This subscription is not set to cancel.", 409)
    await changes.update_subscription(tx, config, subscription_id, {"cancel_at_period_end": False})
    return "resumed"


async def update_payment_method(tx: Transaction, config: SandboxConfig, session_id: str, fails: bool) -> str:
    """The customer enters a new card: attached, made the default, and (sandbox) failing or not.

    Charges fail from now on exactly as after `POST /_control/customers/{id}/payment_method`.
    """
    session = await tx.get("billing_portal.session", session_id)
    configuration = await tx.get("billing_portal.configuration", str(session["configuration"]))
    if not ((configuration.get("features") or {}).get("payment_method_update") or {}).get("enabled"):
        raise PortalRefusal("Updating the payment method is not enabled in this portal's configuration.", 403)
    customer_id = str(session["customer"])
    customer = await tx.get("customer", customer_id)
    method = await payments.create_payment_method(tx, customer_id, tx.now(), customer.get("email"))
    settings = dict(customer.get("invoice_settings") or {})
    previous = {"invoice_settings": copy.deepcopy(settings)}
    settings["default_payment_method"] = method["id"]
    customer["invoice_settings"] = settings
    await tx.save(customer)
    await payments.emit(tx, "customer.updated", customer, previous)
    subscriptions = await tx.all(
        "subscription",
        lambda s: (
            s.get("customer") == customer_id
            and s.get("status") not in ENDED_STATUSES
            and bool(s.get("default_payment_method"))
        ),
    )
    for subscription in subscriptions:
        await changes.update_subscription(
            tx, config, subscription["id"], {"default_payment_method": method["id"]}
        )
    await payments.set_payment_method_fails(tx, customer_id, fails)
    return "card_fails" if fails else "card_works"


async def _portal_action(sandbox: SandboxHost, request: Request, action: str) -> Response:
    session_id = request.path_params["session_id"]
    fields = await form(request)
    try:
        async with sandbox.transaction() as tx:
            if await find(tx, "billing_portal.session", session_id) is None:
                return missing(request, "portal session", session_id)
            if action == "cancel" and fields.get("confirm") != "true":
                # Not confirmed (an old form, or a direct post): ask first, as Stripe does.
                await cancellable(tx, session_id, request.path_params["subscription_id"])
                return see_other(
                    f"{root(request)}/portal/{session_id}/subscriptions/"
                    f"{request.path_params['subscription_id']}/cancel"
                )
            if action == "cancel":
                notice = await cancel_from_portal(
                    tx,
                    sandbox.config,
                    session_id,
                    request.path_params["subscription_id"],
                    fields.get("feedback"),
                )
            elif action == "resume":
                notice = await resume_from_portal(
                    tx, sandbox.config, session_id, request.path_params["subscription_id"]
                )
            else:
                choice = fields.get("fails", "").lower()
                if choice not in ("true", "false"):
                    raise PortalRefusal("Choose a card that works or one that fails.", 400)
                notice = await update_payment_method(tx, sandbox.config, session_id, choice == "true")
    except PortalRefusal as refusal:
        return await _portal_response(
            sandbox, request, session_id, error=refusal.message, status=refusal.status
        )
    except StripeError as exc:
        return await _portal_response(sandbox, request, session_id, error=exc.message, status=exc.status)
    return see_other(f"{root(request)}/portal/{session_id}?notice={notice}")


@control("POST", "/portal/{session_id}/subscriptions/{subscription_id}/cancel")
async def portal_cancel(sandbox: SandboxHost, request: Request) -> Response:
    return await _portal_action(sandbox, request, "cancel")


@control("POST", "/portal/{session_id}/subscriptions/{subscription_id}/resume")
async def portal_resume(sandbox: SandboxHost, request: Request) -> Response:
    return await _portal_action(sandbox, request, "resume")


@control("POST", "/portal/{session_id}/payment_method")
async def portal_payment_method(sandbox: SandboxHost, request: Request) -> Response:
    return await _portal_action(sandbox, request, "payment_method")
