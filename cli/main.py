"""The `billing` command line."""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import DBAPIError

from billing.catalog import sync_catalog
from billing.clock import utcnow
from billing.errors import BillingError, ConfigurationError
from billing.host_events import admin as host_admin
from billing.host_events.config import delivery_config, host_event_config
from billing.host_events.delivery import DeliveryReport, HostEventDelivery
from billing.logs import configure_logging, logging_config
from billing.notifier import LogNotifier
from billing.plans import PlansFileError, load_catalog
from billing.reconcile import ReconcileReport, customer_ids, reconcile
from billing.settings import Settings, load_settings
from billing.stripe_gateway import GatewayConfig, StripeGateway
from billing.webhooks import BatchReport, EventProcessor, requeue
from db import migrate as migrations
from db.engine import Database, DatabaseURLError, create_engine, safe_url
from db.health import DatabaseNotReady, ensure_ready

EXPECTED_FAILURES = (ConfigurationError, DatabaseNotReady, DatabaseURLError, PlansFileError)


class BillingGroup(click.Group):
    """Turns expected failures into one line on stderr and exit status 1, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EXPECTED_FAILURES as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except BillingError as exc:
            click.echo(f"error: {exc.message} ({exc.code.value}){_sandbox_hint(exc)}", err=True)
            ctx.exit(1)


def _sandbox_hint(exc: BillingError) -> str:
    if exc.code.value != "BILLING_PROVIDER_UNAVAILABLE" or not load_settings().sandbox_mode:
        return ""
    return "; in sandbox mode the Stripe sandbox lives inside the service: is `billing serve` running?"


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(as_json=settings.logs_as_json, level=settings.log_level)
    return settings


async def _check_database(url: str) -> None:
    engine = create_engine(url)
    try:
        await ensure_ready(engine)
    finally:
        await engine.dispose()


@click.group(cls=BillingGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """GraphQL billing API between a SaaS frontend and Stripe."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--reload", is_flag=True, help="Restart on code changes (development).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--forwarded-allow-ips",
    envvar="FORWARDED_ALLOW_IPS",
    default="127.0.0.1",
    show_default=True,
    help="Proxies trusted for X-Forwarded-For/-Proto: comma-separated addresses or networks, or *.",
)
def serve(host: str, port: int, reload: bool, workers: int, forwarded_allow_ips: str) -> None:
    """Run the service (GraphQL at /graphql)."""
    import uvicorn

    settings = _settings()
    asyncio.run(_check_database(settings.database_url))
    if settings.public_base_url is None:
        # Worker processes read their settings from the environment: tell them where we listen.
        shown_host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host
        os.environ["PUBLIC_BASE_URL"] = f"http://{shown_host}:{port}"
    start = "" if settings.is_production else "; start at / (GraphiQL, API docs, sandbox)"
    serving = f"serving on http://{host}:{port} (GraphQL at /graphql{start})"
    if settings.logs_as_json:  # every line on stderr is then one JSON object
        logging.getLogger("billing.cli").info(serving)
    else:
        click.echo(serving, err=True)
    with _metrics_directory(workers if not reload else 1):
        uvicorn.run(
            "graph.app:create_app",
            factory=True,
            host=host,
            port=port,
            reload=reload,
            workers=None if reload else workers,
            log_level=settings.log_level.lower(),
            log_config=logging_config(as_json=settings.logs_as_json, level=settings.log_level),
            proxy_headers=True,
            forwarded_allow_ips=forwarded_allow_ips,
        )


@contextmanager
def _metrics_directory(workers: int) -> Iterator[None]:
    """Several workers: prometheus-client's multiprocess mode, in a directory emptied now (the
    workers inherit it through PROMETHEUS_MULTIPROC_DIR) and removed afterwards unless it was
    given. One process keeps the ordinary registry (and its process metrics)."""
    from graph.metrics import MULTIPROC_ENV, prepare_multiprocess_dir

    if workers <= 1:
        os.environ.pop(MULTIPROC_ENV, None)
        yield
        return
    given = os.environ.get(MULTIPROC_ENV)
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="billing-metrics-"))
    prepare_multiprocess_dir(path)
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(path, ignore_errors=True)


@main.command()
def migrate() -> None:
    """Apply the database migrations."""
    settings = _settings()
    logging.getLogger("alembic.runtime.migration").setLevel(logging.INFO)
    try:
        migrations.upgrade(settings.database_url)
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise DatabaseNotReady(
            f"cannot migrate {safe_url(settings.database_url)}: {reason}; check DATABASE_URL"
        ) from None
    except OSError as exc:
        raise DatabaseNotReady(
            f"cannot reach {safe_url(settings.database_url)}: {exc}; check DATABASE_URL"
        ) from None
    click.echo(f"database migrated to {migrations.head_revision()}", err=True)


