"""Strawberry's own ASGI GraphQL app, with the billing context.

POST JSON for everything, GET for queries only, GraphiQL outside production, and the
`graphql-transport-ws` protocol on the same path.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.schema import BaseSchema
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

from graph.context import Context, GraphQLServices


class BillingGraphQL(GraphQL[Context, None]):
    def __init__(self, schema: BaseSchema, services: GraphQLServices) -> None:
        super().__init__(
            schema,
            graphql_ide=None if services.settings.is_production else "graphiql",
            allow_queries_via_get=True,
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
            allowed_origins=services.settings.cors_origins,  # websocket handshakes (graph.security)
        )
        self.services = services

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> Context:
        return Context(request, response, self.services)
