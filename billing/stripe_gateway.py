"""The one way this project talks to Stripe: the official SDK's async client, wrapped.

Everything that calls Stripe goes through `StripeGateway.call`, which adds what every call needs:
an idempotency key (deterministic where a retry must not duplicate), bounded retries (the SDK's
own for 5xx, 409 and connection errors; ours for 429, which the SDK retries only when Stripe
says `Stripe-Should-Retry: true`), timeouts, and the mapping of Stripe's errors to domain errors
with stable codes. With no secret key configured the same SDK talks to the local sandbox.

Never call Stripe while a database transaction is open: it would hold locks for the length of
a network round trip (and on SQLite deadlock against the sandbox's own writes).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import stripe
from stripe import RequestOptions
from stripe._base_address import BaseAddresses

from billing import tracing
from billing.errors import BillingError, ErrorCode
from billing.logs import STRIPE_REQUEST_ID
from billing.metrics import STRIPE_DURATION, STRIPE_REQUESTS, STRIPE_RETRIES, stripe_operation
from billing.settings import Settings

log = logging.getLogger("billing.stripe")

T = TypeVar("T")

SANDBOX_API_KEY = "sk_test_local_sandbox"


def api_version() -> str:
    """The API version pinned by the installed SDK; webhook endpoints must use the same."""
    from stripe._api_version import _ApiVersion

    return str(_ApiVersion.CURRENT)


def idempotency_key(kind: str, *parts: object) -> str:
    """A deterministic key: the same logical request always carries the same key."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()[:32]
    return f"billing:{kind}:{digest}"


def random_idempotency_key(kind: str) -> str:
    """For requests that are new each time, but whose retries must not duplicate."""
    return f"billing:{kind}:{uuid.uuid4().hex}"


@dataclass(frozen=True)
class GatewayConfig:
    api_key: str = field(repr=False)  # never in logs or tracebacks
    api_base: str | None = None  # None: Stripe's own API
    timeout_seconds: float = 20.0
    max_network_retries: int = 2
    rate_limit_retries: int = 3
    rate_limit_base_delay: float = 0.5

    @classmethod
    def from_settings(cls, settings: Settings, *, public_base_url: str | None = None) -> GatewayConfig:
        if settings.sandbox_mode:
            base = settings.stripe_api_base or f"{public_base_url or settings.service_url}/sandbox"
            return cls(api_key=SANDBOX_API_KEY, api_base=base)
        assert settings.stripe_secret_key is not None
        return cls(api_key=settings.stripe_secret_key.get_secret_value(), api_base=settings.stripe_api_base)


class StripeGateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self._sleep = sleep
        base_addresses: BaseAddresses | None = (
            {"api": config.api_base, "files": config.api_base, "connect": config.api_base}
            if config.api_base
            else None
        )
        self.http_client = stripe.HTTPXClient(timeout=config.timeout_seconds)
        self.client = stripe.StripeClient(
            config.api_key,
            base_addresses=base_addresses,
            http_client=self.http_client,
            max_network_retries=config.max_network_retries,
        )

    @property
    def v1(self) -> stripe.V1Services:  # type: ignore[name-defined]
        return self.client.v1

    async def call(
        self,
        operation: Callable[[RequestOptions], Awaitable[T]],
        *,
        idempotency_key: str | None = None,
        what: str = "stripe call",
    ) -> T:
        """Run one SDK call, passing it the request options it must use.

        `operation` receives the options and calls the SDK, e.g.
        `lambda options: gateway.v1.customers.create_async(params, options)`.
        """
        label = stripe_operation(what)
        started = time.perf_counter()
        outcome = "error"
        try:
            with tracing.span(f"stripe {label}", attributes={"stripe.operation": label}):
                result = await self._call(operation, idempotency_key, what)
            outcome = "ok"
            return result
        except _RateLimited:
            outcome = "rate_limited"
            raise
        except BillingError as exc:
            outcome = _OUTCOMES.get(exc.code, "error")
            raise
        finally:
            STRIPE_DURATION.labels(label).observe(time.perf_counter() - started)
            STRIPE_REQUESTS.labels(label, outcome).inc()

    async def _call(
        self,
        operation: Callable[[RequestOptions], Awaitable[T]],
        idempotency_key: str | None,
        what: str,
    ) -> T:
        options: RequestOptions = {}
        if idempotency_key is not None:
            options["idempotency_key"] = idempotency_key
        attempt = 0
        while True:
            try:
                result = await operation(options)
            except stripe.RateLimitError as exc:
                if attempt >= self.config.rate_limit_retries:
                    log.warning(
                        "%s: rate limited after %d retries (%s)",
                        what,
                        attempt,
                        exc.request_id,
                        extra={STRIPE_REQUEST_ID: exc.request_id},
                    )
                    raise _unavailable(what, rate_limited=True) from exc
                delay = self.config.rate_limit_base_delay * 2**attempt
                attempt += 1
                STRIPE_RETRIES.labels("rate_limited").inc()
                await self._sleep(delay + random.uniform(0, delay / 2))
                continue
            except stripe.CardError as exc:
                raise BillingError(
                    exc.user_message or "The card was declined.",
                    code=ErrorCode.CARD_DECLINED,
                    decline_code=getattr(exc.error, "decline_code", None) if exc.error else None,
                ) from exc
            except (stripe.APIConnectionError, stripe.APIError) as exc:
                log.warning(
                    "%s: Stripe unavailable: %s (request %s)",
                    what,
                    type(exc).__name__,
                    exc.request_id,
                    extra={STRIPE_REQUEST_ID: exc.request_id},
                )
                raise _unavailable(what) from exc
            except stripe.StripeError as exc:
                log.error(
                    "%s: Stripe refused the request: %s (code %s, request %s)",
                    what,
                    exc.user_message or str(exc),
                    exc.code,
                    exc.request_id,
                    extra={STRIPE_REQUEST_ID: exc.request_id},
                )
                raise BillingError(
                    "The billing provider refused the request.",
                    code=ErrorCode.INVALID_REQUEST,
                    stripe_code=exc.code,
                    http_status=exc.http_status,
                ) from exc
            if log.isEnabledFor(logging.DEBUG):
                request_id = getattr(getattr(result, "last_response", None), "request_id", None)
                log.debug("%s: done (request %s)", what, request_id, extra={STRIPE_REQUEST_ID: request_id})
            return result

    async def close(self) -> None:
        await self.http_client.close_async()  # type: ignore[no-untyped-call]


# The outcome label of a call that ended in a domain error.
_OUTCOMES = {
    ErrorCode.CARD_DECLINED: "card_declined",
    ErrorCode.BILLING_PROVIDER_UNAVAILABLE: "unavailable",
    ErrorCode.INVALID_REQUEST: "refused",
}


class _RateLimited(BillingError):
    """Stripe kept answering 429: unavailable, counted as `rate_limited`."""


def _unavailable(what: str, *, rate_limited: bool = False) -> BillingError:
    kind = _RateLimited if rate_limited else BillingError
    return kind(
        "The billing provider is unavailable; try again shortly.",
        code=ErrorCode.BILLING_PROVIDER_UNAVAILABLE,
        operation=what,
    )
