"""The admin console's session and anti-forgery token.

Signing in (`POST /admin/sign-in`) checks an operator token once, with the service's own
authenticator (graph/auth.py); the browser then keeps a signed, short-lived (`SESSION_SECONDS`)
cookie naming the operator: `HttpOnly`, `SameSite=Strict`, `Secure` in production, path
`/admin`. `itsdangerous` signs it with a key derived from the service's secrets (the webhook
signing secrets, AUTH_JWT_SECRET, SERVICE_API_KEY), so every worker process accepts it and a
rotation of those secrets signs everyone out.

Every form carries an anti-forgery token: the session's own (a random value inside the signed
cookie), or before signing in a double-submit token (an `HttpOnly`, `SameSite=Strict` cookie and
the same value in the form). A POST must carry the field, equal to it; besides, a browser's
`Sec-Fetch-Site` must say `same-origin` and its `Origin`, when sent, must be this host.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from billing.settings import Settings

SESSION_COOKIE = "billing_admin"
CSRF_COOKIE = "billing_admin_csrf"
CSRF_FIELD = "csrf_token"
SESSION_SECONDS = 3600
ADMIN_PATH = "/admin"


@dataclass(frozen=True, slots=True)
class Session:
    operator: str  # a user id, or `service` for the service key
    csrf: str
    listed: bool = False  # an operator by ADMIN_USER_IDS: checked again on every request


def session_key(settings: Settings) -> bytes:
    """A key of its own for the console, derived from the service's secrets (never one of them)."""
    parts = list(settings.webhook_secrets)
    if settings.jwt_secret is not None:
        parts.append(settings.jwt_secret)
    if settings.service_api_key is not None:
        parts.append(settings.service_api_key.get_secret_value())
    return hmac.new(b"graph.admin.session", "\0".join(parts).encode(), hashlib.sha256).digest()


class Sessions:
    def __init__(self, settings: Settings, *, max_age: int = SESSION_SECONDS) -> None:
        self._serializer = URLSafeTimedSerializer(session_key(settings), salt="billing-admin-session")
        self.max_age = max_age
        self.secure = settings.is_production
        self.operator_ids = settings.operator_ids

    def read(self, request: Request) -> Session | None:
        value = request.cookies.get(SESSION_COOKIE)
        if not value:
            return None
        try:
            data = self._serializer.loads(value, max_age=self.max_age)
        except BadSignature:  # tampered with, or older than max_age (SignatureExpired)
            return None
        if not isinstance(data, dict):
            return None
        operator, csrf = data.get("op"), data.get("csrf")
        if not isinstance(operator, str) or not isinstance(csrf, str) or not operator or len(csrf) < 32:
            return None
        listed = data.get("listed") is True
        if listed and operator not in self.operator_ids:
            return None  # taken off ADMIN_USER_IDS since signing in: signed out at once
        return Session(operator=operator, csrf=csrf, listed=listed)

    def start(self, response: Response, request: Request, operator: str, *, listed: bool) -> Session:
        session = Session(operator=operator, csrf=secrets.token_urlsafe(32), listed=listed)
        value = self._serializer.dumps({"op": operator, "csrf": session.csrf, "listed": listed})
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=self.max_age,
            path=_path(request),
            httponly=True,
            samesite="strict",
            secure=self.secure,
        )
        return session

    def end(self, response: Response, request: Request) -> None:
        response.delete_cookie(
            SESSION_COOKIE, path=_path(request), httponly=True, samesite="strict", secure=self.secure
        )

    def pre_session_token(self, request: Request) -> tuple[str, bool]:
        """The double-submit token of the sign-in form, and whether it is new (no cookie yet)."""
        token = request.cookies.get(CSRF_COOKIE)
        if token and len(token) >= 32:
            return token, False
        return secrets.token_urlsafe(32), True

    def set_pre_session_token(self, response: Response, request: Request, token: str) -> None:
        response.set_cookie(
            CSRF_COOKIE,
            token,
            max_age=self.max_age,
            path=_path(request),
            httponly=True,
            samesite="strict",
            secure=self.secure,
        )


def _path(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}{ADMIN_PATH}"


def hidden_field(token: str) -> str:
    return f'<input type="hidden" name="{CSRF_FIELD}" value="{html.escape(token, quote=True)}">'


def forgery(request: Request, fields: dict[str, str], expected: str | None) -> str | None:
    """Why this POST is refused as possibly forged, or None when it is the console's own form."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site != "same-origin":
        return f"the form was posted from another site (Sec-Fetch-Site: {fetch_site})"
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        return "the form was posted from another origin"
    given = fields.get(CSRF_FIELD, "")
    if not expected or not given or not hmac.compare_digest(expected.encode(), given.encode()):
        return "the form's anti-forgery token is missing or wrong (reload the page)"
    return None
