"""`build_schema`: a Strawberry schema as `graph.app.create_app` serves it, for the billing schema
and for host apps that merge their own types with the billing `Query`.

The rules every operation goes through (limits, production lockdown, error codes, masking) are
not schema extensions: the view applies them on every path (graph.view.OperationRules). A schema
built here holds what is Strawberry's own: the billing scalars, the parser and validation caches
of Strawberry's path, and no logging of expected errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.extensions import ParserCache, SchemaExtension, ValidationCache
from strawberry.schema.config import StrawberryConfig
from strawberry.types.execution import ExecutionContext

from graph.common import SCALARS

PARSER_CACHE_SIZE = 256
VALIDATION_CACHE_SIZE = 256


class BillingSchema(strawberry.Schema):
    # True when built without extra extensions: graph.lean_executor may then run its operations.
    lean_http: bool = False

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # Strawberry logs every error with its traceback, expected ones included; the view
        # (graph.errors.format_errors) logs the unexpected ones, with the request id.
        return None


class SafeParserCache(ParserCache):
    """Strawberry's `ParserCache`, except that it leaves a query that does not parse to Strawberry.

    The stock extension raises the syntax error from its hook, outside the code that turns it
    into a GraphQL error: on a websocket that kills the operation's task with no answer.
    """

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        with suppress(GraphQLError):  # Strawberry parses it again and reports GRAPHQL_PARSE_FAILED
            context.graphql_document = self.cached_parse_document(context.query, **context.parse_options)
        yield


def schema_extensions() -> list[type[SchemaExtension] | Any]:
    """The extensions of every schema served by this app (one fresh instance per request)."""
    return [
        lambda: SafeParserCache(maxsize=PARSER_CACHE_SIZE),
        lambda: ValidationCache(maxsize=VALIDATION_CACHE_SIZE),
    ]


def build_schema(
    query: type,
    *,
    mutation: type | None = None,
    subscription: type | None = None,
    types: Iterable[type] = (),
    extensions: Sequence[type[SchemaExtension] | Any] = (),
) -> BillingSchema:
    """A schema with the billing scalars and Strawberry's caches; `extensions` run on every
    operation of its own (Strawberry then serves them all: graph.lean_executor)."""
    built = BillingSchema(
        query=query,
        mutation=mutation,
        subscription=subscription,
        types=list(types),
        extensions=[*schema_extensions(), *extensions],
        config=StrawberryConfig(scalar_map=SCALARS),
    )
    built.lean_http = not extensions
    return built
