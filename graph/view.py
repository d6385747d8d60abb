"""The GraphQL endpoint: Strawberry's ASGI app with the billing context, and the rules every
operation goes through.

POST JSON for everything, GET for queries only, GraphiQL outside production, and the
`graphql-transport-ws` protocol on the same path. A websocket needs a valid token in its
`connection_init` payload (else it is closed with 4403, as it is when that token expires), runs
at most `WS_MAX_OPERATIONS` operations at once, and a process serves at most
`WS_MAX_CONNECTIONS` websockets (beyond that, and while tokens cannot be checked, a new one is
closed with 1013, "try again later").

Every operation, whichever path runs it, goes through `OperationRules`, here and not in schema
extensions (which only Strawberry's path would run):

- before it runs, its document is parsed with the token limit and validated with the abuse
  limits and the production lockdown (graph.limits), graphql-core's rules with the argument
  errors coded BAD_USER_INPUT (graph.errors), and Strawberry's own rules; the verdict is kept per
  query text. A refused document is answered with its errors and no resolver runs;
- after it ran, its errors are polished (graph.limits), coded and masked (graph.errors).

The paths: with `FAST_PATHS` on, a JSON POST of an accepted query or mutation is executed by
graphql-core directly (graph.lean_executor); everything else (GET, subscriptions, `extensions` in
the body, a schema built with extra extensions, a refused document's answer, and every request
with `FAST_PATHS` off) by Strawberry's view, with the rules applied in `execute_single`.
Websockets run on Strawberry's graphql-transport-ws handler, with the rules applied where it asks
the schema for an operation's results (`RuledStreams`).

Metrics (graph/metrics.py, docs/operations.md): `serve_http` counts and times every HTTP request
whichever path answered it, with the labels that path left in the scope (operation type, first
root field of an accepted document, `ok` or the first error's code); `RuledStreams` counts each
websocket operation as it starts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Collection, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from cross_web import AsyncHTTPRequestAdapter, HTTPException
from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    OperationType,
    get_operation_ast,
    parse,
    specified_rules,
    validate,
)
from graphql.validation import ASTValidationRule, NoSchemaIntrospectionCustomRule
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLRequestData
from strawberry.schema import BaseSchema
from strawberry.schema.validation_rules.maybe_null import MaybeNullValidationRule
from strawberry.schema.validation_rules.one_of import OneOfInputValidationRule
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage,
    SubscribeMessage,
)
from strawberry.types import ExecutionResult
from strawberry.types.execution import PreExecutionError
from strawberry.types.graphql import OperationType as StrawberryOperationType
from strawberry.types.unset import UNSET, UnsetType
from strawberry.utils.operation import get_operation_type

from billing.errors import BillingError, ErrorCode
from billing.logs import set_operation
from billing.metrics import REALTIME_CONNECTIONS
from billing.settings import Settings
from graph.auth import AuthUnavailable, User
from graph.context import Context, GraphQLServices
from graph.errors import BAD_REQUEST, format_errors, validation_failed, with_argument_rules
from graph.front_door import graphiql_page
from graph.lean_executor import LeanExecutor
from graph.limits import QueryLimits, limits_rule, polish_errors
from graph.metrics import OperationMetrics, outcome_of, root_field

METRIC_LABELS = "billing.graphql_labels"  # the scope key of a request's metric labels
TRY_AGAIN_LATER = 1013  # RFC 6455: the graphql-ws client retries it
FORBIDDEN_CLOSE = 4403  # graphql-transport-ws: the client must authenticate anew
VERDICT_CACHE_SIZE = 256
LEAN_OPERATIONS = frozenset({OperationType.QUERY, OperationType.MUTATION})
ANY_OPERATION = frozenset(StrawberryOperationType)


NONE = "none"  # the metric labels of a request without an operation
_NO_OPERATION = (NONE, NONE, "BAD_REQUEST")


@dataclass(frozen=True, slots=True)
class Verdict:
    """A query text's document (None when it does not parse) and its errors (none: it may run),
    and the (operation type, root field) metric labels of its operations, by operation name."""

    document: DocumentNode | None
    errors: list[GraphQLError]
    shapes: dict[object, tuple[str, str]] = field(default_factory=dict)

    def shape(self, operation_name: object) -> tuple[str, str]:
        """The metric labels of the operation named `operation_name`: the root field only for an
        accepted document (its fields are the schema's, not whatever a client sent)."""
        shape = self.shapes.get(operation_name)
        if shape is None:
            operation: OperationDefinitionNode | None = None
            if self.document is not None and (operation_name is None or isinstance(operation_name, str)):
                operation = get_operation_ast(self.document, operation_name)
            if operation is None:
                shape = (NONE, NONE)
            else:
                field_name = NONE if self.errors else root_field(self.document, operation)  # type: ignore[arg-type]
                shape = (operation.operation.value, field_name)
            if len(self.shapes) < 16:
                self.shapes[operation_name] = shape
        return shape


class OperationRules:
    """The checks before and the error handling after every operation of one app (module docstring)."""

    def __init__(self, schema: BaseSchema, settings: Settings) -> None:
        self.graphql_schema: GraphQLSchema = schema._schema  # type: ignore[attr-defined]
        self.limits = QueryLimits.from_settings(settings)
        self.production = settings.is_production
        rules: tuple[type[ASTValidationRule], ...] = (
            limits_rule(self.limits),  # first: it aborts the validation of a document over a limit
            *with_argument_rules(tuple(specified_rules)),
        )
        if self.production:
            rules = (*rules, NoSchemaIntrospectionCustomRule)
        self.validation_rules = (*rules, MaybeNullValidationRule, OneOfInputValidationRule)
        self.verdicts: dict[str, Verdict] = {}
        self.metrics = OperationMetrics(enabled=settings.metrics_enabled)

    def check(self, query: str) -> Verdict:
        """The verdict on `query`, kept for the last `VERDICT_CACHE_SIZE` distinct texts: the
        limits and the validation are properties of the document."""
        verdict = self.verdicts.get(query)
        if verdict is not None:
            return verdict
        document: DocumentNode | None = None
        try:
            document = parse(query, max_tokens=self.limits.max_tokens)
            errors = validation_failed(validate(self.graphql_schema, document, self.validation_rules))
        except GraphQLError as error:
            errors = [error]
        except Exception as exc:  # as Strawberry reports it (masked: graph.errors)
            errors = [GraphQLError(str(exc), original_error=exc)]
        verdict = Verdict(document, errors)
        if len(self.verdicts) >= VERDICT_CACHE_SIZE:
            del self.verdicts[next(iter(self.verdicts))]
        self.verdicts[query] = verdict
        return verdict

    def shape(self, query: object, operation_name: object) -> tuple[str, str]:
        """The (operation type, root field) metric labels of a request (`none` without an operation)."""
        if not query or not isinstance(query, str):
            return NONE, NONE
        return self.check(query).shape(operation_name)

    def refusal(
        self, query: object, operation_name: object, allowed: Collection[StrawberryOperationType]
    ) -> list[GraphQLError] | None:
        """The errors that refuse `query`, or None when Strawberry may take it: an accepted
        document, or one Strawberry refuses itself before validating it (no query or not a
        string, an operation it cannot find or of a type the transport does not allow: its own
        answer, 400 on HTTP)."""
        if not query or not isinstance(query, str):
            return None
        verdict = self.check(query)
        if not verdict.errors:
            return None
        if verdict.document is not None:
            try:
                if get_operation_type(verdict.document, operation_name) not in allowed:  # type: ignore[arg-type]
                    return None
            except RuntimeError:
                return None
        return verdict.errors

    def no_such_operation(self, query: object, operation_name: object) -> list[GraphQLError] | None:
        """A valid document without the operation asked for (on HTTP, Strawberry answers 400)."""
        if not query or not isinstance(query, str):
            return None
        document = self.check(query).document
        name = operation_name if isinstance(operation_name, str) else None
        if document is None or get_operation_ast(document, name) is not None:
            return None
        message = (
            f"Unknown operation named '{name}'."
            if name
            else "Must provide operation name if query contains multiple operations."
        )
        return validation_failed([GraphQLError(message)])

    def is_subscription(self, query: object, operation_name: object) -> bool:
        if not query or not isinstance(query, str):
            return False
        document = self.check(query).document
        if document is None:
            return False
        operation = get_operation_ast(document, operation_name if isinstance(operation_name, str) else None)
        return operation is not None and operation.operation is OperationType.SUBSCRIPTION

    def finish(self, errors: list[GraphQLError], context: Any) -> list[GraphQLError]:
        """`errors` as the client sees them: polished, coded, unexpected ones masked and logged."""
        return format_errors(polish_errors(errors, self.limits, production=self.production), context)

    def finish_result(self, result: ExecutionResult, context: Any) -> ExecutionResult:
        if result.errors:
            result.errors = self.finish(result.errors, context)
        return result


class RuledStreams:
    """The schema as the websocket handler sees it: each operation's results with the rules."""

    def __init__(self, schema: BaseSchema, rules: OperationRules) -> None:
        self.schema = schema
        self.rules = rules

    async def stream(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        operation_extensions: dict[str, Any] | None = None,
        allowed_operation_types: Iterable[StrawberryOperationType] | None = None,
    ) -> AsyncGenerator[ExecutionResult, None]:
        if isinstance(context_value, Context):
            context_value.begin_operation()  # one context serves every operation of a websocket
        set_operation(operation_name)
        allowed = ANY_OPERATION if allowed_operation_types is None else frozenset(allowed_operation_types)
        errors = self.rules.refusal(query, operation_name, allowed) or self.rules.no_such_operation(
            query, operation_name
        )
        operation_type, field_name = self.rules.shape(query, operation_name)
        if errors:
            finished = self.rules.finish(errors, context_value)
            self.rules.metrics.count(operation_type, field_name, outcome_of(finished))
            return _one(PreExecutionError(data=None, errors=finished))
        self.rules.metrics.count(operation_type, field_name, "ok")
        source = await self.schema.stream(
            query,
            variable_values=variable_values,
            context_value=context_value,
            root_value=root_value,
            operation_name=operation_name,
            operation_extensions=operation_extensions,
            allowed_operation_types=allowed_operation_types,
        )
        return self._finished(source, context_value)

    async def _finished(
        self, source: AsyncGenerator[Any, None], context: Any
    ) -> AsyncGenerator[ExecutionResult, None]:
        try:
            async for result in source:
                if isinstance(result, ExecutionResult):
                    self.rules.finish_result(result, context)
                yield result
        finally:
            await source.aclose()


async def _one(result: ExecutionResult) -> AsyncGenerator[ExecutionResult, None]:
    yield result


class BillingTransportWSHandler(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws with the operation rules, coded errors for the operation cap, and
    1013 while auth is down."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        view = self.view
        if isinstance(view, BillingGraphQL):
            self.schema = RuledStreams(self.schema, view.rules)  # type: ignore[assignment]
        self._expiry: asyncio.Task[None] | None = None

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        try:
            await super().handle_connection_init(message)
        except AuthUnavailable:
            # Not the client's fault: do not make the frontend sign its user out (4403).
            await self.websocket.close(code=TRY_AGAIN_LATER, reason="authentication unavailable")
            return
        if self.connection_acknowledged and self._expiry is None:
            principal = await self.context.principal()  # known by now: no second check
            if isinstance(principal, User) and principal.expires_at is not None:
                self._expiry = asyncio.create_task(self._close_at(principal.expires_at))

    async def _close_at(self, expires_at: float) -> None:
        """Close with 4403 when the token expires. Organisation membership lives only in the
        token, so a member removed from one stops hearing its updates within the token's
        lifetime; the client reconnects with a fresh token."""
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        with suppress(Exception):  # already closed by the client
            await self.websocket.close(code=FORBIDDEN_CLOSE, reason="token expired")

    async def shutdown(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        await super().shutdown()

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        limit = self.max_subscriptions_per_connection
        if (
            self.connection_acknowledged
            and limit is not None
            and message["id"] not in self.operations
            and len(self.operations) >= limit
        ):
            error = GraphQLError(
                f"too many operations on this connection (at most {limit} at once): complete one first",
                extensions={"code": ErrorCode.RATE_LIMITED.value, "limit": limit},
            )
            await self.send_message({"id": message["id"], "type": "error", "payload": [error.formatted]})
            return
        await super().handle_subscribe(message)


class BillingGraphQL(GraphQL[Context, None]):
    graphql_transport_ws_handler_class = BillingTransportWSHandler

    def __init__(self, schema: BaseSchema, services: GraphQLServices) -> None:
        settings = services.settings
        super().__init__(
            schema,
            graphql_ide=None if settings.is_production else "graphiql",
            allow_queries_via_get=True,
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
            allowed_origins=settings.cors_origins,  # websocket handshakes (graph.security)
            max_subscriptions_per_connection=settings.ws_max_operations,
        )
        self.services = services
        self.rules = OperationRules(schema, settings)
        self.max_connections = settings.ws_max_connections
        self.connections = 0  # open websockets of this app (one process)
        self.lean = LeanExecutor(schema) if settings.fast_paths and LeanExecutor.serves(schema) else None

    async def render_graphql_ide(self, request: Request) -> Response:
        """GraphiQL from the service's own files, under a Content-Security-Policy (graph.front_door)."""
        return graphiql_page(request, self.services.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.serve_http(scope, receive, send)
            return
        if scope["type"] != "websocket":
            await super().__call__(scope, receive, send)
            return
        if self.connections >= self.max_connections:
            websocket = WebSocket(scope, receive=receive, send=send)
            await websocket.accept(subprotocol=await self.pick_websocket_subprotocol(websocket))
            await websocket.close(code=TRY_AGAIN_LATER, reason="too many connections")
            return
        self.connections += 1
        REALTIME_CONNECTIONS.inc()
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.connections -= 1
            REALTIME_CONNECTIONS.dec()

    async def serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = Request(scope, receive=receive)
        try:
            await self._serve_http(request, scope, receive, send)
        finally:
            # The labels are left in the scope by the path that ran the operation; a request
            # Strawberry answered before that (a GET without a query, a mutation over GET, ...)
            # has none and counts as BAD_REQUEST.
            labels = scope.get(METRIC_LABELS)
            if labels is not None or not self._ide_page(request):  # GraphiQL's page: no operation
                labels = labels or _NO_OPERATION
                metrics = self.rules.metrics
                metrics.count(*labels)
                metrics.observe(labels[0], time.perf_counter() - started)

    def _ide_page(self, request: Request) -> bool:
        return (
            self.graphql_ide is not None
            and request.method == "GET"
            and "text/html" in request.headers.get("accept", "")
        )

    async def _serve_http(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        lean = self.lean
        if lean is not None and scope["method"] == "POST":
            response = await self.lean_response(lean, request)
            if response is not None:
                await response(scope, receive, send)
                return
        try:  # as Strawberry's GraphQL.__call__, with the request whose body may have been read
            response = await self.run(request)
        except HTTPException as exc:
            response = PlainTextResponse(exc.reason, status_code=exc.status_code)
        await response(scope, receive, send)

    async def lean_response(self, lean: LeanExecutor, request: Request) -> Response | None:
        """The lean path's response, or None for Strawberry's view to answer."""
        if "application/json" not in request.headers.get("content-type", ""):
            return None
        try:
            data = json.loads(await request.body())
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("extensions") is not None:
            return None
        query, variables, operation_name = data.get("query"), data.get("variables"), data.get("operationName")
        if not isinstance(query, str) or not (variables is None or isinstance(variables, dict)):
            return None
        if operation_name is not None and not isinstance(operation_name, str):
            return None
        verdict = self.rules.check(query)
        document = verdict.document
        if document is None or verdict.errors:
            return None
        operation = get_operation_ast(document, operation_name)
        if operation is None or operation.operation not in LEAN_OPERATIONS:
            return None
        sub_response = await self.get_sub_response(request)
        context = await self.get_context(request, sub_response)
        set_operation(operation_name)
        result = await lean.execute(document, variables, operation_name, context)
        body: dict[str, Any] = {"data": result.data}
        operation_type, field_name = verdict.shape(operation_name)
        outcome = "ok"
        if result.errors:
            errors = self.rules.finish(result.errors, context)
            outcome = outcome_of(errors)
            body["errors"] = [error.formatted for error in errors]
        request.scope[METRIC_LABELS] = (operation_type, field_name, outcome)
        return self.create_response(body, sub_response)  # type: ignore[arg-type]

    async def execute_single(  # Strawberry's HTTP path: one operation
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        set_operation(request_data.operation_name)
        allowed = StrawberryOperationType.from_http(request_adapter.method)  # type: ignore[arg-type]
        errors = self.rules.refusal(request_data.query, request_data.operation_name, allowed)
        shape = self.rules.shape(request_data.query, request_data.operation_name)
        if errors is not None:
            finished = self.rules.finish(errors, context)
            request.scope[METRIC_LABELS] = (*shape, outcome_of(finished))
            return ExecutionResult(data=None, errors=finished)
        # Strawberry may still refuse it (an operation type the method does not allow): 400.
        request.scope[METRIC_LABELS] = (*shape, BAD_REQUEST)
        if self.rules.is_subscription(request_data.query, request_data.operation_name):
            # Strawberry allows them on POST for its HTTP streams, which this view does not offer:
            # executed as a query, a subscription's root field would be null.
            raise HTTPException(400, "Subscriptions are served over the websocket (graphql-transport-ws)")
        result = await super().execute_single(
            request=request,
            request_adapter=request_adapter,
            sub_response=sub_response,
            context=context,
            root_value=root_value,
            request_data=request_data,
        )
        result = self.rules.finish_result(result, context)
        request.scope[METRIC_LABELS] = (*shape, outcome_of(result.errors))
        return result

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        return Context(request, response, self.services)

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        """`connection_init` must carry a valid token: a missing or bad one closes with 4403."""
        try:
            principal = await context.principal()
        except BillingError:
            raise ConnectionRejectionError() from None
        if principal is None:
            raise ConnectionRejectionError()
        acknowledged: UnsetType = UNSET  # a plain connection_ack
        return acknowledged
