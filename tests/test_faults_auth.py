"""Fault matrix, authentication and probing: bad tokens and other users' ids get their exact
code, reach neither Stripe nor the database, and show nothing of anyone else.

The service runs in sandbox mode with RS256 keys from a JWKS (served here), an HS256 secret,
an issuer and an audience all configured, so every check is live at once. A victim has a real
subscription (checkout paid in the sandbox, applied by the webhooks); every attack below is
made at her, and afterwards every state table (`tests/db_snapshot.py`), her subscription in
the sandbox and the sandbox's list of customers are as they were.

Rows, and where each is tested:

| row | where |
|---|---|
| missing token on a user field | here: `test_a_bad_token_is_unauthenticated_on_every_user_operation_and_changes_nothing`; `test_mutations_checkout.py::test_checkout_needs_a_user`, `test_mutations_portal.py::test_the_portal_needs_a_user` |
| `Authorization` not `Bearer`, malformed token | here; `test_auth.py::test_bad_hs256_tokens_are_unauthenticated` |
| expired, not yet valid (`nbf`) | here (RS256); `test_auth.py::test_bad_hs256_tokens_are_unauthenticated` (HS256), `::test_rs256_rejections` |
| wrong issuer, wrong audience, missing `iss` / `aud` | here; `test_auth.py::test_issuer_and_audience_are_checked_when_set` |
| `alg: none` | here; `test_auth.py::test_bad_hs256_tokens_are_unauthenticated`, `::test_rs256_rejections` |
| HS/RS confusion (HS256 "signed" with the RSA public key) | here (with an HS256 secret configured too); `test_auth.py::test_hs256_signed_with_the_rsa_public_key_is_refused` (both configurations) |
| tampered tokens: another `sub` under the original signature, the signature cut off, the header's `alg` changed, a wrong HS256 secret | here |
| unknown `kid`, key rotation | here; `test_auth.py::test_an_unknown_kid_refetches_once_at_most_once_a_minute` |
| unreachable JWKS: INTERNAL_ERROR, not a sign-out | `test_auth.py::test_unreachable_jwks_is_an_internal_error_not_a_logout` |
| bad token on a public field | `test_auth.py::test_a_bad_token_fails_even_on_a_public_question` |
| bad token on the websocket | `test_realtime.py::test_a_bad_or_missing_token_closes_the_socket_with_4403` |
| `confirmCheckoutSession(sessionId)` with another user's session (and unknown, malformed ids) | `test_mutations_checkout.py::test_confirming_another_users_session_is_refused_and_changes_nothing` (a user with a customer of her own); here: a user without one (`test_a_user_reaches_nothing_of_another_user_through_any_field`) |
| `userSubscription(userId)` with another user's id | here: FORBIDDEN for a user (the service's field) |
| `recordUsage(input.userId)`, `recordUsageBatch(inputs[].userId)` with another user's id | here: FORBIDDEN for a user, nothing recorded; `test_usage_recording.py::test_only_the_service_key_records_usage` |
| organisations: `organizationSubscription(orgId)`, `recordUsage(input.orgId)`, `setSeats`, `previewSeatChange`; a prober who is a billing admin of an organisation (one named like the victim's user id too) | here: FORBIDDEN (the service's fields) and the prober's organisation's own empty state; `test_team_owners.py` (members of one organisation never see another's state, usage, invoices or live updates), `test_teams.py` (members who are not billing admins) |
| fields without an id (viewer, its invoices, usage and entitlements; plan changes, cancel, resume, portal): always the token's user | here: the prober sees her own empty state, and every mutation answers for her (NO_SUBSCRIPTION, NO_BILLING_ACCOUNT), never touching the victim |
| `billingStateChanged`: no argument, only the token's user | `test_realtime.py::test_a_subscriber_gets_its_state_then_each_webhook_change_and_no_one_else_does` |
| the service key on user fields | `test_auth.py::test_the_service_key_is_the_service_principal`, `test_graphql_viewer.py::test_access_without_a_token_and_with_the_service_key` |
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest

from billing.stripe_gateway import StripeGateway
from db.engine import Database
from tests.auth_support import (
    AUDIENCE,
    ISSUER,
    KEY_A,
    STRANGER,
    STRONG_SECRET,
    JwksServer,
    b64url,
    hs256_with_public_key,
    jwks,
    unsigned_token,
)
from tests.billing_flows import checkout, control, settle, setup_catalog, wait_for_account
from tests.conftest import DbTarget, Service, running_service
from tests.db_snapshot import unchanged
from tests.gateways import open_sandbox_gateway
from tests.graphql_support import SERVICE_KEY, error_codes, hs256_token, only_error

__all__ = ["jwks"]  # the JWKS server fixture of tests/auth_support.py

VICTIM = "victim"
PROBER = "prober"

OPERATIONS = {
    "viewer": "{ viewer { id subscription { status tier } invoices { id } } }",
    "createCheckoutSession": "mutation { createCheckoutSession(tier: PRO, interval: MONTHLY) { id url } }",
    "confirmCheckoutSession": "mutation($id: ID!) { confirmCheckoutSession(sessionId: $id) { status } }",
    "createPortalSession": "mutation { createPortalSession { url } }",
    "previewPlanChange": "mutation { previewPlanChange(tier: PRO, interval: ANNUAL) { amountDue } }",
    "changePlan": "mutation { changePlan(tier: PRO, interval: ANNUAL) { tier } }",
    "cancelSubscription": "mutation { cancelSubscription(atPeriodEnd: false) { status } }",
    "resumeSubscription": "mutation { resumeSubscription { status } }",
}


@dataclass
class Scene:
    service: Service
    gateway: StripeGateway
    jwks: JwksServer
    customer_id: str
    subscription_id: str
    session_id: str  # the victim's paid checkout session

    async def graphql(
        self, query: str, variables: dict[str, Any], authorization: str | None
    ) -> httpx.Response:
        headers = {} if authorization is None else {"Authorization": authorization}
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(
                f"{self.service.url}/graphql", json={"query": query, "variables": variables}, headers=headers
            )

    async def stripe_side(self) -> tuple[Any, ...]:
        """The victim's subscription and every customer, as the sandbox has them."""
        subscription = await self.gateway.v1.subscriptions.retrieve_async(self.subscription_id)
        customers = await self.gateway.v1.customers.list_async({"limit": 100})
        return (
            subscription.status,
            subscription.cancel_at_period_end,
            subscription.schedule,
            sorted(item.price.id for item in subscription["items"].data),
            sorted(customer.id for customer in customers.data),
        )


