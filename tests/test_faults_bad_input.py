"""Fault matrix, bad input: every argument that takes input refuses garbage with its exact code
and leaves the database as it was (every state table compared row by row, `tests/db_snapshot.py`).

Rows, and where each is tested:

| row | where |
|---|---|
| wrong enum values (`tier`, `interval`) on createCheckoutSession, previewPlanChange, changePlan, as literals and as variables | here: `test_a_wrong_argument_is_bad_user_input_and_changes_nothing` |
| wrong types: `atPeriodEnd`, `sessionId`, `first`, `feature`, `userId`, missing or null required arguments, unknown arguments (also on createPortalSession, resumeSubscription and plans, which take none) | here: the same test |
| quantities beyond GraphQL's 32-bit Int, fractional, as strings | here: the same test |
| negative, zero and too large (but 32-bit) quantities | `test_usage_recording.py::test_each_refusal_has_its_code_names_the_item_and_writes_nothing`; here for 2^31-1 |
| `first` below 1 / above 100 on `viewer.invoices` | `test_invoices.py::test_first_is_capped_at_100_and_below_1_is_bad_user_input` |
| tier NONE on checkout / plan change | `test_mutations_checkout.py::test_tier_none_is_an_invalid_plan_and_creates_nothing`, `test_mutations_plan_change.py::test_refusals_have_their_codes` |
| malformed Stripe session ids (empty, 10 KB, NUL, unicode, path tricks, SQL) | here: `test_a_malformed_session_id_is_bad_user_input_and_changes_nothing`; unknown and another user's: `test_mutations_checkout.py::test_confirming_another_users_session_is_refused_and_changes_nothing` |
| malformed user ids, keys, feature names in recordUsage / recordUsageBatch (10 KB, NUL, unicode) | here: `test_a_malformed_usage_item_is_refused_and_changes_nothing` |
| unicode idempotency keys and user ids that are valid | here: `test_unicode_ids_and_keys_round_trip` |
| malformed user ids in `userSubscription`, feature names in `access` and `viewer.usage` | here: `test_a_malformed_id_or_feature_in_a_query_is_bad_user_input` |
| malformed user ids in a token's `sub` | here: `test_a_token_whose_subject_is_not_a_user_id_is_unauthenticated` |
| a token's `email` / `name` with NUL, too long for the account row, or not a string: left out, checkout still works | here: `test_an_unusable_email_or_name_claim_is_left_out_of_checkout` |
| invalid feature names (unit) | `test_access.py::test_an_invalid_feature_name_is_bad_user_input` |
| webhook route: ids and types too long, NUL characters, times out of range, wrong types | here: `test_a_malformed_signed_event_is_400_and_nothing_is_stored` |
| webhook route: unicode and 10 KB strings inside a genuine event | here: `test_unicode_and_long_strings_in_an_event_are_stored_exactly` |
| webhook route: invalid JSON, not an object, no id, bad created; oversized body | `test_webhook_signature.py::test_a_valid_signature_over_an_invalid_event_is_400`, `::test_an_oversized_body_is_413` |

No Stripe is reachable from these tests (the API base is a closed loopback port): every refusal
here happens before the service would call Stripe.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from billing.stripe_gateway import StripeGateway
from db.engine import Database
from db.models import account_table, event_table
from tests.billing_flows import setup_catalog
from tests.conftest import DbTarget, Service, free_port, truncate_all
from tests.db_snapshot import snapshot, unchanged
from tests.graphql_support import SERVICE_KEY, Api, hs256_token, insert_account, serve_api
from tests.stripe_events import event, post_event

TEN_KB = "x" * 10_240
NUL = "a\x00b"
UNICODE = "Zoë-東京-🚀-\u202e"  # accents, CJK, an emoji and a right-to-left override

CHECKOUT = "mutation($tier: Tier!, $interval: BillingInterval!) { createCheckoutSession(tier: $tier, interval: $interval) { id } }"
PREVIEW = "mutation($tier: Tier!, $interval: BillingInterval!) { previewPlanChange(tier: $tier, interval: $interval) { amountDue } }"
CHANGE = "mutation($tier: Tier!, $interval: BillingInterval!) { changePlan(tier: $tier, interval: $interval) { tier } }"
CANCEL = "mutation($at: Boolean!) { cancelSubscription(atPeriodEnd: $at) { status } }"
CONFIRM = "mutation($id: ID!) { confirmCheckoutSession(sessionId: $id) { status } }"
RECORD = "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id userId idempotencyKey duplicate } }"
BATCH = "mutation($inputs: [RecordUsageInput!]!) { recordUsageBatch(inputs: $inputs) { id } }"
INVOICES = "query($first: Int) { viewer { invoices(first: $first) { id } } }"
USAGE = "query($feature: String!) { viewer { usage(feature: $feature) { used } } }"
ACCESS = "query($feature: String!) { access(feature: $feature) { allowed reason } }"
USER_SUBSCRIPTION = "query($userId: ID!) { userSubscription(userId: $userId) { status } }"

PLAN = {"tier": "PRO", "interval": "MONTHLY"}


def usage_item(**overrides: Any) -> dict[str, Any]:
    return {"userId": "member", "feature": "api_calls", "quantity": 1, "idempotencyKey": "k-1", **overrides}


# One served app per module and backend (tests only differ in what they send); every test
# marked `in_module_loop` starts from emptied tables.
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(migrated_db: DbTarget) -> AsyncIterator[tuple[Database, Api]]:
    """The app with a Stripe that cannot be reached: a refusal that called Stripe would show."""
    database = migrated_db.database()
    try:
        async with serve_api(
            database,
            service_api_key=SERVICE_KEY,
            stripe_api_base=f"http://127.0.0.1:{free_port()}",
            rate_limit_stripe_mutations="off",
            usage_reporter=False,
        ) as api:
            yield database, api
    finally:
        await database.dispose()


@pytest_asyncio.fixture(loop_scope="module")
async def db(served: tuple[Database, Api]) -> Database:
    await truncate_all(served[0])
    return served[0]


@pytest_asyncio.fixture(loop_scope="module")
async def api(served: tuple[Database, Api], db: Database) -> Api:
    return served[1]


@pytest_asyncio.fixture(loop_scope="module")
async def member(db: Database) -> str:
    """A subscriber with a Stripe customer, some usage and an event in the inbox: rows to keep."""
    await insert_account(db, "member", tier="pro")
    return hs256_token("member")


async def seed(api: Api, member: str) -> None:
    recorded = await api.query(RECORD, {"input": usage_item(idempotencyKey="earlier")}, token=SERVICE_KEY)
    assert "errors" not in recorded, recorded
    async with httpx.AsyncClient() as client:
        stored = await post_event(client, api.url, event("customer.updated", {"id": "cus_member"}))
    assert stored.status_code == 200


def the_error(result: dict[str, Any]) -> dict[str, Any]:
    errors = result.get("errors") or []
    assert len(errors) == 1, result
    assert result.get("data") is None, result
    error: dict[str, Any] = errors[0]
    return error


# Arguments of the wrong type or value: refused by validation, before any resolver --------------

USER = "user"
SERVICE = "service"
WRONG_ARGUMENTS: list[tuple[str, str, str, dict[str, Any] | None]] = [
    # (id, caller, document, variables)
    ("checkout-tier-unknown", USER, CHECKOUT, {**PLAN, "tier": "GOLD"}),
    ("checkout-tier-lowercase", USER, CHECKOUT, {**PLAN, "tier": "pro"}),
    ("checkout-tier-number", USER, CHECKOUT, {**PLAN, "tier": 2}),
    ("checkout-tier-null", USER, CHECKOUT, {**PLAN, "tier": None}),
    ("checkout-tier-missing", USER, CHECKOUT, {"interval": "MONTHLY"}),
    ("checkout-interval-unknown", USER, CHECKOUT, {**PLAN, "interval": "WEEKLY"}),
    ("checkout-interval-10kb", USER, CHECKOUT, {**PLAN, "interval": TEN_KB}),
    ("checkout-interval-nul", USER, CHECKOUT, {**PLAN, "interval": "MONTHLY\x00"}),
    ("checkout-tier-unicode", USER, CHECKOUT, {**PLAN, "tier": "PR\u041e"}),  # a Cyrillic O
    (
        "checkout-literal-enum",
        USER,
        "mutation { createCheckoutSession(tier: GOLD, interval: MONTHLY) { id } }",
        None,
    ),
    (
        "checkout-literal-string",
        USER,
        'mutation { createCheckoutSession(tier: "PRO", interval: MONTHLY) { id } }',
        None,
    ),
    (
        "checkout-unknown-argument",
        USER,
        "mutation { createCheckoutSession(tier: PRO, interval: MONTHLY, seats: 5) { id } }",
        None,
    ),
    ("preview-tier-unknown", USER, PREVIEW, {**PLAN, "tier": "ENTERPRISE"}),
    ("preview-interval-unknown", USER, PREVIEW, {**PLAN, "interval": "DAILY"}),
    ("change-tier-unknown", USER, CHANGE, {**PLAN, "tier": "GOLD"}),
    ("change-interval-list", USER, CHANGE, {**PLAN, "interval": ["MONTHLY"]}),
    ("change-literal-enum", USER, "mutation { changePlan(tier: PRO, interval: YEARLY) { tier } }", None),
    (
        "portal-unknown-argument",
        USER,
        'mutation { createPortalSession(returnUrl: "https://evil.test") { url } }',
        None,
    ),
    ("resume-unknown-argument", USER, "mutation { resumeSubscription(now: true) { status } }", None),
    ("plans-unknown-argument", USER, "{ plans(tier: PRO) { id } }", None),
    ("cancel-at-period-end-string", USER, CANCEL, {"at": "yes"}),
    ("cancel-at-period-end-number", USER, CANCEL, {"at": 1}),
    ("cancel-at-period-end-null", USER, CANCEL, {"at": None}),
    ("confirm-session-null", USER, CONFIRM, {"id": None}),
    ("confirm-session-object", USER, CONFIRM, {"id": {"id": "cs_1"}}),
    ("confirm-session-float", USER, CONFIRM, {"id": 1.5}),
    ("invoices-first-beyond-int32", USER, INVOICES, {"first": 2**31}),
    ("invoices-first-string", USER, INVOICES, {"first": "10"}),
    ("invoices-first-literal-beyond-int32", USER, "{ viewer { invoices(first: 99999999999) { id } } }", None),
    ("usage-feature-null", USER, USAGE, {"feature": None}),
    ("usage-feature-number", USER, USAGE, {"feature": 7}),
    ("access-feature-missing", USER, "{ access { allowed } }", None),
    ("user-subscription-id-null", SERVICE, USER_SUBSCRIPTION, {"userId": None}),
    ("user-subscription-id-list", SERVICE, USER_SUBSCRIPTION, {"userId": ["member"]}),
    ("record-quantity-beyond-int32", SERVICE, RECORD, {"input": usage_item(quantity=2**31)}),
    ("record-quantity-below-int32", SERVICE, RECORD, {"input": usage_item(quantity=-(2**31) - 1)}),
    ("record-quantity-huge", SERVICE, RECORD, {"input": usage_item(quantity=10**30)}),
    ("record-quantity-fraction", SERVICE, RECORD, {"input": usage_item(quantity=1.5)}),
    ("record-quantity-string", SERVICE, RECORD, {"input": usage_item(quantity="5")}),
    ("record-quantity-null", SERVICE, RECORD, {"input": usage_item(quantity=None)}),
    (
        "record-user-missing",
        SERVICE,
        RECORD,
        {"input": {"feature": "api_calls", "quantity": 1, "idempotencyKey": "k"}},
    ),
    ("record-unknown-field", SERVICE, RECORD, {"input": usage_item(price=0)}),
    ("record-recorded-at-words", SERVICE, RECORD, {"input": usage_item(recordedAt="yesterday")}),
    (
        "record-recorded-at-impossible",
        SERVICE,
        RECORD,
        {"input": usage_item(recordedAt="2026-13-45T25:61:00Z")},
    ),
    ("record-recorded-at-10kb", SERVICE, RECORD, {"input": usage_item(recordedAt=TEN_KB)}),
    (
        "record-literal-quantity-beyond-int32",
        SERVICE,
        'mutation { recordUsage(input: {userId: "member", feature: "api_calls", quantity: 4294967296, idempotencyKey: "k"}) { id } }',
        None,
    ),
    ("batch-null", SERVICE, BATCH, {"inputs": None}),
    ("batch-null-item", SERVICE, BATCH, {"inputs": [usage_item(), None]}),
    (
        "batch-one-item-beyond-int32",
        SERVICE,
        BATCH,
        {"inputs": [usage_item(), usage_item(idempotencyKey="k-2", quantity=2**40)]},
    ),
]


# GraphQL validation refuses these before any resolver or database work: one backend is enough.
@in_module_loop
@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    ("caller", "document", "variables"),
    [row[1:] for row in WRONG_ARGUMENTS],
    ids=[row[0] for row in WRONG_ARGUMENTS],
)
async def test_a_wrong_argument_is_bad_user_input_and_changes_nothing(
    db: Database, api: Api, member: str, caller: str, document: str, variables: dict[str, Any] | None
) -> None:
    await seed(api, member)
    async with unchanged(db):
        result = await api.query(document, variables, token=member if caller == USER else SERVICE_KEY)
    error = the_error(result)
    assert error["extensions"]["code"] == "BAD_USER_INPUT", error


# Values of the right type that are no valid id, key or name --------------------------------------

MALFORMED_SESSION_IDS = {
    "empty": "",
    "10kb": "cs_" + TEN_KB,
    "nul": "cs_test_a\x00b",
    "unicode": "cs_test_Zoë東京",
    "path-traversal": "cs_test_a/../../customers",
    "query-string": "cs_test_a?expand[]=customer",
    "sql": "cs_test_a'; DROP TABLE billing_account;--",
    "newline": "cs_test_a\nb",
    "number": 12345,
}


@in_module_loop
@pytest.mark.parametrize("session_id", MALFORMED_SESSION_IDS.values(), ids=MALFORMED_SESSION_IDS.keys())
async def test_a_malformed_session_id_is_bad_user_input_and_changes_nothing(
    db: Database, api: Api, member: str, session_id: str | int
) -> None:
    await seed(api, member)
    async with unchanged(db):
        result = await api.query(CONFIRM, {"id": session_id}, token=member)
    error = the_error(result)
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "sessionId"}
    assert error["message"] == "No checkout session of yours has this id."


MALFORMED_USAGE = [
    # (id, item overrides, code, field)
    ("user-id-10kb", {"userId": TEN_KB}, "BAD_USER_INPUT", "userId"),
    ("user-id-nul", {"userId": NUL}, "BAD_USER_INPUT", "userId"),
    ("user-id-empty", {"userId": ""}, "BAD_USER_INPUT", "userId"),
    ("user-id-unicode-unknown", {"userId": UNICODE}, "NO_BILLING_ACCOUNT", None),
    ("feature-10kb", {"feature": TEN_KB}, "BAD_USER_INPUT", "feature"),
    ("feature-nul", {"feature": "api_calls\x00"}, "BAD_USER_INPUT", "feature"),
    ("feature-unicode", {"feature": "api_cälls"}, "BAD_USER_INPUT", "feature"),
    ("feature-wrong-case", {"feature": "API_CALLS"}, "BAD_USER_INPUT", "feature"),
    ("key-10kb", {"idempotencyKey": TEN_KB}, "BAD_USER_INPUT", "idempotencyKey"),
    ("key-nul", {"idempotencyKey": NUL}, "BAD_USER_INPUT", "idempotencyKey"),
    ("key-blank", {"idempotencyKey": "   "}, "BAD_USER_INPUT", "idempotencyKey"),
    ("quantity-int32-max", {"quantity": 2**31 - 1}, "BAD_USER_INPUT", "quantity"),
    ("quantity-int32-min", {"quantity": -(2**31)}, "BAD_USER_INPUT", "quantity"),
    ("quantity-negative", {"quantity": -1}, "BAD_USER_INPUT", "quantity"),
    ("recorded-at-year-1", {"recordedAt": "0001-01-01T00:00:00+00:00"}, "BAD_USER_INPUT", "recordedAt"),
    ("recorded-at-year-9999", {"recordedAt": "9999-12-31T23:59:59+00:00"}, "BAD_USER_INPUT", "recordedAt"),
]


@in_module_loop
@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [row[1:] for row in MALFORMED_USAGE],
    ids=[row[0] for row in MALFORMED_USAGE],
)
async def test_a_malformed_usage_item_is_refused_and_changes_nothing(
    db: Database, api: Api, member: str, overrides: dict[str, Any], code: str, field: str | None
) -> None:
    await seed(api, member)
    bad = {**usage_item(idempotencyKey="bad"), **overrides}
    async with unchanged(db):
        single = await api.query(RECORD, {"input": bad}, token=SERVICE_KEY)
        batch = await api.query(
            BATCH, {"inputs": [usage_item(idempotencyKey="good"), bad]}, token=SERVICE_KEY
        )
    for result, index in ((single, 0), (batch, 1)):
        error = the_error(result)
        expected = {"code": code, "index": index, **({"field": field} if field else {})}
        assert {key: error["extensions"].get(key) for key in expected} == expected, error


@in_module_loop
async def test_unicode_ids_and_keys_round_trip(db: Database, api: Api) -> None:
    await insert_account(db, UNICODE, tier="pro", stripe_customer_id="cus_unicode")
    key = f"{UNICODE}-{'k' * 200}"  # a long key, still within 255 characters
    first = await api.query(
        RECORD, {"input": usage_item(userId=UNICODE, idempotencyKey=key)}, token=SERVICE_KEY
    )
    again = await api.query(
        RECORD, {"input": usage_item(userId=UNICODE, idempotencyKey=key)}, token=SERVICE_KEY
    )
    assert "errors" not in first and "errors" not in again, (first, again)
    assert first["data"]["recordUsage"]["userId"] == UNICODE
    assert first["data"]["recordUsage"]["idempotencyKey"] == key
    assert again["data"]["recordUsage"] == {**first["data"]["recordUsage"], "duplicate": True}
    viewer = await api.query(USAGE, {"feature": "api_calls"}, token=hs256_token(UNICODE))
    assert viewer["data"]["viewer"]["usage"]["used"] == 1
    served = await api.query(USER_SUBSCRIPTION, {"userId": UNICODE}, token=SERVICE_KEY)
    assert served["data"]["userSubscription"]["status"] == "ACTIVE"


QUERY_INPUTS = [
    # (id, caller, document, variables, field)
    ("user-subscription-nul", SERVICE, USER_SUBSCRIPTION, {"userId": NUL}, "userId"),
    ("user-subscription-10kb", SERVICE, USER_SUBSCRIPTION, {"userId": TEN_KB}, "userId"),
    ("user-subscription-empty", SERVICE, USER_SUBSCRIPTION, {"userId": ""}, "userId"),
    ("access-feature-10kb", USER, ACCESS, {"feature": TEN_KB}, "feature"),
    ("access-feature-nul", USER, ACCESS, {"feature": "api_calls\x00"}, "feature"),
    ("access-feature-unicode", USER, ACCESS, {"feature": UNICODE}, "feature"),
    ("access-feature-anonymous-nul", None, ACCESS, {"feature": "api_calls\x00"}, "feature"),
    ("usage-feature-10kb", USER, USAGE, {"feature": TEN_KB}, "feature"),
    ("usage-feature-nul", USER, USAGE, {"feature": "api_calls\x00"}, "feature"),
    ("usage-feature-unicode", USER, USAGE, {"feature": UNICODE}, "feature"),
]


@in_module_loop
@pytest.mark.parametrize(
    ("caller", "document", "variables", "field"),
    [row[1:] for row in QUERY_INPUTS],
    ids=[row[0] for row in QUERY_INPUTS],
)
async def test_a_malformed_id_or_feature_in_a_query_is_bad_user_input(
    db: Database,
    api: Api,
    member: str,
    caller: str | None,
    document: str,
    variables: dict[str, Any],
    field: str,
) -> None:
    await seed(api, member)
    token = {USER: member, SERVICE: SERVICE_KEY, None: None}[caller]
    async with unchanged(db):
        result = await api.query(document, variables, token=token)
    error = the_error(result)
    assert error["extensions"].get("code") == "BAD_USER_INPUT", error
    assert error["extensions"].get("field") == field, error


@in_module_loop
@pytest.mark.parametrize("subject", [NUL, "u\n1", TEN_KB, ""], ids=["nul", "newline", "10kb", "empty"])
async def test_a_token_whose_subject_is_not_a_user_id_is_unauthenticated(
    db: Database, api: Api, member: str, subject: str
) -> None:
    await seed(api, member)
    async with unchanged(db):
        viewer = await api.query("{ viewer { id } }", token=hs256_token(subject))
        checkout = await api.query(CHECKOUT, PLAN, token=hs256_token(subject))
    for result in (viewer, checkout):
        assert the_error(result)["extensions"]["code"] == "UNAUTHENTICATED", result


# The webhook route ---------------------------------------------------------------------------------


def envelope(**overrides: Any) -> dict[str, Any]:
    evt = event("customer.updated", {"id": "cus_member", "object": "customer", "metadata": {}})
    evt.update(overrides)
    return evt


MALFORMED_EVENTS = {
    "id-10kb": envelope(id="evt_" + TEN_KB),
    "id-nul": envelope(id="evt_a\x00b"),
    "id-number": envelope(id=12345),
    "id-unicode": envelope(id="evt_Zoë東京"),
    "id-not-an-event": envelope(id="cus_123"),
    "type-10kb": envelope(type="customer." + TEN_KB),
    "type-nul": envelope(type="customer.updated\x00"),
    "type-null": envelope(type=None),
    "created-huge": envelope(created=10**20),
    "created-beyond-datetime": envelope(created=2**62),
    "created-negative": envelope(created=-1),
    "created-negative-huge": envelope(created=-(10**20)),
    "type-unicode": envelope(type="customer.updatéd"),
    "created-string": envelope(created="1700000000"),
    "created-float": envelope(created=1.7e9),
    "data-null": envelope(data=None),
    "object-a-string": envelope(data={"object": "cus_member"}),
    "nul-inside-the-object": envelope(
        data={"object": {"id": "cus_member", "object": "customer", "name": NUL}}
    ),
    "nul-in-a-key": envelope(data={"object": {"id": "cus_member", "object": "customer", "a\x00": 1}}),
}


@in_module_loop
@pytest.mark.parametrize("evt", MALFORMED_EVENTS.values(), ids=MALFORMED_EVENTS.keys())
async def test_a_malformed_signed_event_is_400_and_nothing_is_stored(
    db: Database, api: Api, member: str, evt: dict[str, Any]
) -> None:
    await seed(api, member)
    async with unchanged(db), httpx.AsyncClient() as client:
        response = await post_event(client, api.url, evt)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid webhook"


@in_module_loop
async def test_unicode_and_long_strings_in_an_event_are_stored_exactly(db: Database, api: Api) -> None:
    customer = {
        "id": "cus_unicode",
        "object": "customer",
        "name": UNICODE,
        "description": TEN_KB,
        "metadata": {UNICODE: "✓", "note": "tab\tand\\u0000 written out"},
    }
    evt = event("customer.updated", customer, event_id=f"evt_{'A' * 251}")  # the longest id
    async with httpx.AsyncClient() as client:
        first = await post_event(client, api.url, evt)
        again = await post_event(client, api.url, evt)
    assert (first.status_code, first.json()) == (200, {"received": True, "duplicate": False})
    assert (again.status_code, again.json()) == (200, {"received": True, "duplicate": True})
    async with db.read() as conn:
        (row,) = (await conn.execute(select(event_table))).all()
    assert row.id == evt["id"] and row.payload == evt
    assert list((await snapshot(db, [event_table]))["stripe_event"]) == [tuple(row)]


# Unusable identity claims reaching Stripe and the account row ------------------------------------

BAD_CLAIMS = {
    "name-nul": {"name": NUL},  # PostgreSQL cannot store it
    "email-400": {"email": f"{'e' * 400}@example.test"},  # beyond the column (320)
    "email-not-a-string": {"email": ["a@example.test"]},
}


@pytest.mark.parametrize("claims", BAD_CLAIMS.values(), ids=BAD_CLAIMS.keys())
async def test_an_unusable_email_or_name_claim_is_left_out_of_checkout(
    service: Service, stripe_gateway: StripeGateway, claims: dict[str, Any]
) -> None:
    await setup_catalog(stripe_gateway)
    user = hs256_token("yuri", **{"email": "yuri@example.test", **claims})
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{service.url}/graphql",
            json={"query": CHECKOUT, "variables": PLAN},
            headers={"Authorization": f"Bearer {user}"},
        )
    result = response.json()
    assert "errors" not in result, result
    customers = (await stripe_gateway.v1.customers.list_async({"limit": 10})).data
    assert len(customers) == 1 and customers[0].metadata["userId"] == "yuri"
    async with service.database.read() as conn:
        (row,) = (await conn.execute(select(account_table))).all()
    assert row.user_id == "yuri" and row.stripe_customer_id == customers[0].id
    assert (row.email, row.name) == (customers[0].email, customers[0].name)
    assert row.email in ("yuri@example.test", None) and row.name is None
