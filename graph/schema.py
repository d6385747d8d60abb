"""The billing GraphQL schema, and `build_schema` for host apps that merge it with their own.

`Query`, `Mutation` and `Subscription` are assembled here from the areas, each a module holding
its types, resolvers and mutations: `graph.viewer` (viewer, plans, access), `graph.checkout`
(checkout and portal), `graph.plan_changes`, `graph.usage`, `graph.live` (websocket updates);
the types several areas return are in `graph.common`. Resolvers stay thin: they read the context
and call `billing`. `schema.graphql` at the repository root is this schema's SDL (`billing
schema` prints it, `billing schema --check` compares).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import aclosing, suppress
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.extensions import ParserCache, SchemaExtension, ValidationCache
from strawberry.schema.config import StrawberryConfig
from strawberry.schema.schema import StreamResult
from strawberry.types import ExecutionResult
from strawberry.types.execution import ExecutionContext
from strawberry.types.graphql import OperationType

from graph.checkout import CheckoutMutation
from graph.common import SCALARS
from graph.context import OperationScope
from graph.errors import ErrorCodes, format_errors
from graph.limits import QueryGuard
from graph.live import LiveSubscription
from graph.plan_changes import PlanChangeMutation
from graph.usage import UsageMutation
from graph.viewer import ViewerQuery

PARSER_CACHE_SIZE = 256
VALIDATION_CACHE_SIZE = 256


@strawberry.type
class Query(ViewerQuery):
    """Every billing query: the viewer, plans and access."""


class BillingSchema(strawberry.Schema):
    """A schema whose every error carries a code (`graph.errors.format_errors`), HTTP and websocket."""

    # True when its extensions are exactly `schema_extensions()`: the HTTP view may then execute
    # a valid operation without them (graph.view.LeanExecutor).
    lean_http: bool = False

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # Strawberry logs every error with its traceback, expected ones included; format_errors
        # logs the unexpected ones, with the request id.
        return None

    async def execute(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
        operation_extensions: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        result = await super().execute(
            query,
            variable_values,
            context_value,
            root_value,
            operation_name,
            allowed_operation_types,
            operation_extensions,
        )
        _format_result(result, context_value)
        return result

    async def stream(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        operation_extensions: dict[str, Any] | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
    ) -> StreamResult:
        source = await super().stream(
            query,
            variable_values,
            context_value,
            root_value,
            operation_name,
            operation_extensions,
            allowed_operation_types,
        )
        return _formatted_stream(source, context_value)


async def _formatted_stream(source: StreamResult, context: Any) -> StreamResult:
    async with aclosing(source):
        async for result in source:
            _format_result(result, context)
            yield result


def _format_result(result: object, context: Any) -> None:
    errors = getattr(result, "errors", None)
    if errors:
        result.errors = format_errors(errors, context)  # type: ignore[attr-defined]


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
    """The extensions every schema served by this app needs (one fresh instance per request)."""
    return [
        lambda: SafeParserCache(maxsize=PARSER_CACHE_SIZE),
        lambda: ValidationCache(maxsize=VALIDATION_CACHE_SIZE),
        ErrorCodes,
        OperationScope,
        QueryGuard,  # abuse limits, production lockdown (graph.limits)
    ]


def build_schema(
    query: type,
    *,
    mutation: type | None = None,
    subscription: type | None = None,
    types: Iterable[type] = (),
    extensions: Sequence[type[SchemaExtension] | Any] = (),
) -> BillingSchema:
    """A schema with the billing extensions: caches, error codes, per-operation websocket state."""
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


def print_sdl(schema: strawberry.Schema) -> str:
    return schema.as_str().rstrip("\n") + "\n"


@strawberry.type
class Mutation(PlanChangeMutation, CheckoutMutation, UsageMutation):
    """Every billing mutation: plan changes, checkout and portal, usage."""


@strawberry.type(name="BillingUpdates", description="Real-time updates, over graphql-transport-ws.")
class Subscription(LiveSubscription):
    """Every billing subscription (graph.live).

    Named `BillingUpdates` in the schema: in this API a subscription is what a user pays for
    (`BillingSubscription`), so no GraphQL type is called `Subscription`.
    """


schema = build_schema(Query, mutation=Mutation, subscription=Subscription)
