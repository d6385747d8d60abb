"""Who is an operator: ADMIN_USER_IDS, AUTH_ADMIN_CLAIM = AUTH_ADMIN_VALUE, or the service key.

An organisation role never makes anyone an operator, and the service refuses to start when
AUTH_ADMIN_CLAIM names one. Everyone else gets FORBIDDEN from an operator field, and no data.
"""

from __future__ import annotations

import logging
from typing import Any

import jwt
import pytest
import strawberry
from strawberry.tools import merge_types

from billing.errors import ConfigurationError
from billing.settings import Settings, is_organisation_claim, load_settings
from db.engine import Database
from graph.auth import Authenticator, User
from graph.permissions import IsOperator, PermissionExtension
from graph.schema import Query as BillingQuery
from graph.schema import build_schema
from tests.graphql_support import (
    PRODUCTION,
    PRODUCTION_SECRET,
    SERVICE_KEY,
    hs256_token,
    insert_account,
    serve_api,
)

ADMINS = {
    "admin_user_ids": "op-1, op-2",
    "auth_admin_claim": "metadata.role",
    "auth_admin_value": "billing_operator",
}


@strawberry.type
class Secret:
    @strawberry.field(extensions=[PermissionExtension(permissions=[IsOperator()])])
    async def operator_secret(self) -> str:
        return "the numbers"


SCHEMA = build_schema(merge_types("Query", (BillingQuery, Secret)))


@pytest.mark.parametrize(
    "claim", ["org_role", "o.rol", "o", "org:admin", "org", "ORG_ROLE", "metadata.org_role"]
)
def test_an_organisation_role_claim_is_refused_at_start(claim: str) -> None:
    assert is_organisation_claim(claim)
    with pytest.raises(ConfigurationError, match="organisation role"):
        load_settings(auth_admin_claim=claim, auth_admin_value="admin")
    with pytest.raises(ConfigurationError, match="organisation role"):
        load_settings(
            auth_admin_claim=claim,
            auth_admin_value="admin",
            **{**PRODUCTION, "stripe_secret_key": "sk_test_x"},
        )


def test_the_admin_claim_needs_its_value_and_a_path() -> None:
    with pytest.raises(ConfigurationError, match="AUTH_ADMIN_VALUE"):
        load_settings(auth_admin_claim="metadata.role")
    with pytest.raises(ConfigurationError, match="AUTH_ADMIN_CLAIM"):
        load_settings(auth_admin_value="billing_operator")
    with pytest.raises(ConfigurationError, match="dotted path"):
        load_settings(auth_admin_claim="metadata..role", auth_admin_value="x")
    assert not is_organisation_claim("metadata.role")
    assert load_settings(**ADMINS).operator_ids == {"op-1", "op-2"}


async def test_the_authenticator_marks_operators_by_id_or_exact_claim() -> None:
    auth = Authenticator(Settings(**ADMINS))

    async def who(token: str) -> Any:
        return await auth.authenticate(f"Bearer {token}")

    assert (await who(hs256_token("op-1"))).operator
    assert (await who(hs256_token("u", metadata={"role": "billing_operator"}))).operator
    assert not (await who(hs256_token("u", metadata={"role": "billing_operator "}))).operator
    assert not (await who(hs256_token("u", metadata={"role": ["billing_operator"]}))).operator
    assert not (await who(hs256_token("u", role="billing_operator"))).operator
    assert not (await who(hs256_token("u", org_role="org:admin", o={"rol": "admin"}))).operator
    assert await who(hs256_token("plain")) == User(id="plain")
    assert not User(id="op-1").operator  # only the authenticator says who is one


REFUSED = {
    "nobody": None,
    "user": hs256_token("user-1"),
    "organisation admin": hs256_token("user-2", org_role="org:admin", o={"rol": "admin", "id": "org_1"}),
    "wrong claim value": hs256_token("user-3", metadata={"role": "billing_viewer"}),
    "claim at another path": hs256_token("user-4", role="billing_operator"),
}


