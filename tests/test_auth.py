"""Authentication over HTTP with real tokens: HS256, RS256 from a JWKS served here, the service key."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest

from billing.errors import BillingError, ErrorCode
from billing.settings import DEV_JWT_SECRET, Settings
from db.engine import Database
from graph.auth import CLOCK_SKEW_SECONDS, VERIFIED_FOR, VERIFIED_TOKENS, Authenticator, ServicePrincipal
from tests.auth_support import (
    AUDIENCE,
    ISSUER,
    KEY_A,
    KEY_B,
    STRANGER,
    STRONG_SECRET,
    JwksServer,
    b64url,
    hs256_with_public_key,
    jwk,
    jwks,
    rs256_token,
    unsigned_token,
)
from tests.conftest import free_port
from tests.graphql_support import (
    SERVICE_KEY,
    Api,
    error_codes,
    hs256_token,
    insert_account,
    only_error,
    serve_api,
)

__all__ = ["jwks"]  # the JWKS server fixture of tests/auth_support.py

VIEWER = "{ viewer { id email name subscription { status tier } } }"


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


@dataclass
class Counted:
    """An authenticator on a clock moved by hand, and the full verifications (signature and claims)
    it has made: one PyJWT `decode` for each token it checks."""

    auth: Authenticator
    clock: Clock
    verifications: int = 0


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Counted:
    clock = Clock()
    counted = Counted(Authenticator(Settings(auth_jwt_secret=STRONG_SECRET), clock=clock), clock)
    decode = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted.verifications += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return counted


async def test_a_verified_token_is_checked_again_after_a_minute(counted: Counted) -> None:
    auth, clock = counted.auth, counted.clock
    token = hs256_token("user-1", secret=STRONG_SECRET, ttl=timedelta(hours=1))
    for _ in range(3):
        assert (await auth.verify(token)).id == "user-1"
    assert counted.verifications == 1

    clock.now += VERIFIED_FOR + 1
    assert (await auth.verify(token)).id == "user-1"
    assert counted.verifications == 2


async def test_the_hot_path_knows_only_the_service_key_and_tokens_verified_within_the_minute(
    counted: Counted,
) -> None:
    """`remembered` (the context's path without a task) answers only what `authenticate` would."""
    auth, clock = counted.auth, counted.clock
    token = hs256_token("user-1", secret=STRONG_SECRET, ttl=timedelta(hours=1))
    assert auth.remembered(f"Bearer {token}") is None  # never verified: authenticate() checks it
    await auth.verify(token)
    user = auth.remembered(f"Bearer {token}")
    assert user is not None and user.id == "user-1"
    for other in (None, token, f"bearer {token}", f"Basic {token}", "Bearer "):
        assert auth.remembered(other) is None
    clock.now += VERIFIED_FOR + 1
    assert auth.remembered(f"Bearer {token}") is None
    assert counted.verifications == 1

    with_key = Authenticator(Settings(auth_jwt_secret=STRONG_SECRET, service_api_key=SERVICE_KEY))
    assert isinstance(with_key.remembered(f"Bearer {SERVICE_KEY}"), ServicePrincipal)
    assert with_key.remembered(f"Bearer {SERVICE_KEY}x") is None


async def test_a_token_is_never_remembered_past_its_expiry(counted: Counted) -> None:
    auth, clock = counted.auth, counted.clock
    token = hs256_token("user-1", secret=STRONG_SECRET, ttl=timedelta(seconds=5))
    await auth.verify(token)
    clock.now += 5 + CLOCK_SKEW_SECONDS + 1  # well inside the minute, past exp + skew
    await auth.verify(token)
    assert counted.verifications == 2


async def test_a_refused_token_is_not_remembered(counted: Counted) -> None:
    auth = counted.auth
    forged = hs256_token("user-1", secret="another-secret-of-at-least-32-bytes!!")
    for _ in range(2):
        with pytest.raises(BillingError) as refused:
            await auth.verify(forged)
        assert refused.value.code == ErrorCode.UNAUTHENTICATED
    assert counted.verifications == 2


async def test_remembered_tokens_are_bounded_least_recently_used_out(counted: Counted) -> None:
    auth = counted.auth
    tokens = [hs256_token(f"user-{i}", secret=STRONG_SECRET) for i in range(VERIFIED_TOKENS + 1)]
    for token in tokens:
        await auth.verify(token)
    assert counted.verifications == VERIFIED_TOKENS + 1

    await auth.verify(tokens[-1])  # still remembered
    assert counted.verifications == VERIFIED_TOKENS + 1
    await auth.verify(tokens[0])  # the oldest was let go
    assert counted.verifications == VERIFIED_TOKENS + 2
