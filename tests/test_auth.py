"""Authentication over HTTP with real tokens: HS256, RS256 from a JWKS served here, the service key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from billing.errors import BillingError, ErrorCode
from billing.settings import DEV_JWT_SECRET, Settings
from db.engine import Database
from graph.auth import CLOCK_SKEW_SECONDS, VERIFIED_FOR, VERIFIED_TOKENS, Authenticator, User
from tests.conftest import free_port, serve
from tests.test_graphql_support import (
    SERVICE_KEY,
    Api,
    error_codes,
    hs256_token,
    insert_account,
    only_error,
    serve_api,
)

VIEWER = "{ viewer { id email name subscription { status tier } } }"
ISSUER = "https://issuer.test/"
AUDIENCE = "billing-api"
STRONG_SECRET = "hs256-secret-for-the-auth-tests-0123456789"
KEY_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: str = "user-1", ttl: timedelta = timedelta(minutes=5), **extra: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"sub": sub, "iat": now, "exp": now + ttl, **extra}


def rs256_token(key: rsa.RSAPrivateKey, kid: str | None, **extra: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**extra), key, algorithm="RS256", headers=headers)


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig", "alg": "RS256"}


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(signature)}"


def hs256_with_public_key(key: rsa.RSAPrivateKey, kid: str) -> str:
    """The HS/RS confusion attack: an HS256 token whose HMAC secret is the RSA public key (PEM)."""
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(datetime.now(UTC).timestamp())
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    payload = {"sub": "attacker", "iat": now, "exp": now + 300}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@dataclass
class JwksServer:
    url: str
    keys: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    port = free_port()
    server = JwksServer(url=f"http://127.0.0.1:{port}/.well-known/jwks.json", keys=[jwk(KEY_A, "key-a")])

    async def endpoint(_request: Request) -> JSONResponse:
        server.requests += 1
        return JSONResponse({"keys": server.keys})

    app = Starlette(routes=[Route("/.well-known/jwks.json", endpoint)])
    async with serve(app, port):
        yield server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def use_clock(api: Api) -> Clock:
    clock = Clock()
    api.app.state.graphql.authenticator.jwks.clock = clock
    return clock


async def assert_rejected(api: Api, token: str, message: str) -> None:
    result = await api.query(VIEWER, token=token)
    error = only_error(result)
    assert error["extensions"]["code"] == "UNAUTHENTICATED", result
    assert message in error["message"], result
    assert result["data"] is None


# HS256 -----------------------------------------------------------------------------------------


async def test_an_hs256_token_identifies_the_user(database: Database) -> None:
    await insert_account(database, "user-1", status="active", tier="starter", name="From Row")
    async with serve_api(database, auth_jwt_secret=STRONG_SECRET) as api:
        token = hs256_token("user-1", secret=STRONG_SECRET, email="token@example.test")
        result = await api.query(VIEWER, token=token)
    assert result == {
        "data": {
            "viewer": {
                "id": "user-1",
                "email": "token@example.test",  # the token's claim wins over the stored one
                "name": "From Row",
                "subscription": {"status": "ACTIVE", "tier": "STARTER"},
            }
        }
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired", "token expired"),
        ("not_yet_valid", "token not yet valid"),
        ("wrong_secret", "bad signature"),
        ("alg_none", "algorithm 'none' is not accepted"),
        ("malformed", "malformed"),
        ("no_sub", "'sub'"),
        ("no_exp", "'exp'"),
        ("empty_sub", "`sub`"),
        ("not_bearer", "Bearer"),
    ],
)
async def test_bad_hs256_tokens_are_unauthenticated(database: Database, case: str, message: str) -> None:
    now = datetime.now(UTC)
    tokens = {
        "expired": hs256_token(ttl=timedelta(hours=-1)),
        "not_yet_valid": hs256_token(nbf=now + timedelta(minutes=10)),
        "wrong_secret": hs256_token(secret="another-secret-that-is-long-enough-000000"),
        "alg_none": unsigned_token({"alg": "none", "typ": "JWT"}, {"sub": "user-1", "exp": 9999999999}),
        "malformed": "not.a.jwt",
        "no_sub": hs256_token(sub=None),
        "no_exp": jwt.encode({"sub": "user-1"}, DEV_JWT_SECRET, algorithm="HS256"),
        "empty_sub": hs256_token(sub=""),
    }
    async with serve_api(database) as api:
        if case == "not_bearer":
            result = await api.query(VIEWER, headers={"Authorization": f"Basic {b64url(b'user:pass')}"})
            assert error_codes(result) == ["UNAUTHENTICATED"] and message in only_error(result)["message"]
            return
        await assert_rejected(api, tokens[case], message)


async def test_issuer_and_audience_are_checked_when_set(database: Database) -> None:
    async with serve_api(database, auth_issuer=ISSUER, auth_audience=AUDIENCE) as api:
        good = await api.query(VIEWER, token=hs256_token(iss=ISSUER, aud=AUDIENCE))
        assert good["data"]["viewer"]["id"] == "user-1"
        await assert_rejected(api, hs256_token(iss="https://evil.test/", aud=AUDIENCE), "wrong issuer")
        await assert_rejected(api, hs256_token(iss=ISSUER, aud="another-api"), "wrong audience")
        await assert_rejected(api, hs256_token(aud=AUDIENCE), "'iss'")
        await assert_rejected(api, hs256_token(iss=ISSUER), "'aud'")


async def test_issuer_and_audience_are_not_checked_when_unset(database: Database) -> None:
    async with serve_api(database) as api:
        result = await api.query(VIEWER, token=hs256_token(iss="https://any.test/", aud="anything"))
    assert result["data"]["viewer"]["id"] == "user-1"


async def test_a_bad_token_fails_even_on_a_public_question(database: Database) -> None:
    async with serve_api(database) as api:
        anonymous = await api.query('{ access(feature: "api_access") { allowed reason } }')
        expired = await api.query(
            '{ access(feature: "api_access") { allowed reason } }', token=hs256_token(ttl=timedelta(hours=-1))
        )
        plans = await api.query("{ plans { id } }", token=hs256_token(ttl=timedelta(hours=-1)))
    assert anonymous["data"]["access"] == {"allowed": False, "reason": "UNAUTHENTICATED"}
    assert error_codes(expired) == ["UNAUTHENTICATED"]  # the frontend must refresh, not show a paywall
    assert len(plans["data"]["plans"]) == 4  # fields that need nobody do not look at the token


# RS256 through JWKS ----------------------------------------------------------------------------


async def test_an_rs256_token_from_the_jwks_identifies_the_user(database: Database, jwks: JwksServer) -> None:
    async with serve_api(database, auth_jwks_url=jwks.url, auth_issuer=ISSUER, auth_audience=AUDIENCE) as api:
        token = rs256_token(KEY_A, "key-a", sub="rs-user", iss=ISSUER, aud=AUDIENCE, name="Ada")
        first = await api.query(VIEWER, token=token)
        second = await api.query(VIEWER, token=token)
    assert first["data"]["viewer"] == {
        "id": "rs-user",
        "email": None,
        "name": "Ada",
        "subscription": {"status": "NONE", "tier": "NONE"},
    }
    assert second == first
    assert jwks.requests == 1  # keys are cached


async def test_rs256_rejections(database: Database, jwks: JwksServer) -> None:
    async with serve_api(database, auth_jwks_url=jwks.url) as api:
        await assert_rejected(api, rs256_token(STRANGER, "key-a"), "bad signature")
        await assert_rejected(api, rs256_token(KEY_A, "key-a", ttl=timedelta(minutes=-5)), "token expired")
        now = datetime.now(UTC)
        await assert_rejected(api, rs256_token(KEY_A, "key-a", nbf=now + timedelta(hours=1)), "not yet valid")
        # With JWKS configured and no AUTH_JWT_SECRET, HS256 is not accepted at all.
        await assert_rejected(api, hs256_token(), "algorithm 'HS256' is not accepted")
        none = unsigned_token({"alg": "none", "kid": "key-a"}, {"sub": "x", "exp": 9999999999})
        await assert_rejected(api, none, "algorithm 'none' is not accepted")


async def test_hs256_signed_with_the_rsa_public_key_is_refused(database: Database, jwks: JwksServer) -> None:
    """HS/RS confusion, with and without an HS256 secret configured beside the JWKS."""
    forged = hs256_with_public_key(KEY_A, "key-a")
    async with serve_api(database, auth_jwks_url=jwks.url) as api:
        await assert_rejected(api, forged, "algorithm 'HS256' is not accepted")
    async with serve_api(database, auth_jwks_url=jwks.url, auth_jwt_secret=STRONG_SECRET) as api:
        await assert_rejected(api, forged, "bad signature")
        # Both kinds of tokens work when both are configured.
        hs = await api.query(VIEWER, token=hs256_token("hs-user", secret=STRONG_SECRET))
        rs = await api.query(VIEWER, token=rs256_token(KEY_A, "key-a", sub="rs-user"))
    assert hs["data"]["viewer"]["id"] == "hs-user"
    assert rs["data"]["viewer"]["id"] == "rs-user"


async def test_an_unknown_kid_refetches_once_at_most_once_a_minute(
    database: Database, jwks: JwksServer
) -> None:
    async with serve_api(database, auth_jwks_url=jwks.url) as api:
        clock = use_clock(api)
        assert (await api.query(VIEWER, token=rs256_token(KEY_A, "key-a")))["data"] is not None
        assert jwks.requests == 1

        # The provider rotates in key B. Within the minute after the last fetch: no refetch.
        jwks.keys = [jwk(KEY_A, "key-a"), jwk(KEY_B, "key-b")]
        clock.now += 30
        await assert_rejected(api, rs256_token(KEY_B, "key-b"), "unknown key")
        assert jwks.requests == 1

        # A minute later, an unknown kid makes one refetch, shared by concurrent requests.
        clock.now += 31
        results = await asyncio.gather(
            *(api.query(VIEWER, token=rs256_token(KEY_B, "key-b", sub=f"u{i}")) for i in range(5))
        )
        assert [result["data"]["viewer"]["id"] for result in results] == [f"u{i}" for i in range(5)]
        assert jwks.requests == 2

        # A kid nobody knows is refused without another fetch; known keys keep working.
        await assert_rejected(api, rs256_token(STRANGER, "key-z"), "unknown key")
        assert (await api.query(VIEWER, token=rs256_token(KEY_A, "key-a")))["data"] is not None
        assert jwks.requests == 2

        clock.now += 61
        await assert_rejected(api, rs256_token(STRANGER, "key-z"), "unknown key")
        assert jwks.requests == 3


async def test_unreachable_jwks_is_an_internal_error_not_a_logout(database: Database) -> None:
    async with serve_api(database, auth_jwks_url=f"http://127.0.0.1:{free_port()}/jwks.json") as api:
        result = await api.query(VIEWER, token=rs256_token(KEY_A, "key-a"))
    error = only_error(result)
    assert error["message"] == "Internal server error"
    assert error["extensions"]["code"] == "INTERNAL_ERROR"
    assert "127.0.0.1" not in json.dumps(result)


# The service key -------------------------------------------------------------------------------


async def test_the_service_key_is_the_service_principal(database: Database) -> None:
    await insert_account(database, "customer-9", status="trialing", tier="pro")
    query = '{ userSubscription(userId: "customer-9") { status tier hasAccess } }'
    async with serve_api(database, service_api_key=SERVICE_KEY) as api:
        accepted = await api.query(query, token=SERVICE_KEY)
        wrong_key = await api.query(query, token=SERVICE_KEY[:-1] + "x")
        as_user = await api.query(query, token=hs256_token("customer-9"))
        anonymous = await api.query(query)
        service_viewer = await api.query(VIEWER, token=SERVICE_KEY)
    assert accepted == {
        "data": {"userSubscription": {"status": "TRIALING", "tier": "PRO", "hasAccess": True}}
    }
    assert error_codes(wrong_key) == ["UNAUTHENTICATED"]
    assert error_codes(as_user) == ["FORBIDDEN"]
    assert error_codes(anonymous) == ["UNAUTHENTICATED"]
    assert error_codes(service_viewer) == ["FORBIDDEN"]


async def test_without_a_service_key_configured_nothing_is_a_service(database: Database) -> None:
    async with serve_api(database) as api:
        result = await api.query('{ userSubscription(userId: "x") { status } }', token=SERVICE_KEY)
    assert error_codes(result) == ["UNAUTHENTICATED"]


# billing token ---------------------------------------------------------------------------------

BILLING = str(Path(sys.executable).with_name("billing"))


def run_billing(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("AUTH_", "ENVIRONMENT"))}
    return subprocess.run(
        [BILLING, *args], env={**clean, **env}, cwd=cwd, capture_output=True, text=True, timeout=60
    )


async def test_billing_token_prints_a_token_the_api_accepts(database: Database, tmp_path: Path) -> None:
    env = {"AUTH_JWT_SECRET": STRONG_SECRET, "AUTH_ISSUER": ISSUER}
    result = run_billing(
        "token", "cli-user", "--email", "cli@example.test", "--ttl", "120", env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    decoded = jwt.decode(token, STRONG_SECRET, algorithms=["HS256"], issuer=ISSUER)
    assert decoded["exp"] - decoded["iat"] == 120
    async with serve_api(database, auth_jwt_secret=STRONG_SECRET, auth_issuer=ISSUER) as api:
        viewer = await api.query(VIEWER, token=token)
    assert viewer["data"]["viewer"]["id"] == "cli-user"
    assert viewer["data"]["viewer"]["email"] == "cli@example.test"


def test_billing_token_is_refused_in_production(tmp_path: Path) -> None:
    env = {
        "ENVIRONMENT": "production",
        "STRIPE_SECRET_KEY": "sk_test_production_like",
        "STRIPE_WEBHOOK_SECRET": "whsec_production_like_secret",
        "AUTH_JWT_SECRET": STRONG_SECRET,
        "METRICS_TOKEN": STRONG_SECRET,
    }
    result = run_billing("token", "someone", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "production" in lines[0], result.stderr


# Remembered verifications ----------------------------------------------------------------------


class CountingAuthenticator(Authenticator):
    """Counts the full verifications (signature and claims) it performs."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        super().__init__(settings, clock=clock)
        self.verifications = 0

    async def _verify(self, token: str) -> tuple[User, float]:
        self.verifications += 1
        return await super()._verify(token)