OPERATOR_FIELDS = {
    "billingAccount": '{ billingAccount(userId: "acct-1") { userId ledger { kind } events { id } } }',
    "billingAccount by email": '{ billingAccount(email: "EMAIL") { userId } }',
    "billingAccount by customer": '{ billingAccount(stripeCustomerId: "cus_acct-1") { userId } }',
    "billingMetrics": (
        '{ billingMetrics(from: "2026-01-01T00:00:00Z", to: "2026-02-01T00:00:00Z") '
        "{ mrr arr subscribers { status count } movements { new } } }"
    ),
}


@pytest.mark.parametrize("environment", ["development", "production"])
async def test_every_operator_field_refuses_everyone_else(db: Database, environment: str) -> None:
    production = environment == "production"
    settings = {**ADMINS, "service_api_key": SERVICE_KEY, **(PRODUCTION if production else {})}
    secret = {"secret": PRODUCTION_SECRET} if production else {}
    user_id = f"acct-{environment}"  # the module's database keeps its rows
    await insert_account(db, user_id)
    email = f"{user_id.upper()}@example.test"  # matched case-insensitively
    fields = {
        name: query.replace("acct-1", user_id).replace("EMAIL", email)
        for name, query in OPERATOR_FIELDS.items()
    }
    async with serve_api(db, **settings) as api:
        for who, token in REFUSED.items():
            signed = None if token is None else hs256_token(**_claims(token), **secret)
            for name, query in fields.items():
                result = await api.query(query, token=signed)
                assert [e["extensions"]["code"] for e in result["errors"]] == ["FORBIDDEN"], (who, name)
                assert not any((result.get("data") or {}).values()), (who, name)  # nothing returned
        for token in (SERVICE_KEY, hs256_token("op-1", **secret)):
            for name, query in fields.items():
                result = await api.query(query, token=token)
                assert "errors" not in result, (name, result)
                assert all(result["data"].values()), (name, result)
            for keys in ("", f'(userId: "{user_id}", email: "x@example.test")'):  # not exactly one key
                result = await api.query(f"{{ billingAccount{keys} {{ userId }} }}", token=token)
                assert [e["extensions"]["code"] for e in result["errors"]] == ["BAD_USER_INPUT"], keys


async def test_every_operator_field_logs_the_operators_id(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="billing.graphql")
    async with serve_api(db, schema=SCHEMA, **ADMINS, service_api_key=SERVICE_KEY) as api:
        await api.query("{ operatorSecret }", token=hs256_token("op-2"))
        await api.query("{ operatorSecret }", token=SERVICE_KEY)
    logged = [
        getattr(record, "operator", None) for record in caplog.records if record.name == "billing.graphql"
    ]
    assert logged == ["op-2", "service"]


@pytest.mark.parametrize("environment", ["development", "production"])
async def test_only_operators_reach_an_operator_field(db: Database, environment: str) -> None:
    production = environment == "production"
    settings = {**ADMINS, "service_api_key": SERVICE_KEY, **(PRODUCTION if production else {})}
    secret = {"secret": PRODUCTION_SECRET} if production else {}
    refused = {
        name: None if token is None else hs256_token(**_claims(token), **secret)
        for name, token in REFUSED.items()
    }
    allowed = {
        "listed id": hs256_token("op-2", **secret),
        "exact claim": hs256_token("someone", metadata={"role": "billing_operator"}, **secret),
        "service key": SERVICE_KEY,
    }
    async with serve_api(db, schema=SCHEMA, **settings) as api:
        for name, token in refused.items():
            result = await api.query("{ operatorSecret }", token=token)
            assert result["data"] is None, name
            assert [e["extensions"]["code"] for e in result["errors"]] == ["FORBIDDEN"], name
        for name, token in allowed.items():
            result = await api.query("{ operatorSecret }", token=token)
            assert result == {"data": {"operatorSecret": "the numbers"}}, name


def _claims(token: str) -> dict[str, Any]:
    """The claims of a token, to sign them again with another secret."""
    claims = jwt.decode(token, options={"verify_signature": False})
    claims.pop("iat"), claims.pop("exp")
    return claims