@main.group()
def catalog() -> None:
    """The plan catalog in Stripe (products, prices, meters, portal)."""


@catalog.command("sync")
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
def catalog_sync(dry_run: bool) -> None:
    """Make Stripe match the plans file. Safe to run again."""
    settings = _settings()
    plans = load_catalog(settings.billing_plans_file)

    async def run() -> list[str]:
        gateway = StripeGateway(GatewayConfig.from_settings(settings))
        try:
            report = await sync_catalog(
                catalog=plans,
                gateway=gateway,
                return_url=f"{settings.app_url}/billing",
                dry_run=dry_run,
                progress=lambda line: click.echo(f"  {line}", err=True),
            )
        finally:
            await gateway.close()
        return report.changes

    changes = asyncio.run(run())
    if not changes:
        click.echo("Stripe already matches the plans file: nothing to change.")
    elif dry_run:
        click.echo(f"{len(changes)} change(s) would be made (dry run: nothing changed).")
    else:
        click.echo(f"{len(changes)} change(s) made.")


@main.command()
@click.option("--dry-run", is_flag=True, help="Report the drift; change nothing.")
def sync(dry_run: bool) -> None:
    """Reconcile every Stripe customer and subscription into the database."""
    settings = _settings()

    async def run() -> ReconcileReport:
        database = Database.from_url(settings.database_url)
        gateway = StripeGateway(GatewayConfig.from_settings(settings))
        try:
            await ensure_ready(database.engine)
            ids = await customer_ids(database=database, gateway=gateway)
            with click.progressbar(length=len(ids), label="syncing customers", file=sys.stderr) as bar:
                return await reconcile(
                    database=database,
                    gateway=gateway,
                    notifier=LogNotifier(),
                    customers=ids,
                    now=utcnow(),
                    dry_run=dry_run,
                    on_customer=lambda _id: bar.update(1),
                    host_events=host_event_config(settings),
                )
        finally:
            await gateway.close()
            await database.dispose()

    report = asyncio.run(run())
    _print_reconcile(report)


def _print_reconcile(report: ReconcileReport) -> None:
    verb = "would fix" if report.dry_run else "fixed"
    for result in report.drifted:
        new = " [new account]" if result.created_account else ""
        click.echo(f"drift: user {result.user_id or '?'} (customer {result.customer_id}){new}")
        for name, (before, after) in sorted(result.changes.items()):
            click.echo(f"    {name}: {before!r} -> {after!r}")
    for result in report.unknown:
        click.echo(f"unknown: customer {result.customer_id} names no user (metadata.userId); left alone")
    for result in report.multiple_live:
        assert result.state is not None
        live = ", ".join(result.state.live_subscription_ids)
        click.echo(
            f"warning: customer {result.customer_id} has several live subscriptions ({live}); "
            "the account follows the highest tier"
        )
    for result in report.conflicts:
        click.echo(f"conflict: {result.conflict}")
    click.echo(
        f"{len(report.results)} customer(s) checked, {len(report.drifted)} drifted ({verb}), "
        f"{len(report.unknown)} unknown, {len(report.multiple_live)} with several live subscriptions."
    )


@main.group()
def events() -> None:
    """The Stripe event inbox."""


@events.command("replay")
@click.argument("event_id", required=False)
@click.option("--failed", is_flag=True, help="Replay every event that failed for good.")
def events_replay(event_id: str | None, failed: bool) -> None:
    """Process stored events again: one by id, or every failed one."""
    if (event_id is None) == (not failed):
        raise click.UsageError("give either EVENT_ID or --failed")
    settings = _settings()

    async def run() -> tuple[int, BatchReport]:
        database = Database.from_url(settings.database_url)
        gateway = StripeGateway(GatewayConfig.from_settings(settings))
        try:
            await ensure_ready(database.engine)
            queued = await requeue(database, event_id=event_id, failed=failed, now=utcnow())
            processor = EventProcessor(
                database=database,
                gateway=gateway,
                notifier=LogNotifier(),
                host_events=host_event_config(settings),
            )
            return queued, await processor.drain()
        finally:
            await gateway.close()
            await database.dispose()

    queued, report = asyncio.run(run())
    if event_id is not None and queued == 0:
        raise click.ClickException(f"no stored event {event_id}")
    click.echo(
        f"{queued} event(s) replayed: {report.processed} processed, {report.ignored} ignored, "
        f"{report.failed} failed again"
    )
    if report.failed:
        sys.exit(1)


@main.group("host-events")
def host_events() -> None:
    """Events for the host app's backend (HOST_WEBHOOK_URL): the outbox and its deliveries."""


