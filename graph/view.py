"""Strawberry's own ASGI GraphQL app, with the billing context.

POST JSON for everything, GET for queries only, GraphiQL outside production, and the
`graphql-transport-ws` protocol on the same path. A websocket needs a valid token in its
`connection_init` payload (else it is closed with 4403), runs at most `WS_MAX_OPERATIONS`
operations at once, and a process serves at most `WS_MAX_CONNECTIONS` websockets (beyond that,
and while tokens cannot be checked, a new one is closed with 1013, "try again later").

The common request, a JSON POST of a query or mutation that parses, validates and stays within
the limits, takes a lean path (`LeanExecutor`): its document is parsed, validated and
limit-checked once per distinct query text and kept, and graphql-core executes it on the
Strawberry schema's `GraphQLSchema` with the billing context, then the errors get their codes
and masking as on Strawberry's path. Strawberry's schema extensions (caches, error codes,
limits) only act before execution or on errors, so for such a document they have nothing to
add; the resolvers, permission classes and field extensions are the ones Strawberry built.
Everything else (GET, a document with errors, an unknown operation name, a subscription,
`extensions` in the body, a body that is not a JSON object) goes through Strawberry's view, which
gives its usual answers.
"""

from __future__ import annotations

import json
from typing import Any

from cross_web import HTTPException
from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    OperationType,
    execute,
    get_operation_ast,
    parse,
    specified_rules,
)
from graphql.validation import ASTValidationRule, NoSchemaIntrospectionCustomRule
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.execution import optimized_is_awaitable
from strawberry.schema import BaseSchema
from strawberry.schema.schema import validate_document
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import BaseGraphQLTransportWSHandler
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage,
    SubscribeMessage,
)
from strawberry.types.unset import UNSET, UnsetType

from billing.errors import BillingError, ErrorCode
from graph.auth import AuthUnavailable
from graph.context import Context, GraphQLServices
from graph.errors import format_errors, with_argument_rules
from graph.limits import QueryLimits, limits_rule, polish_errors

TRY_AGAIN_LATER = 1013  # RFC 6455: the graphql-ws client retries it
DOCUMENT_CACHE_SIZE = 256
LEAN_OPERATIONS = frozenset({OperationType.QUERY, OperationType.MUTATION})


class BillingTransportWSHandler(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws with coded errors for the operation cap, and 1013 while auth is down."""

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        try:
            await super().handle_connection_init(message)
        except AuthUnavailable:
            # Not the client's fault: do not make the frontend sign its user out (4403).
            await self.websocket.close(code=TRY_AGAIN_LATER, reason="authentication unavailable")

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


class LeanExecutor:
    """Executes a valid POSTed operation without Strawberry's per-request machinery.

    `prepare(query)` is the document when it parses, validates and is within the limits, with
    the rules Strawberry's path would apply (`QueryGuard`'s limits and production lockdown,
    `ErrorCodes`' argument rules, Strawberry's own); None when it has any error, so that
    Strawberry answers it. The verdict is kept per query text (the last `DOCUMENT_CACHE_SIZE`
    distinct ones): the limits are properties of the document.
    """

    def __init__(self, schema: BaseSchema, services: GraphQLServices) -> None:
        settings = services.settings
        self.graphql_schema: GraphQLSchema = schema._schema  # type: ignore[attr-defined]
        self.execution_context_class = getattr(schema, "execution_context_class", None)
        self.limits = QueryLimits.from_settings(settings)
        self.production = settings.is_production
        rules: tuple[type[ASTValidationRule], ...] = (
            limits_rule(self.limits),
            *with_argument_rules(tuple(specified_rules)),
        )
        if self.production:
            rules = (*rules, NoSchemaIntrospectionCustomRule)
        self.rules = rules
        self.documents: dict[str, DocumentNode | None] = {}

    @staticmethod
    def serves(schema: BaseSchema) -> bool:
        """Only a schema whose extensions are exactly the billing ones (`build_schema` without
        extras) and that has no directives: other extensions may do anything per request."""
        return bool(getattr(schema, "lean_http", False)) and not getattr(schema, "directives", None)

    def prepare(self, query: str) -> DocumentNode | None:
        documents = self.documents
        if query in documents:
            return documents[query]
        document: DocumentNode | None
        try:
            document = parse(query, max_tokens=self.limits.max_tokens)
            if validate_document(self.graphql_schema, document, self.rules):
                document = None
        except Exception:  # any error: Strawberry's path reports it
            document = None
        if len(documents) >= DOCUMENT_CACHE_SIZE:
            del documents[next(iter(documents))]
        documents[query] = document
        return document

    async def run(
        self,
        document: DocumentNode,
        variables: dict[str, Any] | None,
        operation_name: str | None,
        context: Context,
    ) -> dict[str, Any]:
        """The response body for `document`, as Strawberry's view would make it."""
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
                operation_extensions=None,  # as Strawberry passes them to its executor
            )
            if optimized_is_awaitable(result):
                result = await result  # type: ignore[misc]
            data, errors = result.data, result.errors  # type: ignore[union-attr]
            if errors:
                errors = polish_errors(errors, self.limits, production=self.production)
        except Exception as exc:  # as Strawberry: the request fails with that error
            error = exc if isinstance(exc, GraphQLError) else GraphQLError(str(exc), original_error=exc)
            data, errors = None, [error]
        if not errors:
            return {"data": data}
        return {"data": data, "errors": [error.formatted for error in format_errors(errors, context)]}


def _lean_operation(document: DocumentNode, operation_name: object) -> OperationDefinitionNode | None:
    if operation_name is not None and not isinstance(operation_name, str):
        return None
    operation = get_operation_ast(document, operation_name)
    if operation is None or operation.operation not in LEAN_OPERATIONS:
        return None
    return operation


class BillingGraphQL(GraphQL[Context, None]):
    graphql_transport_ws_handler_class = BillingTransportWSHandler

    def __init__(self, schema: BaseSchema, services: GraphQLServices) -> None:
        super().__init__(
            schema,
            graphql_ide=None if services.settings.is_production else "graphiql",
            allow_queries_via_get=True,
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
            allowed_origins=services.settings.cors_origins,  # websocket handshakes (graph.security)
            max_subscriptions_per_connection=services.settings.ws_max_operations,
        )
        self.services = services
        self.max_connections = services.settings.ws_max_connections
        self.connections = 0  # open websockets of this app (one process)
        serves = services.settings.fast_paths and LeanExecutor.serves(schema)
        self.lean = LeanExecutor(schema, services) if serves else None
        if self._stream_transport_map:  # HTTP streaming protocols: Strawberry's view decides
            self.lean = None

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
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.connections -= 1

    async def serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive=receive)
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
        query, variables = data.get("query"), data.get("variables")
        if not isinstance(query, str) or not (variables is None or isinstance(variables, dict)):
            return None
        document = lean.prepare(query)
        if document is None:
            return None
        operation_name = data.get("operationName")
        if _lean_operation(document, operation_name) is None:
            return None
        sub_response = await self.get_sub_response(request)
        context = await self.get_context(request, sub_response)
        body = await lean.run(document, variables, operation_name, context)
        return self.create_response(body, sub_response)  # type: ignore[arg-type]

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
