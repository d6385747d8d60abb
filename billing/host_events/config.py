"""The host-event settings, as the writer and the delivery worker take them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from billing.host_events.delivery import DeliveryConfig
from billing.host_events.events import HostEventConfig
from billing.settings import Settings


def host_event_config(
    settings: Settings, *, kick: Callable[[], None] | None = None
) -> HostEventConfig | None:
    """What syncs write to the outbox; None (write nothing) while HOST_WEBHOOK_URL is unset."""
    if settings.host_webhook_url is None:
        return None
    return HostEventConfig(
        types=settings.host_event_types,
        past_due_grace=timedelta(days=settings.past_due_grace_days),
        kick=kick,
    )


def delivery_config(settings: Settings) -> DeliveryConfig | None:
    if settings.host_webhook_url is None:
        return None
    return DeliveryConfig(
        url=settings.host_webhook_url,
        secrets=settings.host_webhook_secrets,
        delays=settings.host_retry_delays,
    )
