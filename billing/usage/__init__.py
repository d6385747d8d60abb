"""Usage metering: recording (`recording.py`), quota windows and reading (`windows.py`),
reporting to Stripe's meters (`reporting.py`).

The names a host app or a resolver needs are importable from `billing.usage` itself.
"""

from billing.usage.recording import RecordedUsage, UsageInput, record_usage, validate_usage
from billing.usage.window_totals import hour_of
from billing.usage.windows import (
    DailyUsage,
    Entitlement,
    QuotaCheck,
    UsageSummary,
    Window,
    daily_usage,
    entitlements,
    monthly_window,
    quota_check,
    quota_window,
    usage_summary,
    window_usage,
)

__all__ = [
    "DailyUsage",
    "Entitlement",
    "QuotaCheck",
    "RecordedUsage",
    "UsageInput",
    "UsageSummary",
    "Window",
    "daily_usage",
    "entitlements",
    "hour_of",
    "monthly_window",
    "quota_check",
    "quota_window",
    "record_usage",
    "usage_summary",
    "validate_usage",
    "window_usage",
]
