"""Tokens and keys for the authentication tests: HS256 and RS256 tokens, forged ones, and a JWKS
endpoint served on a loopback port (the `jwks` fixture: a module that uses it imports it)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import free_port, serve

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
