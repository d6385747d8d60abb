"""The service's settings, read from the environment and `.env`.

The environment variable names are a public contract (docs/settings.md).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.errors import ConfigurationError
from billing.rate_limit import Rate
from db.engine import DatabaseURLError, parse_database_url

# Development-only values, so the quick start needs no configuration. Production refuses them.
DEV_WEBHOOK_SECRET = "whsec_development_only_not_a_secret"
DEV_JWT_SECRET = "development-only-jwt-secret-not-for-production"
STRIPE_API_HOSTS = {"api.stripe.com", "files.stripe.com", "connect.stripe.com"}
PLACEHOLDERS = {"changethis", "changeme", "secret", "password", "xxx", "todo"}
MIN_SECRET_LENGTH = 32
DEV_HOST_WEBHOOK_SECRET = "whsec_ZGV2ZWxvcG1lbnQtb25seS1ub3QtYS1zZWNyZXQ="  # base64 of a dev-only text
# Seconds before each retry of a host event: seconds, then minutes, then hours; 13 attempts over
# about 3.2 days, like the Standard Webhooks providers' own schedules.
DEFAULT_HOST_RETRY_SCHEDULE = "5,300,1800,7200,18000,36000,36000,36000,36000,36000,36000,36000"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", env_ignore_empty=True, extra="ignore"
    )

    environment: Literal["development", "production"] = "development"
    database_url: str = "sqlite+aiosqlite:///./billing.db"
    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_api_base: str | None = None
    public_base_url: str | None = None
    app_url: str = "http://localhost:3000"
    auth_jwt_secret: SecretStr | None = None
    auth_jwks_url: str | None = None
    auth_issuer: str | None = None
    auth_audience: str | None = None
    service_api_key: SecretStr | None = None
    # Operators (graph/permissions.py `IsOperator`): user ids, comma-separated; and/or a claim of
    # the operator's identity provider (a dotted path, e.g. `metadata.role`) with its exact value.
    admin_user_ids: str | None = None
    auth_admin_claim: str | None = None
    auth_admin_value: str | None = None
    # Organisations as billing owners (billing/owners.py): the dotted claim paths of the token's
    # active organisation id (the first one present wins), and the `claim=value` pairs that make a
    # member of it a billing admin (docs/permissions.md gives the source of each default).
    auth_org_id_claims: str = "o.id,org_id"
    billing_admin_roles: str = "o.rol=admin,org_role=org:admin,role=admin"
    # A past_due subscription keeps its tier for this many days after `current_period_start`
    # (a failed renewal has already moved the period); 0 = no grace. billing/access.py decides.
    past_due_grace_days: int = Field(default=7, ge=0, le=90)
    billing_plans_file: Path | None = None
    sandbox_database_url: str | None = None
    sandbox_dunning_final_action: Literal["cancel", "unpaid"] = "cancel"
    sandbox_sync_catalog: bool = True
    webhook_worker: bool = True
    # Run the usage reporter (usage records -> Stripe meter events) in this process.
    usage_reporter: bool = True
    # Events for the host app's backend (billing/host_events/): one Standard Webhooks endpoint,
    # its `whsec_` secrets (comma-separated while rotating: every message is signed with each),
    # the event types to send (comma-separated; unset = all), and the delays in seconds before
    # each retry. Nothing is written to the outbox while HOST_WEBHOOK_URL is unset.
    host_webhook_url: str | None = None
    host_webhook_secret: SecretStr | None = None
    host_webhook_events: str | None = None
    host_webhook_retry_schedule: str = DEFAULT_HOST_RETRY_SCHEDULE
    # Run the host-event delivery worker in this process (when HOST_WEBHOOK_URL is set).
    host_events_worker: bool = True
    # The largest quantity one usage record may carry (recordUsage refuses more: BAD_USER_INPUT).
    usage_max_quantity: int = Field(default=1_000_000, ge=1, le=2**31 - 1)
    # GraphQL abuse limits (graph/limits.py), checked before any resolver runs.
    graphql_max_depth: int = Field(default=15, ge=1, le=200)
    graphql_max_aliases: int = Field(default=30, ge=0, le=100_000)
    graphql_max_tokens: int = Field(default=1000, ge=10, le=1_000_000)
    graphql_max_cost: int = Field(default=5000, ge=1, le=2**31 - 1)
    # The largest /graphql request body in bytes (413 beyond).
    max_request_bytes: int = Field(default=1_048_576, ge=1024, le=104_857_600)
    # Browser origins allowed to call /graphql, comma-separated (unset: APP_URL's origin in
    # development, none in production).
    cors_allow_origins: str | None = None
    # graphql-transport-ws limits: operations in flight on one connection, connections per process.
    ws_max_operations: int = Field(default=10, ge=1, le=1000)
    ws_max_connections: int = Field(default=1000, ge=1, le=1_000_000)
    # Per-user budget of the mutations that call Stripe: "N/second|minute|hour|day", or "off".
    rate_limit_stripe_mutations: str = "10/minute"
    # The lean GraphQL executor (graph/lean_executor.py) and asyncpg one-row reads (db/fast_read.py).
    fast_paths: bool = True
    # Seconds an account state read for a GraphQL request may answer later ones (billing/account_cache.py,
    # PostgreSQL with FAST_PATHS; dropped at once by each committed change's notification); 0 = off.
    account_cache_seconds: float = Field(default=10.0, ge=0, le=3600)
    # /docs (Swagger UI) and /openapi.json: unset = on in development, off in production.
    api_docs: bool | None = None
    log_level: str = Field(default="INFO")
    # One JSON object per line, or plain text (unset: json in production, text otherwise).
    log_format: Literal["json", "text"] | None = None
    # GET /metrics (Prometheus); with a token, scrapes need `Authorization: Bearer <token>`.
    metrics_enabled: bool = True
    metrics_token: SecretStr | None = None

    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: str) -> str:
        try:
            return parse_database_url(value).render_as_string(hide_password=False)
        except DatabaseURLError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("sandbox_database_url")
    @classmethod
    def _sandbox_url_parses(cls, value: str | None) -> str | None:
        return None if value is None else cls._database_url_parses(value)

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for origin in _split(value):
            parts = urlsplit(origin)
            if origin != "*" and (
                parts.scheme not in {"http", "https"} or not parts.netloc or parts.path not in {"", "/"}
            ):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or *)")
        return value

    @field_validator("rate_limit_stripe_mutations")
    @classmethod
    def _rate(cls, value: str) -> str:
        Rate.parse(value)  # raises ValueError naming the expected form
        return value

    @field_validator("auth_org_id_claims")
    @classmethod
    def _org_claims(cls, value: str) -> str:
        parse_claim_paths(value)
        return value

    @field_validator("billing_admin_roles")
    @classmethod
    def _admin_roles(cls, value: str) -> str:
        parse_admin_roles(value)
        return value

    @field_validator("host_webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        parse_retry_schedule(value)  # raises ValueError naming the expected form
        return value

    @field_validator("host_webhook_events")
    @classmethod
    def _host_event_types(cls, value: str | None) -> str | None:
        from billing.host_events.events import HOST_EVENT_TYPES

        if value is None:
            return None
        unknown = [name for name in _split(value) if name not in HOST_EVENT_TYPES]
        if unknown:
            raise ValueError(
                f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(HOST_EVENT_TYPES)}"
            )
        return value

    @field_validator("stripe_api_base", "public_base_url", "app_url", "auth_jwks_url", "host_webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _safe_configuration(self) -> Settings:
        problems = _problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # Derived values -----------------------------------------------------------------------

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def docs_enabled(self) -> bool:
        """Serve /docs and /openapi.json (`API_DOCS`; default: outside production only)."""
        return not self.is_production if self.api_docs is None else self.api_docs

    @property
    def sandbox_mode(self) -> bool:
        """No Stripe key: the SDK talks to the project's own Stripe sandbox."""
        return self.stripe_secret_key is None

    @property
    def service_url(self) -> str:
        """Where this service is reached (sandbox pages, sandbox webhook delivery)."""
        return self.public_base_url or "http://127.0.0.1:8000"

    def sandbox_database(self) -> tuple[str, str | None]:
        """The sandbox's own database: (url, PostgreSQL schema or None).

        Default: a second SQLite file beside the service's, or the `stripe_sandbox` schema of the
        service's PostgreSQL database.
        """
        if self.sandbox_database_url is not None:
            return self.sandbox_database_url, None
        url = parse_database_url(self.database_url)
        if url.get_backend_name() == "postgresql":
            return self.database_url, "stripe_sandbox"
        path = url.database or ""
        if path in {"", ":memory:"}:
            return "sqlite+aiosqlite:///./billing-sandbox.db", None
        stem, dot, suffix = path.rpartition(".")
        sandbox_path = f"{stem}-sandbox.{suffix}" if dot else f"{path}-sandbox"
        return url.set(database=sandbox_path).render_as_string(hide_password=False), None

    @property
    def cors_origins(self) -> list[str]:
        """Origins whose browsers may call /graphql (CORS, and websocket handshakes)."""
        if self.cors_allow_origins is not None:
            return [origin.rstrip("/") for origin in _split(self.cors_allow_origins)]
        if self.is_production:
            return []
        parts = urlsplit(self.app_url)
        return [f"{parts.scheme}://{parts.netloc}"]

    @property
    def stripe_mutations_rate(self) -> Rate | None:
        """RATE_LIMIT_STRIPE_MUTATIONS, parsed; None when off."""
        return Rate.parse(self.rate_limit_stripe_mutations)

    @cached_property
    def webhook_secrets(self) -> list[str]:
        """Every accepted signing secret; the first one signs the sandbox's events."""
        if self.stripe_webhook_secret is None:
            return [DEV_WEBHOOK_SECRET]
        return _split_secrets(self.stripe_webhook_secret)

    @property
    def jwt_secret(self) -> str | None:
        if self.auth_jwt_secret is not None:
            return self.auth_jwt_secret.get_secret_value()
        if self.auth_jwks_url is None and not self.is_production:
            return DEV_JWT_SECRET
        return None

    @property
    def operator_ids(self) -> frozenset[str]:
        """ADMIN_USER_IDS, parsed."""
        return frozenset(_split(self.admin_user_ids or ""))

    @property
    def org_id_claims(self) -> list[str]:
        """AUTH_ORG_ID_CLAIMS, parsed."""
        return parse_claim_paths(self.auth_org_id_claims)

    @property
    def admin_roles(self) -> list[tuple[str, str]]:
        """BILLING_ADMIN_ROLES, parsed: (claim path, exact value) pairs."""
        return parse_admin_roles(self.billing_admin_roles)

    @property
    def logs_as_json(self) -> bool:
        """LOG_FORMAT, with its default: JSON lines in production."""
        return self.log_format == "json" or (self.log_format is None and self.is_production)

    @property
    def metrics_token_value(self) -> str | None:
        return self.metrics_token.get_secret_value() if self.metrics_token is not None else None

    @cached_property
    def host_webhook_secrets(self) -> list[str]:
        """The `whsec_` secrets that sign every host event (all of them, during a rotation)."""
        if self.host_webhook_secret is None:
            return [DEV_HOST_WEBHOOK_SECRET]
        return _split_secrets(self.host_webhook_secret)

    @property
    def host_event_types(self) -> frozenset[str] | None:
        """HOST_WEBHOOK_EVENTS: the event types to send, or None for all."""
        return None if self.host_webhook_events is None else frozenset(_split(self.host_webhook_events))

    @property
    def host_retry_delays(self) -> list[float]:
        return parse_retry_schedule(self.host_webhook_retry_schedule)

    def secret_values(self) -> list[str]:
        """Every configured secret, for checks that none leaks into logs or responses."""
        values = [self.jwt_secret, *self.webhook_secrets]
        if self.host_webhook_secret is not None:
            values.extend(_split_secrets(self.host_webhook_secret))
        for secret in (self.stripe_secret_key, self.service_api_key, self.metrics_token):
            if secret is not None:
                values.append(secret.get_secret_value())
        return [value for value in values if value]