@host_events.command("list")
@click.option("--failed", is_flag=True, help="Only the events that failed for good.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--dry-run", is_flag=True, help="Accepted for symmetry: listing never changes anything.")
def host_events_list(failed: bool, limit: int, dry_run: bool) -> None:
    """The newest host events (or the failed ones), newest first, and the endpoint's state."""
    settings = _settings()

    async def run() -> tuple[list[host_admin.HostEventRow], host_admin.EndpointState | None]:
        database = Database.from_url(settings.database_url)
        try:
            await ensure_ready(database.engine)
            rows = await host_admin.list_events(database, failed=failed, limit=limit)
            url = settings.host_webhook_url
            return rows, None if url is None else await host_admin.endpoint_state(database, url)
        finally:
            await database.dispose()

    rows, endpoint = asyncio.run(run())
    if endpoint is None:
        click.echo("HOST_WEBHOOK_URL is not set: no host events are written.", err=True)
    elif endpoint.disabled_at is not None:
        click.echo(
            f"endpoint {endpoint.url} DISABLED since {endpoint.disabled_at.isoformat()} "
            f"({endpoint.disabled_reason}); `billing host-events replay` enables it again",
            err=True,
        )
    else:
        click.echo(f"endpoint {endpoint.url} enabled", err=True)
    for row in rows:
        code = row.last_status_code if row.last_status_code is not None else "-"
        error = f"  {row.last_error}" if row.last_error and row.status != "delivered" else ""
        click.echo(
            f"{row.id}\t{row.message_id}\t{row.type}\t{row.status}\tattempts={row.attempts}\t"
            f"last={code}\tuser={row.user_id or '-'}\t{row.created_at.isoformat()}{error}"
        )
    click.echo(f"{len(rows)} event(s)", err=True)


@host_events.command("replay")
@click.argument("event", required=False)
@click.option("--failed", is_flag=True, help="Replay every event that failed for good.")
@click.option("--dry-run", is_flag=True, help="List what would be replayed; change and send nothing.")
def host_events_replay(event: str | None, failed: bool, dry_run: bool) -> None:
    """Send host events again now: one by id or webhook-id, or every failed one.

    Enables the endpoint again if a 410 Gone disabled it. The same webhook-id is sent, so a
    receiver that saw an event before recognises it."""
    if (event is None) == (not failed):
        raise click.UsageError("give either EVENT (an id or a msg_ webhook-id) or --failed")
    settings = _settings()
    config = delivery_config(settings)
    if config is None:
        raise click.ClickException("HOST_WEBHOOK_URL is not set: there is nowhere to send events")

    async def run() -> tuple[list[host_admin.HostEventRow], DeliveryReport | None]:
        database = Database.from_url(settings.database_url)
        try:
            await ensure_ready(database.engine)
            chosen = await host_admin.replay(
                database, event=event, failed=failed, url=config.url, now=utcnow(), dry_run=dry_run
            )
            if dry_run or not chosen:
                return chosen, None
            worker = HostEventDelivery(database=database, config=config)
            try:
                return chosen, await worker.drain()
            finally:
                await worker.close()
        finally:
            await database.dispose()

    chosen, report = asyncio.run(run())
    if event is not None and not chosen:
        raise click.ClickException(f"no host event {event}")
    for row in chosen:
        click.echo(f"{row.id}\t{row.message_id}\t{row.type}\t{row.status}", err=True)
    if report is None:
        verb = "would be replayed (dry run: nothing changed or sent)" if dry_run else "replayed"
        click.echo(f"{len(chosen)} event(s) {verb}.")
        return
    click.echo(
        f"{len(chosen)} event(s) replayed: {report.delivered} delivered, {report.retrying} to retry, "
        f"{report.failed} failed again"
        + (" (the endpoint answered 410 Gone: disabled)" if report.disabled else "")
    )
    if report.retrying or report.failed or report.disabled:
        sys.exit(1)


@main.group()
def usage() -> None:
    """Usage metering: reporting usage to Stripe's meters."""


