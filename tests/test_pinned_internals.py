"""What the fast paths and the view rely on beyond Strawberry's and SQLAlchemy's documented API.

Both are pinned below their next minor version (pyproject.toml). When an upgrade changes one of
these, this module fails first, naming what moved: graph/view.py, graph/lean_executor.py and
db/fast_read.py must then be checked against the new version before the pin is moved.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import strawberry
from graphql import GraphQLSchema, parse, specified_rules
from sqlalchemy import bindparam, event, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import create_async_engine
from strawberry.execution import optimized_is_awaitable
from strawberry.http.async_base_view import AsyncBaseHTTPView
from strawberry.schema import schema as strawberry_schema
from strawberry.schema.validation_rules.maybe_null import MaybeNullValidationRule
from strawberry.schema.validation_rules.one_of import OneOfInputValidationRule
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.types.execution import ExecutionContext, PreExecutionError
from strawberry.utils.operation import get_operation_type

from db.models import account_table
from graph.lean_executor import LeanExecutor
from graph.schema import schema


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


# Strawberry ------------------------------------------------------------------------------------


def test_the_lean_executor_finds_the_graphql_schema_strawberry_built() -> None:
    """Strawberry keeps it as `Schema._schema`; graph.lean_executor and graph.view.OperationRules
    execute and validate on it."""
    built = LeanExecutor(schema).graphql_schema
    assert isinstance(built, GraphQLSchema) and built.query_type is not None
    assert built.query_type.name == "Query" and "viewer" in built.query_type.fields
    assert isinstance(schema.execution_context_class, type)


def test_strawberry_validates_with_the_specified_rules_plus_two_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OperationRules validates with the same rules, so an accepted document is one Strawberry accepts."""
    assert ExecutionContext(
        query="{ plans { id } }", schema=schema, allowed_operations=()
    ).validation_rules == (tuple(specified_rules))
    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        strawberry_schema, "validate", lambda _schema, _document, rules: seen.append(rules) or []
    )
    strawberry_schema.validate_document(LeanExecutor(schema).graphql_schema, parse("{ plans { id } }"), ())
    assert seen == [(MaybeNullValidationRule, OneOfInputValidationRule)]


def test_the_awaitable_test_strawberry_gives_graphql_core() -> None:
    async def coroutine() -> None:
        return None

    pending = coroutine()
    assert optimized_is_awaitable(pending) and not optimized_is_awaitable({"data": 1})
    pending.close()


def test_strawberry_finds_an_operation_by_name_or_takes_the_first() -> None:
    """OperationRules.refusal leaves Strawberry the documents it refuses before validating them."""
    document = parse("query A { plans { id } } mutation B { recordUsage }")
    assert get_operation_type(document, None) == strawberry.types.graphql.OperationType.QUERY
    assert get_operation_type(document, "B") == strawberry.types.graphql.OperationType.MUTATION
    with pytest.raises(RuntimeError):
        get_operation_type(document, "C")


def test_the_http_view_runs_one_operation_in_execute_single() -> None:
    """graph.view.BillingGraphQL.execute_single is where Strawberry's HTTP path gets the rules."""
    assert parameters(AsyncBaseHTTPView.execute_single) == [
        "self",
        "request",
        "request_adapter",
        "sub_response",
        "context",
        "root_value",
        "request_data",
    ]
    assert "self.execute_single(" in inspect.getsource(AsyncBaseHTTPView.execute_operation)


def test_the_websocket_handler_asks_its_schema_attribute_for_each_operations_stream() -> None:
    """graph.view.RuledStreams stands in for the handler's `schema`."""
    assert "schema" in parameters(BaseGraphQLTransportWSHandler.__init__)
    assert "self.schema.stream(" in inspect.getsource(BaseGraphQLTransportWSHandler.run_operation)
    assert parameters(strawberry.Schema.stream)[:7] == [
        "self",
        "query",
        "variable_values",
        "context_value",
        "root_value",
        "operation_name",
        "operation_extensions",
    ]
    assert issubclass(PreExecutionError, strawberry.types.ExecutionResult)


# SQLAlchemy ------------------------------------------------------------------------------------


def test_a_compiled_select_names_its_positional_parameters_and_binds() -> None:
    """db.fast_read.CompiledRead reads these."""
    c = account_table.c
    statement = select(c.id, c.tier).where(c.user_id == bindparam("user_id"), c.status == "active")
    dialect = postgresql.asyncpg.dialect()  # type: ignore[attr-defined]
    compiled = statement.compile(dialect=dialect)
    assert compiled.positiontup == ["user_id", "status_1"]
    assert set(compiled.binds) >= {"user_id", "status_1"} and compiled.binds["user_id"].required
    assert compiled.binds["status_1"].effective_value == "active"
    assert not compiled.literal_execute_params and not compiled.post_compile_params
    assert compiled.string.endswith(
        "WHERE billing_account.user_id = $1::VARCHAR AND billing_account.status = $2::VARCHAR"
    )
    expanding = select(c.id).where(c.user_id.in_(bindparam("users", expanding=True)))
    assert expanding.compile(dialect=dialect).post_compile_params


def test_an_insert_holds_its_returning_columns() -> None:
    """db/fast_read.py runs inserts without RETURNING only, and tells them by `_returning`."""
    insert = postgresql.insert(account_table).values(user_id=bindparam("user_id"))
    assert not insert.exported_columns  # computed, and kept by the copy `.returning()` makes
    returning = insert.returning(account_table.c.id)
    assert insert._returning == () and list(returning._returning) == [account_table.c.id]


def test_an_engine_lists_its_cursor_listeners() -> None:
    """db.fast_read leaves statements to SQLAlchemy while a `before_cursor_execute` listener exists."""
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")

    def listener(*_args: Any) -> None:
        return None

    assert not engine.sync_engine.dispatch.before_cursor_execute
    event.listen(engine.sync_engine, "before_cursor_execute", listener)
    assert engine.sync_engine.dispatch.before_cursor_execute
    event.remove(engine.sync_engine, "before_cursor_execute", listener)
    assert not engine.sync_engine.dispatch.before_cursor_execute