def parse_retry_schedule(raw: str) -> list[float]:
    """HOST_WEBHOOK_RETRY_SCHEDULE: comma-separated seconds before each retry, e.g. "5,300,1800"."""
    try:
        delays = [float(part) for part in _split(raw)]
    except ValueError:
        raise ValueError(f"{raw!r} is not a comma-separated list of seconds (e.g. 5,300,1800)") from None
    if not delays or any(not 0 <= delay <= 7 * 86400 for delay in delays):
        raise ValueError(f"{raw!r}: give at least one delay, each between 0 and 604800 seconds")
    return delays


def parse_claim_paths(raw: str) -> list[str]:
    """Comma-separated dotted claim paths, e.g. `o.id,org_id`."""
    paths = _split(raw)
    if any(not all(path.split(".")) for path in paths):
        raise ValueError(f"{raw!r} is not a comma-separated list of dotted claim paths (e.g. o.id,org_id)")
    return paths


def parse_admin_roles(raw: str) -> list[tuple[str, str]]:
    """Comma-separated `claim.path=value` pairs, e.g. `o.rol=admin,org_role=org:admin`."""
    pairs = []
    for part in _split(raw):
        path, sep, value = part.partition("=")
        path, value = path.strip(), value.strip()
        if not sep or not value or not path or not all(path.split(".")):
            raise ValueError(f"{part!r} is not a `claim.path=value` pair (e.g. o.rol=admin)")
        pairs.append((path, value))
    return pairs


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _split_secrets(raw: SecretStr) -> list[str]:
    return [part.strip() for part in raw.get_secret_value().split(",") if part.strip()]


