"""Cross-site posting protection for the dashboard's forms (the hosted pages mimic Stripe's,
which a customer reaches by a link and whose forms carry no secret).

Double-submit token: the dashboard sets a random token in an HttpOnly, SameSite=Strict cookie and
puts the same token into a hidden field of every form; a POST must carry both, equal. Besides,
a browser's `Sec-Fetch-Site` must say `same-origin` and its `Origin`, when sent, must be the
host the request came to. A page on another site can neither read the cookie nor set the field.
"""

from __future__ import annotations

import hmac
import html
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "sbx_csrf"
FIELD = "csrf_token"


def token_of(request: Request) -> str | None:
    found = request.cookies.get(COOKIE)
    return found if found and len(found) >= 32 else None


def new_token() -> str:
    return secrets.token_urlsafe(32)


def set_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        path=str(request.scope.get("root_path", "")) or "/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def hidden_field(token: str) -> str:
    return f'<input type="hidden" name="{FIELD}" value="{html.escape(token, quote=True)}">'


def refusal(request: Request, fields: dict[str, str]) -> str | None:
    """Why this POST is refused as possibly cross-site, or None when it is the dashboard's own."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site != "same-origin":
        return f"the form was posted from another site (Sec-Fetch-Site: {fetch_site})"
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        return "the form was posted from another origin"
    cookie = token_of(request)
    given = fields.get(FIELD, "")
    if cookie is None or not hmac.compare_digest(cookie.encode(), given.encode()):
        return "the form's token does not match this browser's (reload the dashboard)"
    return None
