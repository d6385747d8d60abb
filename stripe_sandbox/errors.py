"""Stripe's error responses: `{"error": {"type", "code", "message", "param"}}`."""

from __future__ import annotations

from typing import Any


class StripeError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.decline_code = decline_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            error["param"] = self.param
        if self.decline_code:
            error["decline_code"] = self.decline_code
        return {"error": error}


def resource_missing(object_name: str, object_id: str, param: str = "id") -> StripeError:
    return StripeError(404, f"No such {object_name}: '{object_id}'", code="resource_missing", param=param)


def parameter_unknown(param: str) -> StripeError:
    return StripeError(
        400,
        f"Received unknown parameter: {param}",
        code="parameter_unknown",
        param=param,
    )


def parameter_missing(param: str) -> StripeError:
    return StripeError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def parameter_invalid(param: str, message: str, code: str = "parameter_invalid") -> StripeError:
    return StripeError(400, message, code=code, param=param)


def card_declined(message: str = "Your card was declined.") -> StripeError:
    return StripeError(402, message, type="card_error", code="card_declined", decline_code="generic_decline")


def unsupported(param: str, what: str = "") -> StripeError:
    detail = f" ({what})" if what else ""
    return StripeError(400, f"The Stripe sandbox does not support `{param}`{detail}.", param=param)
