"""Organisations as billing owners: the token's active organisation decides whose plan the viewer
is on, and only its billing admins may pay or manage (issue 27). HTTP, real tokens, the sandbox
through the SDK, on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError

from billing.access import load_subscription
from billing.errors import ConfigurationError
from billing.reconcile import customer_ids, reconcile
from billing.settings import Settings, load_settings
from db.engine import Database
from db.migrate import upgrade_engine
from db.models import account_table, rate_limit_table
from graph.auth import Authenticator, User
from tests.billing_flows import control, eventually, setup_catalog
from tests.checkout_flows import CREATE, gql, settle, snapshot, subscribe_via_api
from tests.conftest import DbTarget, Service, running_service
from tests.gateways import open_sandbox_gateway
from tests.graphql_support import error_codes, hs256_token, insert_account
from tests.host_receiver import SECRET, run_host_receiver
from tests.live import Recorder

VIEWER = """{ viewer { id organizationId canManageBilling
  subscription { status tier effectiveTier hasAccess } } }"""
ACCESS = """query($f: String!) { access(feature: $f) { allowed effectiveTier } }"""
PORTAL = "mutation { createPortalSession { url } }"
CHANGE = """mutation { changePlan(tier: STARTER, interval: MONTHLY) { tier } }"""
PREVIEW = """mutation { previewPlanChange(tier: STARTER, interval: MONTHLY) { amountDue } }"""
CANCEL = "mutation { cancelSubscription { status } }"
RESUME = "mutation { resumeSubscription { status } }"
INVOICES = "{ viewer { invoices { id total } } }"


def clerk_token(user_id: str, org_id: str, role: str) -> str:
    """Clerk's current session token: the active organisation in `o` (`rol` without `org:`)."""
    return hs256_token(user_id, email=f"{user_id}@example.test", o={"id": org_id, "rol": role, "slg": "acme"})


def clerk_v1_token(user_id: str, org_id: str, role: str) -> str:
    """Clerk's previous session-token format: `org_id` and `org_role` (`org:admin`)."""
    return hs256_token(user_id, org_id=org_id, org_role=role)


def workos_token(user_id: str, org_id: str, role: str) -> str:
    return hs256_token(user_id, org_id=org_id, role=role)


async def viewer(service: Service, token: str) -> dict[str, Any]:
    result = await gql(service, VIEWER, token=token)
    assert "errors" not in result, result
    found: dict[str, Any] = result["data"]["viewer"]
    return found


async def stripe_state(service: Service, customer_id: str) -> tuple[Any, ...]:
    """What a refused member could have changed at Stripe: subscriptions and checkout sessions."""
    async with open_sandbox_gateway(service.url) as gateway:
        subs = await gateway.v1.subscriptions.list_async({"customer": customer_id, "status": "all"})
        sessions = await gateway.v1.checkout.sessions.list_async({"customer": customer_id, "limit": 100})
        return (
            [(s.id, s.status, s.cancel_at_period_end, s.items.data[0].price.id) for s in subs.data],
            sorted((s.id, s.status) for s in sessions.data),
        )


@pytest.fixture
async def catalog(service: Service) -> dict[str, str]:
    async with open_sandbox_gateway(service.url) as gateway:
        return await setup_catalog(gateway)


async def test_an_admin_checks_out_for_the_organisation_and_its_members_are_on_its_plan(
    service: Service, catalog: dict[str, str]
) -> None:
    admin = clerk_token("ada", "org_acme", "admin")
    member = clerk_v1_token("bob", "org_acme", "org:member")
    other_member = workos_token("cy", "org_acme", "member")
    assert (await viewer(service, admin))["canManageBilling"] is True

    _session, confirmed = await subscribe_via_api(service, admin, "PRO", "MONTHLY")
    assert (confirmed["tier"], confirmed["hasAccess"]) == ("PRO", True)
    await settle(service)

    async with service.database.read() as conn:
        rows = (
            await conn.execute(
                select(account_table.c.user_id, account_table.c.owner_kind, account_table.c.seats)
            )
        ).all()
        customer_id = (
            await conn.execute(
                select(account_table.c.stripe_customer_id).where(account_table.c.user_id == "org:org_acme")
            )
        ).scalar_one()
    # One account, the organisation's: nobody's personal account was made by paying for it.
    assert [tuple(row) for row in rows] == [("org:org_acme", "organization", 1)]
    async with open_sandbox_gateway(service.url) as gateway:
        customer = await gateway.v1.customers.retrieve_async(customer_id)
        assert customer.metadata.to_dict() == {"orgId": "org_acme"}

    for token, user_id in ((member, "bob"), (other_member, "cy"), (admin, "ada")):
        seen = await viewer(service, token)
        assert seen["id"] == user_id and seen["organizationId"] == "org_acme"
        assert seen["canManageBilling"] is (user_id == "ada")
        assert (seen["subscription"]["tier"], seen["subscription"]["effectiveTier"]) == ("PRO", "PRO")
        access = await gql(service, ACCESS, {"f": "advanced_analytics"}, token=token)
        assert access["data"]["access"] == {"allowed": True, "effectiveTier": "PRO"}
        invoices = await gql(service, INVOICES, token=token)
        assert len(invoices["data"]["viewer"]["invoices"]) == 1  # the organisation's first invoice

    # The same user without an active organisation is on their own plan: none.
    personal = await viewer(service, hs256_token("bob"))
    assert personal["organizationId"] is None and personal["canManageBilling"] is True
    assert (personal["subscription"]["status"], personal["subscription"]["tier"]) == ("NONE", "NONE")
    assert (await gql(service, INVOICES, token=hs256_token("bob")))["data"]["viewer"]["invoices"] == []


