"""Who is calling: a user with a bearer JWT, the host app's backend with the service key, or nobody.

- `Authorization: Bearer <SERVICE_API_KEY>` (compared in constant time) is the service principal.
- Any other bearer token must be a JWT: RS256 signed by a key of `AUTH_JWKS_URL`, or HS256 signed
  with `AUTH_JWT_SECRET`. The accepted algorithm comes from the configuration, never from the
  token alone: `alg: none` and an HS256 token "signed" with the RSA public key are refused.
  `exp` and `sub` are required; `nbf`, and `iss` / `aud` when `AUTH_ISSUER` / `AUTH_AUDIENCE`
  are set, are checked. `sub` is the user id (never beginning with `org:`); `email` and `name`
  are read when present; the active organisation (AUTH_ORG_ID_CLAIMS) and whether the member is
  one of its billing admins (BILLING_ADMIN_ROLES) too.
- JWKS keys are cached. A token with an unknown `kid` makes one refetch, at most once a minute.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from billing.access import is_plain_text, is_user_id
from billing.clock import utcnow
from billing.errors import BillingError, ConfigurationError, ErrorCode
from billing.owners import ORG_PREFIX, org_key
from billing.settings import Settings

log = logging.getLogger("billing.auth")

HS256 = "HS256"
RS256 = "RS256"
CLOCK_SKEW_SECONDS = 30
MAX_TOKEN_LENGTH = 8192
MAX_EMAIL_LENGTH = 320  # the columns of billing_account
MAX_NAME_LENGTH = 255
MAX_ORG_ID_LENGTH = 251  # `org:` + the id fits the account's 255-character owner key
JWKS_REFETCH_INTERVAL = 60.0  # seconds between two fetches once keys are known
JWKS_RETRY_INTERVAL = 5.0  # seconds between two attempts while no key was ever fetched
JWKS_TIMEOUT = 5.0
VERIFIED_TOKENS = 1024  # tokens whose verification is remembered, per process (least recently used out)
VERIFIED_FOR = 60.0  # seconds a verification is remembered at most (and never past `exp` + skew)


@dataclass(frozen=True, slots=True)
class User:
    """A signed-in user of the host app."""

    id: str
    email: str | None = None
    name: str | None = None
    # An operator of the service (ADMIN_USER_IDS, or AUTH_ADMIN_CLAIM = AUTH_ADMIN_VALUE).
    operator: bool = False
    # The token's active organisation (AUTH_ORG_ID_CLAIMS), and whether the user's role in it is
    # one of BILLING_ADMIN_ROLES. With an organisation, the viewer is on the organisation's plan.
    org_id: str | None = None
    billing_admin: bool = False
    # The token's `exp` (Unix time): a websocket closes then. Not part of who the user is.
    expires_at: float | None = field(default=None, compare=False)

    @property
    def owner_key(self) -> str:
        """The account the viewer is billed through: the active organisation's, else their own."""
        return self.id if self.org_id is None else org_key(self.org_id)


@dataclass(frozen=True, slots=True)
class ServicePrincipal:
    """The host app's backend, calling with `SERVICE_API_KEY`."""

    name: str = "service"


Principal = User | ServicePrincipal


class AuthUnavailable(Exception):
    """Tokens cannot be checked right now (the identity provider's keys are unreachable)."""


def unauthenticated(message: str) -> BillingError:
    return BillingError(message, code=ErrorCode.UNAUTHENTICATED)


