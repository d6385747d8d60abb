"""Reading Stripe objects at the boundary: times become aware UTC datetimes, ids are strings.

Stripe sends seconds since the epoch (the seed's "multiply by 1000" pitfall is JavaScript's);
here every one of them becomes a timezone-aware UTC `datetime` as soon as it is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def stripe_time(seconds: int | float | None) -> datetime | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(int(seconds), tz=UTC)


def field(obj: Any, key: str) -> Any:
    """A field of a Stripe object or of the plain dict of one (event payloads)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    try:
        return obj[key]
    except (KeyError, TypeError):
        return getattr(obj, key, None)


def object_id(value: Any) -> str | None:
    """The id of an expandable field: an id string or an expanded object."""
    if value is None or isinstance(value, str):
        return value
    found = field(value, "id")
    return str(found) if found is not None else None


def metadata(obj: Any) -> dict[str, str]:
    raw = field(obj, "metadata")
    if raw is None:
        return {}
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    return {str(key): str(value) for key, value in dict(raw).items()}


def invoice_subscription_id(invoice: Any) -> str | None:
    """An invoice names its subscription under `parent.subscription_details` in this API version."""
    details = field(field(invoice, "parent"), "subscription_details")
    found = object_id(field(details, "subscription"))
    return found or object_id(field(invoice, "subscription"))  # older API versions
