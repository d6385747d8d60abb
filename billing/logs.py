"""Log lines as text or as JSON (`LOG_FORMAT`), with what each line is about.

JSON lines (python-json-logger) hold `time`, `level`, `logger`, `message`, and, when known:
`request_id` (the HTTP request's, graph/app.py), `operation` (the GraphQL operation's name),
`user_id` (the signed-in user), `stripe_request_id` (on lines about a Stripe call) and `event_id`
(while the webhook worker applies events). They come from context variables set where those are
known, copied onto each record by `ContextFilter` on the handler. docs/operations.md lists them.

No email, token, key or signature is ever put in a field; messages are the same as in text.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
from contextvars import ContextVar
from typing import Any

REQUEST_ID = ContextVar[str | None]("billing_request_id", default=None)
OPERATION = ContextVar[str | None]("billing_operation", default=None)
USER_ID = ContextVar[str | None]("billing_user_id", default=None)
EVENT_ID = ContextVar[str | None]("billing_event_id", default=None)
STRIPE_REQUEST_ID = "stripe_request_id"  # passed as `extra=` on the lines about a Stripe call

_FIELDS = (("request_id", REQUEST_ID), ("operation", OPERATION), ("user_id", USER_ID), ("event_id", EVENT_ID))
WELL_FORMED_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_OPERATION_NAME = 100
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def request_id_for(given: str | None) -> str:
    """The caller's `X-Request-ID` when it is well-formed, else a new one."""
    if given and WELL_FORMED_REQUEST_ID.fullmatch(given):
        return given
    return os.urandom(16).hex()  # as uuid4().hex, at a third of the cost


def set_operation(name: object) -> None:
    OPERATION.set(name[:MAX_OPERATION_NAME] if isinstance(name, str) and name else None)


class ContextFilter(logging.Filter):
    """Copies the context (request id, operation, user, event) onto every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, variable in _FIELDS:
            value = variable.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def logging_config(*, as_json: bool, level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` for the CLI and for uvicorn's `log_config` (each worker
    applies it): one stderr handler for the root logger and uvicorn's, with the context filter."""
    formatter: dict[str, Any] = (
        {"()": json_formatter} if as_json else {"format": TEXT_FORMAT, "datefmt": "%Y-%m-%dT%H:%M:%S%z"}
    )
    level = level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "billing", "filters": ["context"]}
    quiet = "DEBUG" if level == "DEBUG" else "WARNING"  # a line per HTTP call: only when debugging
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"billing": formatter},
        "handlers": {"default": {**handler, "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": level, "propagate": True},
            "alembic.runtime.migration": {"level": "WARNING"},
            "httpx": {"level": quiet},
            "stripe": {"level": quiet},
        },
    }


def configure_logging(*, as_json: bool, level: str) -> None:
    """As `logging.basicConfig`: the root logger's handler only when it has none yet (a host or a
    test harness that set up logging keeps its own); the levels always."""
    config = logging_config(as_json=as_json, level=level)
    if not logging.getLogger().handlers:
        logging.config.dictConfig(config)
        logging.captureWarnings(True)  # Python's warnings as log lines too (py.warnings)
        return
    logging.getLogger().setLevel(config["root"]["level"])
    for name, logger in config["loggers"].items():
        if not name.startswith("uvicorn"):
            logging.getLogger(name).setLevel(logger["level"])