class JwksKeys:
    """The identity provider's RS256 keys, fetched with httpx and cached by `kid`."""

    def __init__(
        self,
        url: str,
        *,
        refetch_interval: float = JWKS_REFETCH_INTERVAL,
        retry_interval: float = JWKS_RETRY_INTERVAL,
        timeout: float = JWKS_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.refetch_interval = refetch_interval
        self.retry_interval = retry_interval
        self.timeout = timeout
        self.clock = clock
        self.fetches = 0  # attempts, for observability and tests
        self._keys: dict[str | None, RSAPublicKey] | None = None
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> RSAPublicKey:
        found = self._lookup(kid)
        if found is not None:
            return found
        async with self._lock:
            found = self._lookup(kid)  # fetched by a concurrent request meanwhile
            if found is None and self._may_fetch():
                await self._fetch()
                found = self._lookup(kid)
        if found is not None:
            return found
        if self._keys is None:
            raise AuthUnavailable(f"no signing keys could be fetched from AUTH_JWKS_URL ({self.url})")
        raise unauthenticated("invalid token: signed with an unknown key")

    def _lookup(self, kid: str | None) -> RSAPublicKey | None:
        if self._keys is None:
            return None
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    def _may_fetch(self) -> bool:
        if self._last_attempt is None:
            return True
        interval = self.retry_interval if self._keys is None else self.refetch_interval
        return self.clock() - self._last_attempt >= interval

    async def _fetch(self) -> None:
        self._last_attempt = self.clock()
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.get(self.url, headers={"Accept": "application/json"})
                response.raise_for_status()
                keys = _parse_jwks(response.json())
        except (httpx.HTTPError, ValueError, TypeError, KeyError) as exc:
            log.warning("cannot fetch JWKS from %s: %s", self.url, exc)
            return
        if not keys:
            log.warning("JWKS at %s holds no RS256 signing key", self.url)
            return
        self._keys = keys


def _parse_jwks(document: Any) -> dict[str | None, RSAPublicKey]:
    keys: dict[str | None, RSAPublicKey] = {}
    for data in document["keys"]:
        if not isinstance(data, dict) or data.get("kty") != "RSA":
            continue
        if data.get("use", "sig") != "sig" or data.get("alg", RS256) != RS256:
            continue
        try:
            key = jwt.PyJWK(data, algorithm=RS256).key
        except jwt.PyJWTError:
            continue
        if isinstance(key, RSAPublicKey):
            kid = data.get("kid")
            keys[kid if isinstance(kid, str) else None] = key
    return keys


class Authenticator:
    """Turns an `Authorization` header into a principal, or raises UNAUTHENTICATED."""

    def __init__(
        self,
        settings: Settings,
        *,
        jwks: JwksKeys | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.secret = settings.jwt_secret
        self.issuer = settings.auth_issuer
        self.audience = settings.auth_audience
        self.operator_ids = settings.operator_ids
        self.admin_claim = settings.auth_admin_claim
        self.admin_value = settings.auth_admin_value
        self.org_id_claims = settings.org_id_claims
        self.admin_roles = settings.admin_roles
        self.jwks = jwks or (JwksKeys(settings.auth_jwks_url) if settings.auth_jwks_url else None)
        key = settings.service_api_key
        self._service_key = key.get_secret_value().encode() if key is not None else None
        # token -> (user, monotonic deadline): a frontend sends the same token with every request
        # until it expires, and decoding and checking it again is most of the cost of auth.
        self._verified: OrderedDict[str, tuple[User, float]] = OrderedDict()
        self.clock = clock

    async def authenticate(self, authorization: str | None) -> Principal | None:
        """None without credentials; a principal for valid ones; UNAUTHENTICATED otherwise."""
        if authorization is None or not authorization.strip():
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthenticated("the Authorization header must be `Bearer <token>`")
        if self._service_key is not None and hmac.compare_digest(token.encode(), self._service_key):
            return ServicePrincipal()
        return await self.verify(token)

    def remembered(self, authorization: str | None) -> Principal | None:
        """The service, or the user of a bearer token verified less than a minute ago, without
        awaiting: the hot path of `authenticate` (None: call that)."""
        if authorization is None or authorization[:7] != "Bearer ":
            return None
        token = authorization[7:]
        if self._service_key is not None and hmac.compare_digest(token.encode(), self._service_key):
            return ServicePrincipal()
        remembered = self._verified.get(token)
        if remembered is None or self.clock() >= remembered[1]:
            return None
        return remembered[0]

    async def verify(self, token: str) -> User:
        if len(token) > MAX_TOKEN_LENGTH:
            raise unauthenticated("invalid token: too long")
        remembered = self._verified.get(token)
        if remembered is not None:
            if self.clock() < remembered[1]:
                self._verified.move_to_end(token)
                return remembered[0]
            del self._verified[token]  # verified again below: expired, or checked anew
        user, expires_at = await self._verify(token)
        deadline = self.clock() + min(VERIFIED_FOR, expires_at + CLOCK_SKEW_SECONDS - time.time())
        self._verified[token] = (user, deadline)
        if len(self._verified) > VERIFIED_TOKENS:
            self._verified.popitem(last=False)
        return user

    async def _verify(self, token: str) -> tuple[User, float]:
        """The token's user and its `exp` (Unix time), or UNAUTHENTICATED."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthenticated("invalid token: malformed") from None
        algorithm = header.get("alg")
        key: RSAPublicKey | str
        if algorithm == RS256 and self.jwks is not None:
            kid = header.get("kid")
            key = await self.jwks.key(kid if isinstance(kid, str) else None)
        elif algorithm == HS256 and self.secret is not None:
            key = self.secret
        else:
            raise unauthenticated(f"invalid token: algorithm {algorithm!r} is not accepted")
        claims = self._decode(token, key, algorithm)
        user = _user(claims)
        org_id = self._org_id(claims)
        user = replace(
            user,
            operator=user.id in self.operator_ids or self._admin_claim_matches(claims),
            org_id=org_id,
            billing_admin=org_id is not None
            and any(claim_at(claims, path) == value for path, value in self.admin_roles),
            expires_at=float(claims["exp"]),
        )
        return user, float(claims["exp"])

    def _org_id(self, claims: dict[str, Any]) -> str | None:
        """The active organisation: the first AUTH_ORG_ID_CLAIMS path holding a usable id."""
        for path in self.org_id_claims:
            value = claim_at(claims, path)
            if isinstance(value, str) and is_user_id(value) and len(value) <= MAX_ORG_ID_LENGTH:
                return value
        return None

    def _admin_claim_matches(self, claims: dict[str, Any]) -> bool:
        """AUTH_ADMIN_CLAIM (a dotted path into the claims) holds exactly AUTH_ADMIN_VALUE."""
        if self.admin_claim is None or self.admin_value is None:
            return False
        return bool(claim_at(claims, self.admin_claim) == self.admin_value)

    def _decode(self, token: str, key: RSAPublicKey | str, algorithm: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthenticated("token not yet valid") from None
        except jwt.InvalidIssuerError:
            raise unauthenticated("invalid token: wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise unauthenticated("invalid token: wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise unauthenticated(f"invalid token: no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise unauthenticated("invalid token: bad signature") from None
        except jwt.PyJWTError:
            raise unauthenticated("invalid token") from None


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The claim at a dotted path (`metadata.role`), or None; only objects are walked into."""
    found: Any = claims
    for part in path.split("."):
        if not isinstance(found, dict) or part not in found:
            return None
        found = found[part]
    return found


def _user(claims: dict[str, Any]) -> User:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not is_user_id(subject):
        raise unauthenticated(
            "invalid token: `sub` must be a user id of 1 to 255 characters, none of them control characters"
        )
    if subject.startswith(ORG_PREFIX):  # the prefix of organisations' owner keys (billing/owners.py)
        raise unauthenticated(f"invalid token: a user id may not begin with {ORG_PREFIX!r}")
    return User(
        id=subject,
        email=_profile_claim(claims.get("email"), MAX_EMAIL_LENGTH),
        name=_profile_claim(claims.get("name"), MAX_NAME_LENGTH),
    )


def _profile_claim(value: Any, limit: int) -> str | None:
    """`email` or `name`, left out when it is not text the account row (and Stripe) can hold."""
    if isinstance(value, str) and 0 < len(value) <= limit and is_plain_text(value):
        return value
    return None


def issue_dev_token(
    settings: Settings,
    user_id: str,
    *,
    email: str | None = None,
    name: str | None = None,
    ttl: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> str:
    """An HS256 user token for development (`billing token`). Refused in production."""
    if settings.is_production:
        raise ConfigurationError(
            "`billing token` issues development tokens and is refused with ENVIRONMENT=production"
        )
    secret = settings.jwt_secret
    if secret is None:
        raise ConfigurationError(
            "AUTH_JWT_SECRET is not set: with AUTH_JWKS_URL, user tokens come from the identity provider"
        )
    issued = now or utcnow()
    claims: dict[str, Any] = {"sub": user_id, "iat": issued, "nbf": issued, "exp": issued + ttl}
    if email is not None:
        claims["email"] = email
    if name is not None:
        claims["name"] = name
    if settings.auth_issuer is not None:
        claims["iss"] = settings.auth_issuer
    if settings.auth_audience is not None:
        claims["aud"] = settings.auth_audience
    return jwt.encode(claims, secret, algorithm=HS256)