@pytest.fixture
async def scene(database: Database, sandbox_db: DbTarget, jwks: JwksServer) -> AsyncIterator[Scene]:
    async with (
        running_service(
            database,
            sandbox_db,
            auth_jwks_url=jwks.url,
            auth_jwt_secret=STRONG_SECRET,
            auth_issuer=ISSUER,
            auth_audience=AUDIENCE,
            service_api_key=SERVICE_KEY,
            usage_reporter=False,
        ) as service,
        open_sandbox_gateway(service.url) as gateway,
    ):
        prices = await setup_catalog(gateway)
        customer_id, session_id = await checkout(gateway, prices, VICTIM, "pro_monthly", trial_days=None)
        paid = await control(service, f"checkout/{session_id}/complete", {"outcome": "paid"})
        await wait_for_account(service.database, VICTIM, status="active", tier="pro")
        await settle(service.url, service.database)
        yield Scene(service, gateway, jwks, customer_id, paid["subscription"]["id"], session_id)


def good_claims(sub: str = VICTIM, **extra: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "sub": sub,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + timedelta(minutes=5),
        **extra,
    }


def rs256(**claims: Any) -> str:
    return jwt.encode(good_claims(**claims), KEY_A, algorithm="RS256", headers={"kid": "key-a"})


def swap_payload(token: str, sub: str) -> str:
    """Another subject under the original header and signature."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return ".".join([header, b64url(json.dumps({**claims, "sub": sub}).encode()), signature])


def swap_header(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    return ".".join([b64url(json.dumps({**fields, **changes}).encode()), payload, signature])


def bad_tokens() -> dict[str, tuple[str | None, str]]:
    """case -> (the Authorization header, a piece of the UNAUTHENTICATED message)."""
    now = datetime.now(UTC)
    prober = rs256(sub=PROBER)
    epoch = int(now.timestamp())
    return {
        "missing": (None, "sign in: this needs a user token"),
        "not bearer": (f"Basic {b64url(b'victim:password')}", "must be `Bearer <token>`"),
        "malformed": ("Bearer not.a.jwt", "invalid token: malformed"),
        "expired": (f"Bearer {rs256(exp=now - timedelta(minutes=5))}", "token expired"),
        "not yet valid": (f"Bearer {rs256(nbf=now + timedelta(hours=1))}", "token not yet valid"),
        "wrong issuer": (f"Bearer {rs256(iss='https://evil.test/')}", "invalid token: wrong issuer"),
        "wrong audience": (f"Bearer {rs256(aud='another-api')}", "invalid token: wrong audience"),
        "no issuer": (
            "Bearer "
            + jwt.encode(
                {k: v for k, v in good_claims().items() if k != "iss"},
                KEY_A,
                algorithm="RS256",
                headers={"kid": "key-a"},
            ),
            "invalid token: no 'iss' claim",
        ),
        "alg none": (
            "Bearer "
            + unsigned_token(
                {"alg": "none", "typ": "JWT"}, {**good_claims(), "iat": epoch, "exp": epoch + 300}
            ),
            "invalid token: algorithm 'none' is not accepted",
        ),
        "HS/RS confusion": (
            f"Bearer {hs256_with_public_key(KEY_A, 'key-a')}",
            "invalid token: bad signature",
        ),
        "tampered subject": (f"Bearer {swap_payload(prober, VICTIM)}", "invalid token: bad signature"),
        "signature cut off": (f"Bearer {prober.rsplit('.', 1)[0]}.", "invalid token"),
        "header alg changed": (f"Bearer {swap_header(prober, alg='HS256')}", "invalid token: bad signature"),
        "wrong HS256 secret": (
            "Bearer " + hs256_token(VICTIM, secret="x" * 40, iss=ISSUER, aud=AUDIENCE),
            "invalid token: bad signature",
        ),
        "unknown kid": (
            "Bearer " + jwt.encode(good_claims(), STRANGER, algorithm="RS256", headers={"kid": "key-z"}),
            "invalid token: signed with an unknown key",
        ),
        "known kid, another key": (
            "Bearer " + jwt.encode(good_claims(), STRANGER, algorithm="RS256", headers={"kid": "key-a"}),
            "invalid token: bad signature",
        ),
    }


async def test_a_bad_token_is_unauthenticated_on_every_user_operation_and_changes_nothing(
    scene: Scene,
) -> None:
    tokens = bad_tokens()
    stripe_before = await scene.stripe_side()
    answers: dict[tuple[str, str], dict[str, Any]] = {}
    async with unchanged(scene.service.database):
        for case, (authorization, _) in tokens.items():
            for name, query in OPERATIONS.items():
                response = await scene.graphql(query, {"id": scene.session_id}, authorization)
                assert response.status_code == 200, response.text
                answers[(case, name)] = response.json()
        await settle(scene.service.url, scene.service.database)
    for (case, name), result in answers.items():
        error = only_error(result)
        assert error["extensions"]["code"] == "UNAUTHENTICATED", (case, name, result)
        assert tokens[case][1] in error["message"], (case, name, result)
        assert result["data"] is None, (case, name, result)
    assert await scene.stripe_side() == stripe_before
    assert (await scene.graphql(OPERATIONS["viewer"], {}, f"Bearer {rs256()}")).json()["data"]["viewer"] == {
        "id": VICTIM,
        "subscription": {"status": "ACTIVE", "tier": "PRO"},
        "invoices": [{"id": paid} for paid in await _victims_invoices(scene)],
    }  # and the victim's own valid token still works


async def _victims_invoices(scene: Scene) -> list[str]:
    invoices = await scene.gateway.v1.invoices.list_async({"customer": scene.customer_id, "limit": 100})
    return [invoice.id for invoice in invoices.data if invoice.status != "draft"]


PROBES: list[tuple[str, str, dict[str, Any], str]] = [
    # (what, document, variables, the prober's code)
    (
        "userSubscription with the victim's id",
        "query($u: ID!) { userSubscription(userId: $u) { status tier } }",
        {"u": VICTIM},
        "FORBIDDEN",
    ),
    (
        "recordUsage for the victim",
        "mutation($i: RecordUsageInput!) { recordUsage(input: $i) { id } }",
        {"i": {"userId": VICTIM, "feature": "api_calls", "quantity": 5, "idempotencyKey": "probe"}},
        "FORBIDDEN",
    ),
    (
        "recordUsageBatch for the victim",
        "mutation($i: [RecordUsageInput!]!) { recordUsageBatch(inputs: $i) { id } }",
        {"i": [{"userId": VICTIM, "feature": "api_calls", "quantity": 5, "idempotencyKey": "probe"}]},
        "FORBIDDEN",
    ),
    (
        "confirmCheckoutSession with the victim's session",
        OPERATIONS["confirmCheckoutSession"],
        {},
        "NO_BILLING_ACCOUNT",
    ),
    (
        "organizationSubscription of an organisation named like the victim",
        "query($o: ID!) { organizationSubscription(orgId: $o) { status tier } }",
        {"o": VICTIM},
        "FORBIDDEN",
    ),
    (
        "recordUsage for an organisation",
        "mutation($i: RecordUsageInput!) { recordUsage(input: $i) { id } }",
        {"i": {"orgId": VICTIM, "feature": "api_calls", "quantity": 5, "idempotencyKey": "probe"}},
        "FORBIDDEN",
    ),
    (
        "setSeats of an organisation",
        'mutation($o: ID!) { setSeats(orgId: $o, seats: 9, idempotencyKey: "probe") { seats } }',
        {"o": VICTIM},
        "FORBIDDEN",
    ),
    (
        "previewSeatChange of an organisation",
        "mutation($o: ID!) { previewSeatChange(orgId: $o, seats: 9) { amountDue } }",
        {"o": VICTIM},
        "FORBIDDEN",
    ),
    ("createPortalSession", OPERATIONS["createPortalSession"], {}, "NO_BILLING_ACCOUNT"),
    ("previewPlanChange", OPERATIONS["previewPlanChange"], {}, "NO_SUBSCRIPTION"),
    ("changePlan", OPERATIONS["changePlan"], {}, "NO_SUBSCRIPTION"),
    ("cancelSubscription", OPERATIONS["cancelSubscription"], {}, "NO_SUBSCRIPTION"),
    ("resumeSubscription", OPERATIONS["resumeSubscription"], {}, "NO_SUBSCRIPTION"),
]


# The prober on their own, and as a billing admin of an organisation (team billing): one whose id
# is the victim's user id must reach the organisation's account (`org:victim`), never hers.
PROBER_ORGS: dict[str, dict[str, Any]] = {
    "personal": {},
    "admin of an organisation named like the victim": {"o": {"id": VICTIM, "rol": "admin"}},
    "admin of another organisation (previous Clerk format)": {"org_id": "org_x", "org_role": "org:admin"},
}


@pytest.mark.parametrize("organisation", list(PROBER_ORGS), ids=list(PROBER_ORGS))
async def test_a_user_reaches_nothing_of_another_user_through_any_field(
    scene: Scene, organisation: str
) -> None:
    prober = f"Bearer {rs256(sub=PROBER, **PROBER_ORGS[organisation])}"
    stripe_before = await scene.stripe_side()
    answers: dict[str, dict[str, Any]] = {}
    async with unchanged(scene.service.database):
        for what, query, variables, _ in PROBES:
            response = await scene.graphql(query, {"id": scene.session_id, **variables}, prober)
            assert response.status_code == 200, response.text
            answers[what] = response.json()
        own = (
            await scene.graphql(
                '{ viewer { id subscription { status tier } invoices { id } usage(feature: "api_calls") { used } } }',
                {},
                prober,
            )
        ).json()
        await settle(scene.service.url, scene.service.database)
    for what, _, _, code in PROBES:
        assert error_codes(answers[what]) == [code], (what, answers[what])
        assert answers[what]["data"] is None, (what, answers[what])
        shown = json.dumps(answers[what])
        assert scene.customer_id not in shown and scene.subscription_id not in shown, answers[what]
    assert own == {
        "data": {
            "viewer": {
                "id": PROBER,
                "subscription": {"status": "NONE", "tier": "NONE"},
                "invoices": [],
                "usage": {"used": 0},
            }
        }
    }
    assert await scene.stripe_side() == stripe_before