def _is_weak(secret: str) -> bool:
    return secret.lower() in PLACEHOLDERS or len(secret) < MIN_SECRET_LENGTH


def _problems(settings: Settings) -> list[str]:
    problems: list[str] = []
    key = settings.stripe_secret_key.get_secret_value() if settings.stripe_secret_key else ""
    if key.startswith(("sk_live_", "rk_live_")) and settings.stripe_api_base is not None:
        host = urlsplit(settings.stripe_api_base).hostname or ""
        if host not in STRIPE_API_HOSTS:
            problems.append(
                "STRIPE_API_BASE points at a host that is not Stripe's while STRIPE_SECRET_KEY is "
                "a live key; a live key is only ever sent to api.stripe.com"
            )
    if settings.stripe_webhook_secret is not None and not _split_secrets(settings.stripe_webhook_secret):
        problems.append("STRIPE_WEBHOOK_SECRET is set but holds no secret")
    if settings.host_webhook_secret is not None:
        secrets = _split_secrets(settings.host_webhook_secret)
        if not secrets:
            problems.append("HOST_WEBHOOK_SECRET is set but holds no secret")
        elif any(not secret.startswith("whsec_") for secret in secrets):
            problems.append("HOST_WEBHOOK_SECRET: each secret is a Standard Webhooks secret, whsec_<base64>")
    problems.extend(_operator_problems(settings))
    if not settings.is_production:
        return problems

    if settings.stripe_secret_key is None:
        problems.append("STRIPE_SECRET_KEY is not set: production refuses the local Stripe sandbox")
    if settings.stripe_webhook_secret is None:
        problems.append("STRIPE_WEBHOOK_SECRET is not set: production needs Stripe's signing secret")
    elif DEV_WEBHOOK_SECRET in _split_secrets(settings.stripe_webhook_secret):
        problems.append("STRIPE_WEBHOOK_SECRET holds the development secret")
    if settings.host_webhook_url is not None:
        if urlsplit(settings.host_webhook_url).scheme != "https":
            problems.append("HOST_WEBHOOK_URL is not https: production sends host events over TLS only")
        if settings.host_webhook_secret is None:
            problems.append(
                "HOST_WEBHOOK_SECRET is not set: production signs host events with its own secret"
            )
        elif DEV_HOST_WEBHOOK_SECRET in _split_secrets(settings.host_webhook_secret):
            problems.append("HOST_WEBHOOK_SECRET holds the development secret")
    if settings.auth_jwt_secret is None and settings.auth_jwks_url is None:
        problems.append("AUTH_JWT_SECRET or AUTH_JWKS_URL must be set in production")
    if settings.auth_jwt_secret is not None:
        secret = settings.auth_jwt_secret.get_secret_value()
        if secret == DEV_JWT_SECRET or _is_weak(secret):
            problems.append(
                "AUTH_JWT_SECRET is a development or placeholder value "
                f"(use {MIN_SECRET_LENGTH}+ random characters)"
            )
    if "*" in settings.cors_origins:
        problems.append("CORS_ALLOW_ORIGINS is * in production: list the frontend's origins")
    if settings.service_api_key is not None and _is_weak(settings.service_api_key.get_secret_value()):
        problems.append(f"SERVICE_API_KEY is a placeholder (use {MIN_SECRET_LENGTH}+ random characters)")
    if settings.metrics_enabled and settings.metrics_token is None:
        problems.append(
            "METRICS_TOKEN is not set: production refuses to serve /metrics to anyone "
            "(set METRICS_TOKEN for the scraper, or METRICS_ENABLED=false)"
        )
    elif settings.metrics_token is not None and _is_weak(settings.metrics_token.get_secret_value()):
        problems.append(f"METRICS_TOKEN is a placeholder (use {MIN_SECRET_LENGTH}+ random characters)")
    return problems


