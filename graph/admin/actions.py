"""The console's buttons: each is a POST with the session's anti-forgery token that calls the
same billing function as its CLI twin, logs the operator's id, and redirects (303) back.

- Sync this account from Stripe (`billing sync`): a ledger row when anything changed, caused
  by `billing sync` with the `operator`;
- Replay a failed Stripe event (`billing events replay ID`): the inbox row processed again, and
  its sync's ledger row;
- Retry a failed usage aggregate (`billing usage report --retry-failed`): the `usage_report`
  row queued and sent again;
- Replay a failed host event (`billing host-events replay ID`): the `host_event` row due and
  delivered again.
"""

from __future__ import annotations

import logging
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from billing.account_lookup import find_account
from billing.errors import BillingError
from billing.host_events import admin as host_admin
from billing.operations import inbox_event
from billing.reconcile import reconcile
from billing.usage.reporting import retry_failed
from billing.webhooks import requeue
from graph.admin import pages
from graph.admin.routes import Console
from graph.admin.session import ADMIN_PATH, Session

log = logging.getLogger("billing.admin")


def _back(request: Request, path: str, notice: str, ident: str, outcome: str = "") -> Response:
    query = urlencode({"notice": notice, "id": ident, **({"outcome": outcome} if outcome else {})})
    return RedirectResponse(f"{pages.admin_url(request, path)}?{query}", status_code=303)


def _failed(request: Request, session: Session, title: str, message: str, status: int) -> Response:
    body = f'<p class="error" role="alert">{pages.esc(message)}</p>'
    return pages.layout(request, title, body, operator=session.operator, csrf=session.csrf, status=status)


class Actions:
    def __init__(self, console: Console) -> None:
        self.console = console

    async def _checked(self, request: Request) -> tuple[Session | None, Response | None]:
        session = self.console.sessions.read(request)
        if session is None:
            return None, pages.refused(
                request, "Only an operator of the billing service may do this.", status=401
            )
        forged = self.console.forged(request, await self.console.fields(request), session)
        return session, forged

    async def sync(self, request: Request) -> Response:
        session, refusal = await self._checked(request)
        if refusal is not None or session is None:
            return refusal or Response(status_code=401)
        state = self.console.state(request)
        user_id = request.path_params["user_id"]
        found = await find_account(state.database, user_id=user_id)
        if found is None or found.stripe_customer_id is None:
            return _failed(request, session, "Sync", f"No Stripe customer for {user_id}.", 404)
        try:
            report = await reconcile(
                database=state.database,
                gateway=state.stripe,
                notifier=state.events.notifier,
                customers=[found.stripe_customer_id],
                now=self.console.now(request),
                host_events=state.host_events,
                locks=state.events.locks,
                operator=session.operator,
            )
        except BillingError as exc:
            return _failed(request, session, "Sync", f"Stripe could not be read: {exc.message}", 502)
        ledger_rows = sum(result.ledger_rows for result in report.results)
        log.info(
            "admin console: synced %s from Stripe (%d ledger row(s))",
            found.stripe_customer_id,
            ledger_rows,
            extra={"operator": session.operator, "customer": found.stripe_customer_id},
        )
        return _back(
            request,
            f"/accounts/{quote(user_id, safe='')}",
            "synced" if report.drifted else "unchanged",
            user_id,
        )

    async def replay_event(self, request: Request) -> Response:
        session, refusal = await self._checked(request)
        if refusal is not None or session is None:
            return refusal or Response(status_code=401)
        state = self.console.state(request)
        event_id = request.path_params["event_id"]
        queued = await requeue(state.database, event_id=event_id, now=self.console.now(request))
        if queued == 0:
            return _failed(request, session, "Replay", f"No stored event {event_id}.", 404)
        report = await state.events.drain()
        event = await inbox_event(state.database, event_id)
        outcome = "unknown" if event is None else event.status
        log.info(
            "admin console: replayed event %s: %s (%d processed, %d failed again)",
            event_id,
            outcome,
            report.processed,
            report.failed,
            extra={"operator": session.operator, "event_id": event_id},
        )
        return _back(request, "/operations", "replayed", event_id, outcome)

    async def retry_usage(self, request: Request) -> Response:
        session, refusal = await self._checked(request)
        if refusal is not None or session is None:
            return refusal or Response(status_code=401)
        state = self.console.state(request)
        report_id = request.path_params["report_id"]
        queued = await retry_failed(state.database, now=self.console.now(request), report_id=report_id)
        if queued == 0:
            return _failed(request, session, "Retry", f"No failed usage aggregate {report_id}.", 404)
        report = await state.usage_reporter.drain(max_batches=1)
        sent = report.sent + report.already_recorded
        outcome = f"{sent} sent, {report.failed} failed, {report.retrying} to retry"
        log.info(
            "admin console: retried usage aggregate %s: %s",
            report_id,
            outcome,
            extra={"operator": session.operator, "report_id": report_id},
        )
        return _back(request, "/operations", "retried", report_id, outcome)

    async def replay_host_event(self, request: Request) -> Response:
        session, refusal = await self._checked(request)
        if refusal is not None or session is None:
            return refusal or Response(status_code=401)
        state = self.console.state(request)
        delivery = state.host_delivery
        ident = str(request.path_params["host_event_id"])
        if delivery is None:
            return _failed(request, session, "Replay", "HOST_WEBHOOK_URL is not set.", 409)
        chosen = await host_admin.replay(
            state.database, event=ident, url=delivery.config.url, now=self.console.now(request)
        )
        if not chosen:
            return _failed(request, session, "Replay", f"No host event {ident}.", 404)
        report = await delivery.drain(max_batches=1)
        outcome = f"{report.delivered} delivered, {report.retrying} to retry, {report.failed} failed"
        log.info(
            "admin console: replayed host event %s: %s",
            ident,
            outcome,
            extra={"operator": session.operator, "host_event_id": ident},
        )
        return _back(request, "/operations", "host-replayed", ident, outcome)

    def routes(self) -> list[Route]:
        return [
            Route(f"{ADMIN_PATH}/accounts/{{user_id:path}}/sync", self.sync, methods=["POST"]),
            Route(f"{ADMIN_PATH}/events/{{event_id:str}}/replay", self.replay_event, methods=["POST"]),
            Route(f"{ADMIN_PATH}/usage/{{report_id:str}}/retry", self.retry_usage, methods=["POST"]),
            Route(
                f"{ADMIN_PATH}/host-events/{{host_event_id:int}}/replay",
                self.replay_host_event,
                methods=["POST"],
            ),
        ]
