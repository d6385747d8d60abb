"""Domain notifications: what a host app may want to tell a customer or its staff.

One small interface; the default writes a structured log line. Host apps plug in email by
passing their own `Notifier` to `create_app(notifier=...)`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

log = logging.getLogger("billing.notifications")


class NotificationKind(StrEnum):
    PAYMENT_FAILED = "payment_failed"
    PAYMENT_ACTION_REQUIRED = "payment_action_required"
    TRIAL_ENDING = "trial_ending"
    SUBSCRIPTION_CANCELED = "subscription_canceled"
    MULTIPLE_LIVE_SUBSCRIPTIONS = "multiple_live_subscriptions"


@dataclass(frozen=True)
class Notification:
    kind: NotificationKind
    stripe_customer_id: str
    user_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Notifier(Protocol):
    async def notify(self, notification: Notification) -> None: ...


class LogNotifier:
    """Writes each notification as one JSON log line."""

    async def notify(self, notification: Notification) -> None:
        log.warning("notification %s", json.dumps(asdict(notification), default=str, sort_keys=True))