def is_organisation_claim(path: str) -> bool:
    """A claim that carries an organisation role (`org_role`, Clerk's `o.rol`, `org:*`, `org_id`...).

    Those are the roles of a customer's admins inside their own organisation: never an operator's.
    """
    return any(part == "o" or part.startswith("org") for part in path.strip().lower().split("."))


def _operator_problems(settings: Settings) -> list[str]:
    claim, value = settings.auth_admin_claim, settings.auth_admin_value
    if claim is None:
        return ["AUTH_ADMIN_VALUE is set without AUTH_ADMIN_CLAIM"] if value is not None else []
    if is_organisation_claim(claim):
        return [
            f"AUTH_ADMIN_CLAIM={claim!r} names an organisation role claim: a customer's own admins "
            "carry it, so it never makes anyone an operator (use a claim only your team can have, "
            "e.g. metadata.role)"
        ]
    if not all(claim.split(".")):
        return [f"AUTH_ADMIN_CLAIM={claim!r} is not a dotted path of claim names (e.g. metadata.role)"]
    if value is None:
        return ["AUTH_ADMIN_CLAIM is set without AUTH_ADMIN_VALUE (the exact value that makes an operator)"]
    return []


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning validation errors into one readable `ConfigurationError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]).upper()
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{field}: {message}" if field else message)
    return "invalid settings: " + "; ".join(lines)
