"""Domain errors. Each carries a stable code that the GraphQL layer exposes as `extensions.code`."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    FORBIDDEN_TIER = "FORBIDDEN_TIER"
    FEATURE_NOT_IN_PLAN = "FEATURE_NOT_IN_PLAN"
    BAD_USER_INPUT = "BAD_USER_INPUT"
    NO_BILLING_ACCOUNT = "NO_BILLING_ACCOUNT"
    ALREADY_SUBSCRIBED = "ALREADY_SUBSCRIBED"
    NO_SUBSCRIPTION = "NO_SUBSCRIPTION"
    INVALID_PLAN = "INVALID_PLAN"
    CARD_DECLINED = "CARD_DECLINED"
    BILLING_PROVIDER_UNAVAILABLE = "BILLING_PROVIDER_UNAVAILABLE"
    INVALID_REQUEST = "INVALID_REQUEST"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class BillingError(Exception):
    """An expected failure, safe to show to the caller."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None, **extensions: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extensions = extensions


class ConfigurationError(Exception):
    """The service cannot start as configured. The message names the setting and the fix."""
