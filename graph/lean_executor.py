"""The lean GraphQL executor (`FAST_PATHS`): a checked query or mutation run by graphql-core itself.

Strawberry's view and `Schema.execute` wrap graphql-core's `execute` in per-request machinery
(an execution context, an extension runner with a context manager per hook per extension, a
middleware manager, the HTTP request parsing of its view): most of the CPU of a small request
(bench/RESULTS.md, fix 7). For a JSON POST whose document the view has already checked (parsed,
validated, within the limits: graph.view), none of it adds anything when the schema's only
extensions are the caches of `build_schema`. Here graphql-core executes the document on the
Strawberry schema's `GraphQLSchema`, with the execution context class, resolvers, permission
classes and field extensions Strawberry built; the view gives the errors their codes as on
Strawberry's path.

What it relies on beyond Strawberry's documented API (pinned below its next minor version in
pyproject.toml; `tests/test_pinned_internals.py` fails when it changes): `Schema._schema`, the
`GraphQLSchema` Strawberry built, and `strawberry.execution.optimized_is_awaitable`, the
awaitable test Strawberry passes to graphql-core.
"""

from __future__ import annotations

from typing import Any

from graphql import DocumentNode, ExecutionResult, GraphQLError, GraphQLSchema, execute
from strawberry.execution import optimized_is_awaitable
from strawberry.schema import BaseSchema

from graph.context import Context


class LeanExecutor:
    def __init__(self, schema: BaseSchema) -> None:
        self.graphql_schema: GraphQLSchema = schema._schema  # type: ignore[attr-defined]
        self.execution_context_class = getattr(schema, "execution_context_class", None)

    @staticmethod
    def serves(schema: BaseSchema) -> bool:
        """Only a schema built by `build_schema` without extra extensions, and without
        directives: any other extension may do anything per request, so Strawberry runs those."""
        return bool(getattr(schema, "lean_http", False)) and not getattr(schema, "directives", None)

    async def execute(
        self,
        document: DocumentNode,
        variables: dict[str, Any] | None,
        operation_name: str | None,
        context: Context,
    ) -> ExecutionResult:
        """The result of `document`, its errors as graphql-core reports them."""
        try:
            result = execute(
                self.graphql_schema,
                document,
                root_value=None,
                context_value=context,
                variable_values=variables,
                operation_name=operation_name,
                executor_class=self.execution_context_class,
                is_awaitable=optimized_is_awaitable,  # type: ignore[arg-type]
                operation_extensions=None,  # as Strawberry passes them to its execution context
            )
            if optimized_is_awaitable(result):
                result = await result  # type: ignore[misc]
        except Exception as exc:  # as Strawberry: the request fails with that error
            error = exc if isinstance(exc, GraphQLError) else GraphQLError(str(exc), original_error=exc)
            return ExecutionResult(data=None, errors=[error])
        return result  # type: ignore[return-value]
