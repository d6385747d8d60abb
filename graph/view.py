"""Strawberry's own ASGI GraphQL app, with the billing context.

POST JSON for everything, GET for queries only, GraphiQL outside production, and the
`graphql-transport-ws` protocol on the same path. A websocket needs a valid token in its
`connection_init` payload (else it is closed with 4403), runs at most `WS_MAX_OPERATIONS`
operations at once, and a process serves at most `WS_MAX_CONNECTIONS` websockets (beyond that,
and while tokens cannot be checked, a new one is closed with 1013, "try again later").
"""

from __future__ import annotations

from graphql import GraphQLError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.schema import BaseSchema
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

TRY_AGAIN_LATER = 1013  # RFC 6455: the graphql-ws client retries it


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
