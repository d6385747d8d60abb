"""Settings: defaults that run with no set-up, and every production refusal naming its setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from billing.errors import ConfigurationError
from billing.settings import (
    DEV_HOST_WEBHOOK_SECRET,
    DEV_JWT_SECRET,
    DEV_WEBHOOK_SECRET,
    Settings,
    load_settings,
)

SETTING_NAMES = [
    "ENVIRONMENT",
    "DATABASE_URL",
    "STRIPE_SECRET_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_API_BASE",
    "PUBLIC_BASE_URL",
    "APP_URL",
    "AUTH_JWT_SECRET",
    "AUTH_JWKS_URL",
    "AUTH_ISSUER",
    "AUTH_AUDIENCE",
    "SERVICE_API_KEY",
    "BILLING_PLANS_FILE",
    "METRICS_TOKEN",
    "METRICS_ENABLED",
    "LOG_FORMAT",
    "HOST_WEBHOOK_URL",
    "HOST_WEBHOOK_SECRET",
    "HOST_WEBHOOK_EVENTS",
    "HOST_WEBHOOK_RETRY_SCHEDULE",
]
STRONG = "s" * 40
HOST_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PRODUCTION = {
    "ENVIRONMENT": "production",
    "STRIPE_SECRET_KEY": "sk_test_123",
    "STRIPE_WEBHOOK_SECRET": "whsec_real",
    "AUTH_JWT_SECRET": STRONG,
    "METRICS_TOKEN": STRONG,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def configure(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_development_needs_no_configuration() -> None:
    settings = load_settings()
    assert settings.database_url == "sqlite+aiosqlite:///./billing.db"
    assert settings.sandbox_mode
    assert settings.webhook_secrets == [DEV_WEBHOOK_SECRET]
    assert settings.jwt_secret == DEV_JWT_SECRET


def test_a_complete_production_configuration_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, PRODUCTION)
    settings = load_settings()
    assert settings.is_production and not settings.sandbox_mode


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"STRIPE_SECRET_KEY": None}, "STRIPE_SECRET_KEY"),
        ({"STRIPE_WEBHOOK_SECRET": None}, "STRIPE_WEBHOOK_SECRET"),
        ({"STRIPE_WEBHOOK_SECRET": DEV_WEBHOOK_SECRET}, "STRIPE_WEBHOOK_SECRET"),
        ({"AUTH_JWT_SECRET": None}, "AUTH_JWT_SECRET or AUTH_JWKS_URL"),
        ({"AUTH_JWT_SECRET": DEV_JWT_SECRET}, "AUTH_JWT_SECRET"),
        ({"AUTH_JWT_SECRET": "changethis"}, "AUTH_JWT_SECRET"),
        ({"SERVICE_API_KEY": "changeme"}, "SERVICE_API_KEY"),
        ({"METRICS_TOKEN": None}, "METRICS_TOKEN is not set"),
        ({"METRICS_TOKEN": "changeme"}, "METRICS_TOKEN"),
        (
            {
                "STRIPE_SECRET_KEY": "sk_live_abc",
                "STRIPE_API_BASE": "http://127.0.0.1:8000/sandbox",
            },
            "STRIPE_API_BASE",
        ),
        (
            {"STRIPE_SECRET_KEY": "rk_live_abc", "STRIPE_API_BASE": "https://evil.example.com"},
            "STRIPE_API_BASE",
        ),
        (
            {"HOST_WEBHOOK_URL": "http://app.example.com/hooks", "HOST_WEBHOOK_SECRET": HOST_SECRET},
            "HOST_WEBHOOK_URL is not https",
        ),
        ({"HOST_WEBHOOK_URL": "https://app.example.com/hooks"}, "HOST_WEBHOOK_SECRET is not set"),
        (
            {
                "HOST_WEBHOOK_URL": "https://app.example.com/hooks",
                "HOST_WEBHOOK_SECRET": DEV_HOST_WEBHOOK_SECRET,
            },
            "HOST_WEBHOOK_SECRET holds the development secret",
        ),
    ],
)
def test_production_refuses_unsafe_configuration(
    monkeypatch: pytest.MonkeyPatch, change: dict[str, str | None], named: str
) -> None:
    configure(monkeypatch, {k: v for k, v in {**PRODUCTION, **change}.items() if v is not None})
    with pytest.raises(ConfigurationError, match=named):
        load_settings()


def test_production_may_turn_metrics_off_instead_of_setting_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    production = {k: v for k, v in PRODUCTION.items() if k != "METRICS_TOKEN"}
    configure(monkeypatch, {**production, "METRICS_ENABLED": "false"})
    settings = load_settings()
    assert not settings.metrics_enabled and settings.metrics_token is None and settings.logs_as_json


def test_jwks_alone_is_a_valid_production_auth_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(
        monkeypatch,
        {**PRODUCTION, "AUTH_JWKS_URL": "https://idp.example.com/.well-known/jwks.json"},
    )
    monkeypatch.delenv("AUTH_JWT_SECRET")
    settings = load_settings()
    assert settings.jwt_secret is None


def test_a_live_key_is_never_sent_to_another_host_even_in_development(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(monkeypatch, {"STRIPE_SECRET_KEY": "sk_live_x", "STRIPE_API_BASE": "http://localhost:9999"})
    with pytest.raises(ConfigurationError, match="STRIPE_API_BASE"):
        load_settings()


def test_a_test_key_may_point_at_a_local_emulator_in_production(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(monkeypatch, {**PRODUCTION, "STRIPE_API_BASE": "http://127.0.0.1:12111"})
    assert load_settings().stripe_api_base == "http://127.0.0.1:12111"


def test_a_live_key_may_name_stripe_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(
        monkeypatch,
        {
            **PRODUCTION,
            "STRIPE_SECRET_KEY": "sk_live_x",
            "STRIPE_API_BASE": "https://api.stripe.com",
        },
    )
    assert load_settings().stripe_api_base == "https://api.stripe.com"


def test_webhook_secrets_rotate_as_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, {"STRIPE_WEBHOOK_SECRET": "whsec_new, whsec_old"})
    assert load_settings().webhook_secrets == ["whsec_new", "whsec_old"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "mysql://root@localhost/x"),
        ("ENVIRONMENT", "staging"),
        ("APP_URL", "ftp://example.com"),
        ("STRIPE_WEBHOOK_SECRET", " , "),
        ("HOST_WEBHOOK_URL", "app.example.com/hooks"),
        ("HOST_WEBHOOK_SECRET", "not-a-whsec-secret"),
        ("HOST_WEBHOOK_EVENTS", "subscription.created,subscription.exploded"),
        ("HOST_WEBHOOK_RETRY_SCHEDULE", "5,soon"),
        ("HOST_WEBHOOK_RETRY_SCHEDULE", "-1"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    configure(monkeypatch, {name: value})
    with pytest.raises(ConfigurationError, match=name):
        load_settings()


def test_postgres_urls_are_normalised_to_asyncpg(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, {"DATABASE_URL": "postgresql://u:p@db.internal:5432/billing"})
    assert load_settings().database_url == "postgresql+asyncpg://u:p@db.internal:5432/billing"


def test_settings_are_read_from_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("APP_URL=https://app.example.com\n")
    assert Settings().app_url == "https://app.example.com"


def test_secrets_do_not_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    configure(monkeypatch, PRODUCTION)
    shown = repr(load_settings())
    assert STRONG not in shown and "sk_test_123" not in shown and "whsec_real" not in shown


def test_host_webhooks_in_production_over_https_with_rotating_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = "whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCBlbnRpcmVseQ=="
    configure(
        monkeypatch,
        {
            **PRODUCTION,
            "HOST_WEBHOOK_URL": "https://app.example.com/hooks/billing",
            "HOST_WEBHOOK_SECRET": f"{HOST_SECRET}, {other}",
            "HOST_WEBHOOK_EVENTS": "payment.failed, subscription.canceled",
            "HOST_WEBHOOK_RETRY_SCHEDULE": "1,60,3600",
        },
    )
    settings = load_settings()
    assert settings.host_webhook_secrets == [HOST_SECRET, other]
    assert settings.host_event_types == {"payment.failed", "subscription.canceled"}
    assert settings.host_retry_delays == [1.0, 60.0, 3600.0]
    assert HOST_SECRET in settings.secret_values()


def test_the_default_retry_schedule_spans_at_least_three_days() -> None:
    delays = load_settings().host_retry_delays
    assert sum(delays) >= 3 * 86_400
    assert delays[0] < 60 <= max(delays[:3]) and max(delays) >= 3600  # seconds, minutes, hours
    assert load_settings().host_webhook_url is None  # no host events unless configured
