"""Every GraphQL error carries a stable `extensions.code`; unexpected failures are masked.

| where the error comes from | `extensions.code` | message |
|---|---|---|
| a `BillingError` (domain, auth, permissions) | its `ErrorCode` (UNAUTHENTICATED, ...) | its message |
| a query that does not parse | GRAPHQL_PARSE_FAILED | graphql-core's |
| a wrong argument or variable (type, missing, unknown) | BAD_USER_INPUT | graphql-core's |
| any other invalid query (unknown field, ...) | GRAPHQL_VALIDATION_FAILED | graphql-core's |
| a `GraphQLError` raised on purpose by a resolver | its own code, else BAD_REQUEST | its message |
| anything else (a bug, the database down, ...) | INTERNAL_ERROR, plus `requestId` | "Internal server error" |

Internal errors are logged with the request id and the traceback; the response holds no stack
trace, SQL, key or exception text.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from graphql import ArgumentNode, GraphQLError, GraphQLSyntaxError
from graphql.validation import (
    ASTValidationRule,
    KnownArgumentNamesRule,
    ProvidedRequiredArgumentsRule,
    ValuesOfCorrectTypeRule,
)

from billing.errors import BillingError, ErrorCode

log = logging.getLogger("billing.graphql")

GRAPHQL_PARSE_FAILED = "GRAPHQL_PARSE_FAILED"
GRAPHQL_VALIDATION_FAILED = "GRAPHQL_VALIDATION_FAILED"
BAD_REQUEST = "BAD_REQUEST"
INTERNAL_MESSAGE = "Internal server error"


def _bad_user_input(error: GraphQLError) -> GraphQLError:
    error.extensions = {**(error.extensions or {}), "code": ErrorCode.BAD_USER_INPUT.value}
    return error


class _KnownArgumentNames(KnownArgumentNamesRule):
    def report_error(self, error: GraphQLError) -> None:
        super().report_error(_bad_user_input(error))

    def enter_argument(self, node: ArgumentNode, *args: Any) -> None:
        # graphql-core reports unknown field arguments through the context, not `report_error`.
        context = self.context
        on_error = context.on_error
        context.on_error = lambda error: on_error(_bad_user_input(error))  # type: ignore[method-assign]
        try:
            super().enter_argument(node, *args)
        finally:
            context.on_error = on_error  # type: ignore[method-assign]


class _ValuesOfCorrectType(ValuesOfCorrectTypeRule):
    def report_error(self, error: GraphQLError) -> None:
        super().report_error(_bad_user_input(error))


class _ProvidedRequiredArguments(ProvidedRequiredArgumentsRule):
    def report_error(self, error: GraphQLError) -> None:
        super().report_error(_bad_user_input(error))


# graphql-core's argument rules, replaced by the same rules tagging their errors BAD_USER_INPUT.
_ARGUMENT_RULES: dict[type[ASTValidationRule], type[ASTValidationRule]] = {
    KnownArgumentNamesRule: _KnownArgumentNames,
    ValuesOfCorrectTypeRule: _ValuesOfCorrectType,
    ProvidedRequiredArgumentsRule: _ProvidedRequiredArguments,
}


def with_argument_rules(rules: tuple[type[ASTValidationRule], ...]) -> tuple[type[ASTValidationRule], ...]:
    return tuple(_ARGUMENT_RULES.get(rule, rule) for rule in rules)


def validation_failed(errors: list[GraphQLError]) -> list[GraphQLError]:
    """Validation errors with their code: GRAPHQL_VALIDATION_FAILED unless a rule gave one
    (the argument rules above: BAD_USER_INPUT; the limits: QUERY_TOO_COMPLEX)."""
    for error in errors:
        if not (error.extensions or {}).get("code"):
            error.extensions = {**(error.extensions or {}), "code": GRAPHQL_VALIDATION_FAILED}
    return errors


def format_errors(errors: list[GraphQLError], context: Any) -> list[GraphQLError]:
    """Every error with its code; unexpected ones masked and logged. Safe to apply twice."""
    return [format_error(error, context) for error in errors]


def format_error(error: GraphQLError, context: Any) -> GraphQLError:
    original = error.original_error
    if isinstance(original, BillingError):
        extensions = {key: value for key, value in original.extensions.items() if value is not None}
        return _copy(error, original.message, {**extensions, "code": original.code.value})
    if original is not None and not isinstance(original, GraphQLError):
        return _mask(error, context)
    extensions = error.extensions or {}
    if isinstance(error, GraphQLSyntaxError):
        return _copy(error, error.message, {**extensions, "code": GRAPHQL_PARSE_FAILED})
    if extensions.get("code"):
        return error if original is None else _copy(error, error.message, dict(extensions))
    if error.path is None:  # the request is at fault before any resolver ran: variables that
        # do not coerce to their types, an unknown operation name
        return _copy(error, error.message, {**extensions, "code": ErrorCode.BAD_USER_INPUT.value})
    if isinstance(original, GraphQLError):  # raised on purpose by a resolver or a permission
        return _copy(error, error.message, {**extensions, "code": BAD_REQUEST})
    return _mask(error, context)  # graphql-core's own execution errors (null for non-null, ...)


def _mask(error: GraphQLError, context: Any) -> GraphQLError:
    request_id = getattr(context, "request_id", None) or uuid.uuid4().hex
    original = error.original_error or error
    log.error(
        "internal error in GraphQL at %s (request %s): %s",
        ".".join(str(part) for part in error.path or ()) or "(request)",
        request_id,
        type(original).__name__,
        exc_info=(type(original), original, original.__traceback__),
    )
    return _copy(error, INTERNAL_MESSAGE, {"code": ErrorCode.INTERNAL_ERROR.value, "requestId": request_id})


def _copy(error: GraphQLError, message: str, extensions: dict[str, Any]) -> GraphQLError:
    # A new error: validation errors are cached and shared between requests.
    return GraphQLError(
        message,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        original_error=None,
        extensions=extensions,
    )