def counting_authenticator() -> tuple[CountingAuthenticator, Clock]:
    clock = Clock()
    return CountingAuthenticator(Settings(auth_jwt_secret=STRONG_SECRET), clock), clock


async def test_a_verified_token_is_checked_again_after_a_minute() -> None:
    auth, clock = counting_authenticator()
    token = hs256_token("user-1", secret=STRONG_SECRET, ttl=timedelta(hours=1))
    for _ in range(3):
        assert (await auth.verify(token)).id == "user-1"
    assert auth.verifications == 1

    clock.now += VERIFIED_FOR + 1
    assert (await auth.verify(token)).id == "user-1"
    assert auth.verifications == 2


async def test_a_token_is_never_remembered_past_its_expiry() -> None:
    auth, clock = counting_authenticator()
    token = hs256_token("user-1", secret=STRONG_SECRET, ttl=timedelta(seconds=5))
    await auth.verify(token)
    clock.now += 5 + CLOCK_SKEW_SECONDS + 1  # well inside the minute, past exp + skew
    await auth.verify(token)
    assert auth.verifications == 2


async def test_a_refused_token_is_not_remembered() -> None:
    auth, _ = counting_authenticator()
    forged = hs256_token("user-1", secret="another-secret-of-at-least-32-bytes!!")
    for _ in range(2):
        with pytest.raises(BillingError) as refused:
            await auth.verify(forged)
        assert refused.value.code == ErrorCode.UNAUTHENTICATED
    assert auth.verifications == 2


async def test_remembered_tokens_are_bounded_least_recently_used_out() -> None:
    auth, _ = counting_authenticator()
    tokens = [hs256_token(f"user-{i}", secret=STRONG_SECRET) for i in range(VERIFIED_TOKENS + 1)]
    for token in tokens:
        await auth.verify(token)
    assert auth.verifications == VERIFIED_TOKENS + 1

    await auth.verify(tokens[-1])  # still remembered
    assert auth.verifications == VERIFIED_TOKENS + 1
    await auth.verify(tokens[0])  # the oldest was let go
    assert auth.verifications == VERIFIED_TOKENS + 2