async def test_an_organisations_host_events_name_it(database: Database, sandbox_db: DbTarget) -> None:
    async with (
        run_host_receiver(SECRET) as receiver,
        running_service(
            database, sandbox_db, host_webhook_url=receiver.url, host_webhook_secret=SECRET
        ) as service,
    ):
        async with open_sandbox_gateway(service.url) as gateway:
            await setup_catalog(gateway)
        await subscribe_via_api(service, clerk_token("ada", "org_acme", "admin"), "PRO", "MONTHLY")
        await settle(service)

        async def created() -> dict[str, Any] | None:
            found = [d.event for d in receiver.delivered if d.event["type"] == "subscription.created"]
            return found[0]["data"] if found else None

        data = await eventually(created, what="the organisation's subscription.created host event")
    assert (data["userId"], data["orgId"], data["subscription"]["tier"]) == (
        "org:org_acme",
        "org_acme",
        "PRO",
    )


async def test_members_who_are_not_billing_admins_are_forbidden_and_change_nothing(
    service: Service, catalog: dict[str, str]
) -> None:
    admin = workos_token("ada", "org_acme", "admin")
    await subscribe_via_api(service, admin, "PRO", "MONTHLY")
    await settle(service)
    async with service.database.read() as conn:
        customer_id = (
            await conn.execute(
                select(account_table.c.stripe_customer_id).where(account_table.c.user_id == "org:org_acme")
            )
        ).scalar_one()
    tables = (account_table, rate_limit_table)
    before, stripe_before = await snapshot(service.database, tables), await stripe_state(service, customer_id)
    for member in (
        clerk_token("bob", "org_acme", "member"),
        clerk_v1_token("bob", "org_acme", "org:member"),
        workos_token("bob", "org_acme", "member"),
        clerk_token("bob", "org_acme", "org:admin"),  # the previous format's value at the current path
    ):
        for query, variables in (
            (CREATE, {"tier": "STARTER", "interval": "MONTHLY"}),
            (PORTAL, None),
            (PREVIEW, None),
            (CHANGE, None),
            (CANCEL, None),
            (RESUME, None),
        ):
            result = await gql(service, query, variables, token=member)
            assert error_codes(result) == ["FORBIDDEN"], (query, result)
    assert await snapshot(service.database, tables) == before
    assert await stripe_state(service, customer_id) == stripe_before

    # The admin may: the organisation's plan is theirs to change.
    changed = await gql(service, CANCEL, token=clerk_v1_token("ada", "org_acme", "org:admin"))
    assert "errors" not in changed, changed


async def test_billing_sync_maps_an_organisation_customer_by_its_org_id(
    database: Database, sandbox_db: DbTarget
) -> None:
    """Customers made outside the API (the dashboard), with no webhook applied: `billing sync`
    gives the one with `metadata.orgId` to the organisation, the `userId` one to the user."""
    async with (
        running_service(database, sandbox_db, webhook_worker=False) as service,
        open_sandbox_gateway(service.url) as gateway,
    ):
        prices = await setup_catalog(gateway)
        org = await gateway.v1.customers.create_async({"metadata": {"orgId": "org_b"}})
        person = await gateway.v1.customers.create_async({"metadata": {"userId": "dora"}})
        for customer in (org, person):
            session = await gateway.v1.checkout.sessions.create_async(
                {
                    "mode": "subscription",
                    "customer": customer.id,
                    "line_items": [{"price": prices["starter_monthly"], "quantity": 2}],
                    "success_url": "http://app.test/billing/success",
                }
            )
            await control(service, f"checkout/{session.id}/complete", {"outcome": "paid"})
        async with database.read() as conn:
            assert (await conn.execute(select(account_table))).first() is None  # no webhook applied
        report = await reconcile(
            database=database,
            gateway=gateway,
            notifier=Recorder(),
            customers=await customer_ids(database=database, gateway=gateway),
            now=datetime.now(UTC),
        )
        assert len(report.drifted) == 2
        async with database.read() as conn:
            rows = (
                await conn.execute(
                    select(
                        account_table.c.user_id,
                        account_table.c.owner_kind,
                        account_table.c.stripe_customer_id,
                        account_table.c.tier,
                        account_table.c.seats,
                    ).order_by(account_table.c.user_id)
                )
            ).all()
        assert [tuple(row) for row in rows] == [
            ("dora", "user", person.id, "starter", 2),
            ("org:org_b", "organization", org.id, "starter", 2),
        ]
        member = await viewer(service, clerk_token("eve", "org_b", "member"))
        assert member["subscription"]["tier"] == "STARTER"


