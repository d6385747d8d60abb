"""The console's pages and sign-in (`install_admin` adds every `/admin` route; docs/operations.md).

Every page but the sign-in form needs the operator's session cookie (graph/admin/session.py):
without one the answer is 401 and a link to sign in, and no figure. Every page carries the
front door's `PAGE_POLICY` (no script at all, styles and images from the service only).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from billing.account_lookup import AccountFound, customer_events, find_account
from billing.customers import list_invoices
from billing.errors import BillingError, ConfigurationError, ErrorCode
from billing.host_events import admin as host_admin
from billing.operations import past_due_accounts, stuck_events, trials_ending
from billing.revenue import MetricsInterval, RevenueMetrics, bucket_start, revenue_metrics
from billing.settings import Settings
from billing.usage.reporting import flagged_reports
from billing.usage.windows import entitlements
from graph.admin import charts, pages
from graph.admin.session import ADMIN_PATH, CSRF_COOKIE, Session, Sessions, forgery
from graph.auth import Authenticator, AuthUnavailable, Principal, ServicePrincipal, User, issue_dev_token

log = logging.getLogger("billing.admin")

OVERVIEW_DAYS = 90
MAX_FORM_BYTES = 16_384
Page = Callable[[Request, Session], Awaitable[Response]]


class Console:
    """The console's handlers, bound to the app (its state holds the running services)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = Sessions(settings)

    # Helpers ---------------------------------------------------------------------------------

    @staticmethod
    def state(request: Request) -> Any:
        return request.app.state

    def now(self, request: Request) -> Any:
        return self.state(request).graphql.clock()

    async def fields(self, request: Request) -> dict[str, str]:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return {}
        return dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))

    def guarded(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        """`page` for an operator's session only; 401 and no figure for anyone else."""

        async def endpoint(request: Request) -> Response:
            session = self.sessions.read(request)
            if session is None:
                return pages.refused(
                    request, "Only an operator of the billing service may see this: sign in.", status=401
                )
            return await page(request, session)

        return endpoint

    def forged(self, request: Request, fields: dict[str, str], session: Session) -> Response | None:
        reason = forgery(request, fields, session.csrf)
        if reason is None:
            return None
        log.warning("admin console: refused a POST to %s: %s", request.url.path, reason)
        return pages.refused(request, f"Refused: {reason}.", status=403)

    async def metrics(self, request: Request) -> RevenueMetrics:
        """The last 90 days by day, from whole days: what `billingMetrics` computes for them."""
        now = self.now(request)
        start = bucket_start(now - timedelta(days=OVERVIEW_DAYS), MetricsInterval.DAY)
        state = self.state(request)
        return await revenue_metrics(state.database, start, now, MetricsInterval.DAY, state.catalog)

    # Sign-in ---------------------------------------------------------------------------------

    async def sign_in_page(self, request: Request) -> Response:
        if self.sessions.read(request) is not None:
            return RedirectResponse(pages.admin_url(request), status_code=303)
        return self._sign_in_form(request)

    def _sign_in_form(self, request: Request, error: str | None = None, status: int = 200) -> Response:
        token, new = self.sessions.pre_session_token(request)
        development = not self.settings.is_production
        body = pages.sign_in(request, token, development=development, error=error)
        response = pages.layout(request, "Sign in", body, status=status)
        if new:
            self.sessions.set_pre_session_token(response, request, token)
        return response

    async def sign_in(self, request: Request) -> Response:
        fields = await self.fields(request)
        reason = forgery(request, fields, request.cookies.get(CSRF_COOKIE))
        if reason is not None:
            log.warning("admin console: refused a sign-in: %s", reason)
            return self._sign_in_form(request, f"Refused: {reason}.", 403)
        try:
            principal = await self._principal(request, fields)
        except AuthUnavailable as exc:
            return self._sign_in_form(request, f"Tokens cannot be checked now: {exc}", 503)
        except (BillingError, ConfigurationError) as exc:
            return self._sign_in_form(request, f"Not signed in: {_message(exc)}", 401)
        operator = _operator_of(principal)
        if operator is None:
            who = principal.id if isinstance(principal, User) else "nobody"
            log.warning("admin console: %s is not an operator", who)
            return pages.refused(request, f"{who} is not an operator of the billing service.", status=403)
        response = RedirectResponse(pages.admin_url(request), status_code=303)
        listed = isinstance(principal, User) and principal.id in self.settings.operator_ids
        self.sessions.start(response, request, operator, listed=listed)
        log.info("admin console: operator signed in", extra={"operator": operator})
        return response

    async def _principal(self, request: Request, fields: dict[str, str]) -> Principal | None:
        authenticator: Authenticator = self.state(request).graphql.authenticator
        act_as = fields.get("act_as", "").strip()
        if act_as and not self.settings.is_production:
            token = issue_dev_token(self.settings, act_as)
            return await authenticator.verify(token)
        token = fields.get("token", "").strip()
        if not token:
            raise BillingError("give a token", code=ErrorCode.UNAUTHENTICATED)
        return await authenticator.authenticate(f"Bearer {token}")

    async def sign_out(self, request: Request) -> Response:
        session = self.sessions.read(request)
        if session is not None:
            forged = self.forged(request, await self.fields(request), session)
            if forged is not None:
                return forged
            log.info("admin console: operator signed out", extra={"operator": session.operator})
        response = RedirectResponse(pages.admin_url(request, "/sign-in?notice=signed-out"), status_code=303)
        self.sessions.end(response, request)
        return response

    # Pages -----------------------------------------------------------------------------------

    async def overview(self, request: Request, session: Session) -> Response:
        state = self.state(request)
        metrics = await self.metrics(request)
        trials = await trials_ending(state.database, now=self.now(request))
        past_due = await past_due_accounts(state.database)
        body = pages.overview(request, metrics, state.catalog.currency, trials, past_due)
        return pages.layout(request, "Overview", body, operator=session.operator, csrf=session.csrf)

    async def chart(self, request: Request, session: Session) -> Response:
        name = request.path_params["name"]
        if name not in ("mrr", "movements"):
            return Response("no such chart", status_code=404, media_type="text/plain")
        metrics = await self.metrics(request)
        currency = self.state(request).catalog.currency
        draw = charts.mrr_chart if name == "mrr" else charts.movements_chart
        return Response(
            draw(metrics.buckets, currency),
            media_type="image/svg+xml",
            headers={
                "Content-Security-Policy": charts.SVG_POLICY,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store",
            },
        )

    async def accounts(self, request: Request, session: Session) -> Response:
        query = pages.query_of(request.query_params)
        missing = False
        if query:
            found = await self.find(request, query)
            if found is not None:
                target = pages.admin_url(request, "/accounts/" + quote(found.state.user_id, safe=""))
                return RedirectResponse(target, status_code=303)
            missing = True
        body = pages.search(request, query, missing)
        return pages.layout(
            request,
            "Accounts",
            body,
            operator=session.operator,
            csrf=session.csrf,
            status=404 if missing else 200,
        )

    async def find(self, request: Request, query: str) -> AccountFound | None:
        """By Stripe customer id (`cus_…`), email (has an `@`) or user id, in that order of guess."""
        database = self.state(request).database
        if query.startswith("cus_"):
            found = await find_account(database, stripe_customer_id=query)
            if found is not None:
                return found
        if "@" in query:
            found = await find_account(database, email=query)
            if found is not None:
                return found
        return await find_account(database, user_id=query)

    async def account(self, request: Request, session: Session) -> Response:
        state = self.state(request)
        user_id = request.path_params["user_id"]
        found = await find_account(state.database, user_id=user_id)
        if found is None:
            body = pages.search(request, user_id, True)
            return pages.layout(
                request, "Accounts", body, operator=session.operator, csrf=session.csrf, status=404
            )
        invoices = await list_invoices(state.database, user_id=user_id, first=20)
        usage = await entitlements(state.database, state.graphql.policy, found.state, self.now(request))
        events = (
            []
            if found.stripe_customer_id is None
            else await customer_events(state.database, found.stripe_customer_id, first=50)
        )
        body = pages.account(request, found, invoices, usage, events, session.csrf)
        title = f"Account {found.state.user_id}"
        return pages.layout(request, title, body, operator=session.operator, csrf=session.csrf)

    async def operations(self, request: Request, session: Session) -> Response:
        state = self.state(request)
        events = await stuck_events(state.database)
        usage = await flagged_reports(state.database, now=self.now(request))
        host_events = (
            None
            if state.host_delivery is None
            else await host_admin.list_events(state.database, failed=True, limit=100)
        )
        body = pages.operations(request, events, usage, host_events, session.csrf)
        return pages.layout(request, "Operations", body, operator=session.operator, csrf=session.csrf)


def _operator_of(principal: Principal | None) -> str | None:
    if isinstance(principal, ServicePrincipal):
        return principal.name
    if isinstance(principal, User) and principal.operator:
        return principal.id
    return None


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc)


def admin_routes(console: Console, actions: list[Route]) -> list[Route]:
    g = console.guarded
    return [
        Route(ADMIN_PATH, g(console.overview), methods=["GET"]),
        Route(f"{ADMIN_PATH}/sign-in", console.sign_in_page, methods=["GET"]),
        Route(f"{ADMIN_PATH}/sign-in", console.sign_in, methods=["POST"]),
        Route(f"{ADMIN_PATH}/sign-out", console.sign_out, methods=["POST"]),
        Route(f"{ADMIN_PATH}/charts/{{name:str}}.svg", g(console.chart), methods=["GET"]),
        Route(f"{ADMIN_PATH}/accounts", g(console.accounts), methods=["GET"]),
        Route(f"{ADMIN_PATH}/accounts/{{user_id:path}}", g(console.account), methods=["GET"]),
        Route(f"{ADMIN_PATH}/operations", g(console.operations), methods=["GET"]),
        *actions,
    ]
