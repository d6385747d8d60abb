"""`billing doctor`: is this deployment ready to take money, and if not, what to do about it.

Every check only reads: the database through plain selects, Stripe through list and retrieve
calls and the catalog sync's own dry run. A check that cannot run because an earlier one failed
(no database, a refused key) is left out; the failed one says what to fix first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, select

from billing.catalog import MANAGED as CATALOG_MANAGED
from billing.catalog import sync_catalog
from billing.errors import BillingError, ErrorCode
from billing.plans import Catalog
from billing.settings import Settings
from billing.stripe_gateway import StripeGateway, api_version
from billing.usage.reporting import flagged_reports
from billing.webhook_endpoints import (
    event_differences,
    for_url,
    is_live_key,
    list_endpoints,
    url_problem,
    wanted_endpoint,
)
from billing.webhooks import WEBHOOK_PATH
from db.engine import Database
from db.enums import EventStatus
from db.health import DatabaseNotReady, ensure_ready
from db.models import event_table

Status = Literal["ok", "warn", "fail"]
STALE_PENDING = timedelta(minutes=15)  # an inbox row older than this: is a worker running?
PAGE = 100


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self) -> str:
        fix = f" -> fix: {self.fix}" if self.fix else ""
        return f"{self.status:<4} {self.name}: {self.detail}{fix}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    @property
    def warnings(self) -> int:
        return sum(check.status == "warn" for check in self.checks)

    def get(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [check.as_dict() for check in self.checks]}


def settings_check(settings: Settings | None, problem: str | None = None) -> Check:
    if settings is None:
        return Check("settings", "fail", problem or "the settings do not load", "correct the named settings")
    if settings.is_production:
        return Check("settings", "ok", "ENVIRONMENT=production and its safety checks pass")
    return Check(
        "settings",
        "warn",
        "ENVIRONMENT=development: development defaults are accepted",
        "set ENVIRONMENT=production where the service takes money (it refuses unsafe values)",
    )


async def run_checks(
    *,
    settings: Settings,
    catalog: Catalog,
    database: Database,
    gateway: StripeGateway,
    now: datetime,
) -> DoctorReport:
    report = DoctorReport([settings_check(settings)])
    add = report.checks.append
    database_ok = await _database(database, add)
    url = f"{settings.public_base_url}{WEBHOOK_PATH}" if settings.public_base_url else None
    add(_public_url(settings, url))
    if await _stripe_key(settings, gateway, add):
        add(Check("api-version", "ok", f"the SDK pins Stripe API version {api_version()}"))
        await _webhook_endpoint(settings, gateway, url, add)
        add(_webhook_secret(settings))
        await _catalog(settings, catalog, gateway, add)
        await _portal(gateway, add)
        await _meters(catalog, gateway, add)
    if database_ok:
        await _inbox(database, now, add)
        await _usage(database, now, add)
    return report


Add = Callable[[Check], None]  # the report's `checks.append`


async def _database(database: Database, add: Add) -> bool:
    try:
        await ensure_ready(database.engine)
    except DatabaseNotReady as exc:
        message = str(exc)
        fix = "run `billing migrate`" if "billing migrate" in message else "check DATABASE_URL"
        add(Check("database", "fail", message.split("; ")[0], fix))
        return False
    add(Check("database", "ok", "reachable and at the head migration"))
    return True


def _public_url(settings: Settings, url: str | None) -> Check:
    if url is None:
        if settings.sandbox_mode:
            return Check("public-url", "ok", "sandbox mode: the sandbox delivers to the service itself")
        return Check(
            "public-url",
            "fail",
            "PUBLIC_BASE_URL is not set",
            "set PUBLIC_BASE_URL to the service's public URL",
        )
    live = is_live_key(_key(settings))
    problem = url_problem(url, live=live)
    if problem is not None:
        return Check(
            "public-url",
            "fail",
            f"with a live key, {problem}",
            "set PUBLIC_BASE_URL to the service's public https URL",
        )
    return Check("public-url", "ok", f"Stripe posts to {url}")


def _key(settings: Settings) -> str | None:
    return settings.stripe_secret_key.get_secret_value() if settings.stripe_secret_key else None


async def _stripe_key(settings: Settings, gateway: StripeGateway, add: Add) -> bool:
    """The key works (one read), and which mode it is in."""
    try:
        await list_endpoints(gateway)
    except BillingError as exc:
        if exc.code is ErrorCode.BILLING_PROVIDER_UNAVAILABLE:
            detail, fix = "Stripe did not answer", "check the network (and STRIPE_API_BASE), then run again"
            if settings.sandbox_mode:
                fix = "in sandbox mode the sandbox lives in the service: start `billing serve`"
        else:
            status = exc.extensions.get("http_status")
            detail = f"Stripe refused STRIPE_SECRET_KEY (HTTP {status})"
            fix = (
                "set STRIPE_SECRET_KEY to a secret key (sk_...) with write access, from Dashboard > API keys"
            )
        add(Check("stripe-key", "fail", detail, fix))
        return False
    key = _key(settings)
    if key is None:
        add(
            Check(
                "stripe-key",
                "warn",
                "no STRIPE_SECRET_KEY: the built-in sandbox, which takes no money",
                "set STRIPE_SECRET_KEY (docs/going-live.md)",
            )
        )
    elif is_live_key(key) and not settings.is_production:
        add(
            Check(
                "stripe-key",
                "warn",
                "a live key with ENVIRONMENT=development",
                "use a test key (sk_test_...) outside production, or set ENVIRONMENT=production",
            )
        )
    else:
        add(Check("stripe-key", "ok", f"valid, {'live' if is_live_key(key) else 'test'} mode"))
    return True


async def _webhook_endpoint(settings: Settings, gateway: StripeGateway, url: str | None, add: Add) -> None:
    name, fix = "webhook-endpoint", "run `billing webhook-endpoint`"
    endpoints = await list_endpoints(gateway)
    if url is None:
        if settings.sandbox_mode and not endpoints:
            add(Check(name, "ok", "sandbox mode: events go to the service itself"))
        else:
            add(
                Check(
                    name,
                    "fail",
                    "no webhook URL to check (PUBLIC_BASE_URL is not set)",
                    "set PUBLIC_BASE_URL",
                )
            )
        return
    wanted = wanted_endpoint(url=url)
    found = for_url(endpoints, url)
    if not found:
        if settings.sandbox_mode and not endpoints:
            add(Check(name, "ok", "sandbox mode: events go to the service itself"))
        else:
            add(Check(name, "fail", f"no webhook endpoint for {url}", fix))
        return
    endpoint = found[0]
    problems: list[str] = []
    if endpoint.status != "enabled":
        problems.append(f"{endpoint.id} is {endpoint.status}")
    if endpoint.api_version != wanted.api_version:
        problems.append(
            f"{endpoint.id} uses API version {endpoint.api_version or 'the account default'}, "
            f"not {wanted.api_version} (run `billing webhook-endpoint` and follow its rotation steps)"
        )
    missing, extra = event_differences(endpoint, wanted)
    if missing:
        problems.append(f"{endpoint.id} is not sent {', '.join(missing)}")
    if problems:
        add(Check(name, "fail", "; ".join(problems), fix))
    elif extra:
        add(
            Check(
                name, "warn", f"{endpoint.id} is also sent {', '.join(extra)}, which the service ignores", fix
            )
        )
    elif older := [e.id for e in found[1:] if e.api_version != wanted.api_version]:
        add(
            Check(
                name,
                "warn",
                f"{endpoint.id} is ready; {', '.join(older)} at another API version still delivers",
                "finish the rotation `billing webhook-endpoint` printed: delete "
                + ", ".join(f"`stripe webhook_endpoints delete {old}`" for old in older),
            )
        )
    else:
        add(Check(name, "ok", f"{endpoint.id} is enabled, at {wanted.api_version}, with every needed event"))


def _webhook_secret(settings: Settings) -> Check:
    if settings.sandbox_mode:
        return Check("webhook-secret", "ok", "sandbox mode: the sandbox signs with the configured secret")
    if settings.stripe_webhook_secret is None:
        return Check(
            "webhook-secret",
            "fail",
            "STRIPE_WEBHOOK_SECRET is not set: every delivery would be refused",
            "set it to the endpoint's signing secret (`billing webhook-endpoint` prints it on creation)",
        )
    count = len(settings.webhook_secrets)
    return Check(
        "webhook-secret", "ok", f"{count} signing secret(s) configured (not verifiable against Stripe)"
    )


async def _catalog(settings: Settings, catalog: Catalog, gateway: StripeGateway, add: Add) -> None:
    diff = await sync_catalog(
        catalog=catalog, gateway=gateway, return_url=f"{settings.app_url}/billing", dry_run=True
    )
    if diff.changes:
        add(
            Check(
                "catalog",
                "fail",
                "Stripe differs from the plans file: " + "; ".join(diff.changes),
                "run `billing catalog sync`",
            )
        )
    else:
        add(Check("catalog", "ok", "Stripe matches the plans file"))


async def _portal(gateway: StripeGateway, add: Add) -> None:
    page = await gateway.call(
        lambda o: gateway.v1.billing_portal.configurations.list_async({"active": True, "limit": PAGE}, o),
        what="list portal configurations",
    )
    ours = [
        c
        async for c in page.auto_paging_iter()
        if all(_metadata(c).get(key) == value for key, value in CATALOG_MANAGED.items())
    ]
    if not ours:
        add(
            Check(
                "portal",
                "fail",
                "no active customer portal configuration of this service",
                "run `billing catalog sync`",
            )
        )
        return
    update = ours[0].features.subscription_update
    if update is not None and update.enabled:
        add(
            Check(
                "portal",
                "fail",
                f"{ours[0].id} lets customers switch plans across tiers (the portal cannot keep tiers apart)",
                "run `billing catalog sync` (plan changes go through the changePlan mutation)",
            )
        )
        return
    add(Check("portal", "ok", f"{ours[0].id} is active; plan switching is off"))


async def _meters(catalog: Catalog, gateway: StripeGateway, add: Add) -> None:
    if not catalog.meters:
        add(Check("meters", "ok", "the plans file has no metered features"))
        return
    page = await gateway.call(
        lambda o: gateway.v1.billing.meters.list_async({"limit": PAGE}, o), what="list meters"
    )
    by_event: dict[str, Any] = {}
    async for meter in page.auto_paging_iter():
        if meter.status == "active" or meter.event_name not in by_event:
            by_event[meter.event_name] = meter
    problems, fixes = [], set()
    for wanted in catalog.meters.values():
        found = by_event.get(wanted.event_name)
        if found is None:
            problems.append(f"no meter for {wanted.event_name}")
            fixes.add("run `billing catalog sync`")
        elif found.status != "active":
            problems.append(f"meter {found.id} ({wanted.event_name}) is {found.status}")
            fixes.add(f"reactivate it: `stripe billing meters reactivate {found.id}` or in the Dashboard")
    if problems:
        add(Check("meters", "fail", "; ".join(problems), "; ".join(sorted(fixes))))
    else:
        add(Check("meters", "ok", f"{len(catalog.meters)} meter(s) active"))


async def _inbox(database: Database, now: datetime, add: Add) -> None:
    e = event_table.c
    open_statuses = [EventStatus.PENDING.value, EventStatus.PROCESSING.value]
    async with database.read() as conn:
        failed = int(await conn.scalar(select(func.count()).where(e.status == EventStatus.FAILED.value)) or 0)
        oldest = await conn.scalar(select(func.min(e.received_at)).where(e.status.in_(open_statuses)))
        last_error = await conn.scalar(
            select(e.last_error)
            .where(e.status == EventStatus.FAILED.value)
            .order_by(e.received_at.desc())
            .limit(1)
        )
    if failed:
        add(
            Check(
                "webhook-inbox",
                "fail",
                f"{failed} event(s) failed for good (latest error: {last_error or 'none recorded'})",
                "fix the cause, then `billing events replay --failed`",
            )
        )
        return
    age = now - oldest if oldest is not None else None
    if age is not None and age > STALE_PENDING:
        add(
            Check(
                "webhook-inbox",
                "warn",
                f"the oldest pending event waits for {_minutes(age)}",
                "check that a `billing serve` with WEBHOOK_WORKER on is running",
            )
        )
        return
    waiting = f"; the oldest pending event waits for {_minutes(age)}" if age is not None else ""
    add(Check("webhook-inbox", "ok", "no failed events" + waiting))


async def _usage(database: Database, now: datetime, add: Add) -> None:
    flagged = await flagged_reports(database, now=now)
    failed = [item for item in flagged if item.status == "failed"]
    expired = [item for item in flagged if item.status == "expired"]
    at_risk = [item for item in flagged if item.at_risk]
    if failed:
        add(
            Check(
                "usage-reporting",
                "fail",
                f"{len(failed)} aggregate(s) failed (e.g. {failed[0].id}: {failed[0].last_error})",
                "fix the cause, then `billing usage report --retry-failed`",
            )
        )
    elif expired or at_risk:
        parts = []
        if expired:
            parts.append(
                f"{len(expired)} aggregate(s) expired (past Stripe's 35-day window: bill them by hand)"
            )
        if at_risk:
            parts.append(f"{len(at_risk)} aggregate(s) close to Stripe's 35-day limit")
        add(
            Check(
                "usage-reporting", "warn", "; ".join(parts), "run `billing usage report` and read its output"
            )
        )
    else:
        add(Check("usage-reporting", "ok", "nothing failed, expired or at risk"))


def _metadata(obj: Any) -> dict[str, str]:
    metadata = getattr(obj, "metadata", None)
    return {} if metadata is None else dict(metadata.to_dict())


def _minutes(age: timedelta) -> str:
    minutes = int(age.total_seconds() // 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h"
