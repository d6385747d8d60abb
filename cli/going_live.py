"""`billing webhook-endpoint` and `billing doctor`: set up and check a Stripe account."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from billing.errors import ConfigurationError
from billing.settings import Settings
from billing.stripe_gateway import GatewayConfig, StripeGateway
from billing.webhook_endpoints import EndpointReport, ensure_webhook_endpoint, is_live_key
from billing.webhooks import WEBHOOK_PATH


def webhook_url(settings: Settings, url: str | None) -> str:
    if url is not None:
        return url.rstrip("/")
    if settings.public_base_url is None:
        raise ConfigurationError(
            "no webhook URL: set PUBLIC_BASE_URL to the service's public URL, or pass --url"
        )
    return f"{settings.public_base_url}{WEBHOOK_PATH}"


def live_key(settings: Settings) -> bool:
    key = settings.stripe_secret_key
    return is_live_key(key.get_secret_value() if key else None)


@click.command("webhook-endpoint")
@click.option("--url", default=None, help="The endpoint's URL (default: PUBLIC_BASE_URL + /webhooks/stripe).")
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
def webhook_endpoint(url: str | None, dry_run: bool) -> None:
    """Make Stripe send this service exactly the events it handles. Safe to run again."""
    from cli.main import _settings

    settings = _settings()
    if settings.sandbox_mode:
        raise ConfigurationError(
            "STRIPE_SECRET_KEY is not set: in sandbox mode the sandbox already delivers to the service "
            "itself (see docs/going-live.md to use a Stripe account)"
        )
    target = webhook_url(settings, url)

    async def run() -> EndpointReport:
        gateway = StripeGateway(GatewayConfig.from_settings(settings))
        try:
            return await ensure_webhook_endpoint(
                gateway=gateway,
                url=target,
                live=live_key(settings),
                dry_run=dry_run,
                progress=lambda line: click.echo(f"  {line}", err=True),
            )
        finally:
            await gateway.close()

    report = asyncio.run(run())
    for duplicate in report.duplicates:
        click.echo(
            f"note: {duplicate} also points at {target} with the same API version, so events arrive "
            f"twice (harmless, but delete it: `stripe webhook_endpoints delete {duplicate}`)"
        )
    for endpoint_id, elsewhere in report.elsewhere:
        click.echo(
            f"note: {endpoint_id}, also managed by this service, points at {elsewhere}; left alone "
            f"(if nothing serves that URL any more: `stripe webhook_endpoints delete {endpoint_id}`)"
        )
    if not report.changes:
        click.echo(
            f"Stripe already holds webhook endpoint {report.endpoint_id} for {target}: nothing to change."
        )
        return
    if dry_run:
        click.echo(f"{len(report.changes)} change(s) would be made (dry run: nothing changed).")
        _print_rotation(report, "<the new endpoint's secret>")
        return
    click.echo(f"{len(report.changes)} change(s) made.")
    if report.secret is None:
        return
    click.echo(f"created webhook endpoint {report.endpoint_id} for {target}")
    click.echo(f"signing secret (shown once, Stripe will not show it again): {report.secret}")
    if not report.old_endpoints:
        click.echo(
            f"next: set STRIPE_WEBHOOK_SECRET={report.secret} in the service's environment, restart "
            "every `billing serve`, then run `billing doctor`."
        )
    _print_rotation(report, report.secret)


def _print_rotation(report: EndpointReport, new_secret: str) -> None:
    if not report.old_endpoints:
        return
    old = ", ".join(report.old_endpoints)
    click.echo(
        f"{old} at {report.url} uses another API version, which Stripe cannot change; the new endpoint "
        "uses the SDK's. Until you finish these steps both exist and both deliver (the service "
        "applies each event once):"
    )
    click.echo(
        f"  1. set STRIPE_WEBHOOK_SECRET={new_secret},<the old endpoint's secret> (comma-separated: "
        "both are accepted) and restart every `billing serve`;"
    )
    click.echo(
        "  2. run `billing doctor` and check in the Dashboard that the new endpoint's deliveries succeed;"
    )
    for endpoint_id in report.old_endpoints:
        click.echo(
            f"  3. delete the old endpoint: `stripe webhook_endpoints delete {endpoint_id}` (Stripe CLI) "
            "or Dashboard > Developers > Webhooks;"
        )
    click.echo(f"  4. set STRIPE_WEBHOOK_SECRET={new_secret} alone and restart again.")


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, for scripts.")
def doctor(as_json: bool) -> None:
    """Check that this deployment is ready to take money: one line per check. Writes nothing."""
    from billing.clock import utcnow
    from billing.doctor import DoctorReport, run_checks, settings_check
    from billing.plans import PlansFileError, load_catalog
    from billing.settings import load_settings
    from db.engine import Database

    try:
        settings = load_settings()
        catalog = load_catalog(settings.billing_plans_file)
    except (ConfigurationError, PlansFileError) as exc:
        report = DoctorReport([settings_check(None, str(exc))])
    else:
        from cli.main import _settings

        _settings()  # logging, as the other commands set it up

        async def run() -> DoctorReport:
            database = Database.from_url(settings.database_url)
            gateway = StripeGateway(GatewayConfig.from_settings(settings))
            try:
                return await run_checks(
                    settings=settings, catalog=catalog, database=database, gateway=gateway, now=utcnow()
                )
            finally:
                await gateway.close()
                await database.dispose()

        report = asyncio.run(run())
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for check in report.checks:
            click.echo(check.line())
        failed = [check.name for check in report.checks if check.status == "fail"]
        click.echo(
            f"not ready: {len(failed)} check(s) failed ({', '.join(failed)})"
            if failed
            else "ready: every check passed" + (" (with warnings)" if report.warnings else "")
        )
    if not report.ok:
        sys.exit(1)