async def test_a_user_id_with_the_organisation_prefix_is_refused(service: Service) -> None:
    result = await gql(service, VIEWER, token=hs256_token("org:org_acme"))
    assert error_codes(result) == ["UNAUTHENTICATED"]


async def test_the_migration_refuses_a_user_id_that_looks_like_an_organisation(
    blank_db: DbTarget,
) -> None:
    db = blank_db.database()
    try:
        await upgrade_engine(db.engine, "0010")
        await insert_account(db, "org:legacy")
        with pytest.raises(RuntimeError, match=r"1 billing_account row.*starting with 'org:'"):
            await upgrade_engine(db.engine)
        async with db.read() as conn:  # nothing changed: still 0010, the row as it was
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
            rows = (await conn.execute(select(account_table.c.user_id))).scalars().all()
        assert (version, rows) == ("0010", ["org:legacy"])
    finally:
        await db.dispose()


async def test_the_migration_makes_todays_accounts_user_owned_and_answers_as_before(
    blank_db: DbTarget,
) -> None:
    db = blank_db.database()
    try:
        await upgrade_engine(db.engine, "0010")
        await insert_account(db, "old1", cancel_at_period_end=True)
        await insert_account(db, "old2", status="none", tier="none", interval=None)
        await upgrade_engine(db.engine)
        states = [await load_subscription(db, user_id) for user_id in ("old1", "old2")]
        async with db.read() as conn:
            rows = (
                await conn.execute(
                    select(
                        account_table.c.user_id, account_table.c.owner_kind, account_table.c.seats
                    ).order_by(account_table.c.user_id)
                )
            ).all()
            with pytest.raises(IntegrityError):  # kind and key must agree
                async with db.write() as bad:
                    await bad.execute(update(account_table).values(owner_kind="organization"))
    finally:
        await db.dispose()
    assert [tuple(row) for row in rows] == [("old1", "user", None), ("old2", "user", None)]
    assert (states[0].status.value, states[0].tier.value, states[0].cancel_at_period_end) == (
        "active",
        "pro",
        True,
    )
    assert (states[1].status.value, states[1].tier.value) == ("none", "none")


async def test_the_active_organisation_and_admin_role_come_from_the_configured_claims() -> None:
    auth = Authenticator(Settings())

    async def who(**claims: Any) -> User:
        user = await auth.authenticate(f"Bearer {hs256_token('u', **claims)}")
        assert isinstance(user, User)
        return user

    cases = {
        "clerk v2 admin": ({"o": {"id": "org_1", "rol": "admin"}}, ("org_1", True)),
        "clerk v2 member": ({"o": {"id": "org_1", "rol": "member"}}, ("org_1", False)),
        "clerk v1 admin": ({"org_id": "org_1", "org_role": "org:admin"}, ("org_1", True)),
        "clerk v1 bare admin": ({"org_id": "org_1", "org_role": "admin"}, ("org_1", False)),
        "workos admin": ({"org_id": "org_1", "role": "admin"}, ("org_1", True)),
        "auth0 (no role by default)": ({"org_id": "org_1"}, ("org_1", False)),
        "a role without an organisation": ({"role": "admin", "o": {"rol": "admin"}}, (None, False)),
        "not a string": ({"org_id": 7, "role": "admin"}, (None, False)),
        "too long": ({"org_id": "o" * 252, "role": "admin"}, (None, False)),
        "control characters": ({"org_id": "org\n1", "role": "admin"}, (None, False)),
    }
    for case, (claims, expected) in cases.items():
        user = await who(**claims)
        assert (user.org_id, user.billing_admin) == expected, case
    assert (await who(o={"id": "org_1"})).owner_key == "org:org_1"
    assert (await who()).owner_key == "u"

    # Auth0: a role claim added by an Action, named by the configured path (top level or nested).
    for setting, claims in (
        ("billing_org_role=admin", {"billing_org_role": "admin"}),
        ("app.org_role=admin", {"app": {"org_role": "admin"}}),
    ):
        custom = Authenticator(Settings(auth_org_id_claims="org_id", billing_admin_roles=setting))
        token = hs256_token("u", org_id="org_2", **claims)
        assert isinstance(found := await custom.authenticate(f"Bearer {token}"), User)
        assert (found.org_id, found.billing_admin) == ("org_2", True), setting


def test_organisation_settings_are_validated() -> None:
    assert Settings().org_id_claims == ["o.id", "org_id"]
    assert Settings().admin_roles == [("o.rol", "admin"), ("org_role", "org:admin"), ("role", "admin")]
    for bad in (
        {"billing_admin_roles": "admin"},
        {"billing_admin_roles": "o.rol="},
        {"auth_org_id_claims": "o..id"},
    ):
        with pytest.raises(ConfigurationError):
            load_settings(**bad)