@usage.command("report")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--retry-failed", is_flag=True, help="Queue aggregates that failed for good again first.")
def usage_report(batch_size: int, retry_failed: bool) -> None:
    """Report unreported usage to Stripe (safe next to the service and other runs; for cron)."""
    from billing.usage.reporting import ReportPass, UsageReporter, flagged_reports, unreported_count
    from billing.usage.reporting import retry_failed as requeue_failed

    settings = _settings()
    for noisy in ("httpx", "stripe"):  # one line per request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    plans = load_catalog(settings.billing_plans_file)

    def show(batch: ReportPass) -> None:
        click.echo(
            f"  {batch.records} record(s) aggregated into {batch.aggregates} meter event(s); "
            f"{batch.sent} sent, {batch.already_recorded} already recorded, {batch.retrying} to retry, "
            f"{batch.failed} failed, {batch.expired} expired",
            err=True,
        )

    async def run() -> tuple[int, ReportPass, int, list[Any]]:
        database = Database.from_url(settings.database_url)
        gateway = StripeGateway(GatewayConfig.from_settings(settings))
        try:
            await ensure_ready(database.engine)
            requeued = await requeue_failed(database, now=utcnow()) if retry_failed else 0
            reporter = UsageReporter(database=database, gateway=gateway, catalog=plans, batch_size=batch_size)
            report = await reporter.drain(progress=show)
            return (
                requeued,
                report,
                await unreported_count(database),
                await flagged_reports(database, now=utcnow()),
            )
        finally:
            await gateway.close()
            await database.dispose()

    click.echo("reporting usage to Stripe", err=True)
    requeued, report, left, flagged = asyncio.run(run())
    if retry_failed:
        click.echo(f"{requeued} failed aggregate(s) queued again")
    click.echo(
        f"{report.records} record(s) aggregated into {report.aggregates} meter event(s); "
        f"{report.sent} sent, {report.already_recorded} already recorded by Stripe, "
        f"{report.failed} failed, {report.expired} expired; {left} still to report"
    )
    if report.unavailable:
        click.echo("warning: Stripe was unavailable; the rest is retried with backoff (run again later)")
    for item in flagged:
        state = "at risk (close to Stripe's 35-day limit)" if item.at_risk else item.status
        click.echo(
            f"attention: {item.id} user {item.user_id} {item.feature} {item.minute.isoformat()} "
            f"quantity {item.quantity}: {state} after {item.attempts} attempt(s)"
            + (f" ({item.last_error})" if item.last_error else "")
        )
    if report.unavailable or report.failed or report.expired:
        sys.exit(1)


@main.command("schema")
@click.option("--check", is_flag=True, help="Exit 1 when the SDL file differs from the code.")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("schema.graphql"),
    show_default=True,
    help="The SDL file --check compares with the code.",
)
def schema_command(check: bool, path: Path) -> None:
    """Print the GraphQL schema (SDL); --check compares schema.graphql with the code."""
    from graph.schema import print_sdl, schema

    sdl = print_sdl(schema)
    if not check:
        click.echo(sdl, nl=False)
        return
    try:
        committed = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {path} ({exc.strerror}): run `billing schema > {path}`"
        ) from None
    if committed == sdl:
        click.echo(f"{path} matches the code")
        return
    click.echo(f"error: {path} differs from the code's schema: run `billing schema > {path}`", err=True)
    diff = difflib.unified_diff(
        committed.splitlines(), sdl.splitlines(), f"{path} (file)", "code", n=1, lineterm=""
    )
    for line in list(diff)[:80]:
        click.echo(f"  {line}", err=True)
    sys.exit(1)


@main.command()
@click.argument("user_id")
@click.option("--email", default=None, help="The `email` claim.")
@click.option("--name", default=None, help="The `name` claim.")
@click.option(
    "--ttl", default=3600, show_default=True, type=click.IntRange(1, 31 * 86400), help="Lifetime in seconds."
)
def token(user_id: str, email: str | None, name: str | None, ttl: int) -> None:
    """Print a development user token (HS256 with AUTH_JWT_SECRET). Refused in production."""
    from graph.auth import issue_dev_token

    settings = load_settings()
    click.echo(issue_dev_token(settings, user_id, email=email, name=name, ttl=timedelta(seconds=ttl)))


@main.command("trigger")
@click.argument("event_type", metavar="EVENT_TYPE")
@click.option(
    "--user", "user_id", default=None, help="The user (metadata.userId); default: a new trigger_<random>."
)
@click.pass_context
def trigger_command(ctx: click.Context, event_type: str, user_id: str | None) -> None:
    """Make a Stripe event happen in the running service's sandbox (the offline `stripe trigger`)."""
    from cli.trigger import SUPPORTED, TriggerError, ensure_sandbox, new_user_id, trigger

    if event_type not in SUPPORTED:
        raise click.BadParameter(
            f"{event_type!r} is not supported; supported event types: {', '.join(SUPPORTED)}",
            param_hint="EVENT_TYPE",
        )
    settings = _settings()
    for noisy in ("httpx", "stripe"):  # one line per request at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ensure_sandbox(settings)
    try:
        asyncio.run(trigger(settings, event_type, user_id or new_user_id(), click.echo))
    except TriggerError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(1)


from cli.going_live import doctor, webhook_endpoint  # noqa: E402 - they use this module's helpers

main.add_command(webhook_endpoint)
main.add_command(doctor)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
