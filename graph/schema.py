"""The GraphQL schema (placeholder until the GraphQL issue lands)."""

from __future__ import annotations

import strawberry


@strawberry.type
class Query:
    @strawberry.field(description="Always true: the GraphQL endpoint is up.")
    async def ok(self) -> bool:
        return True


schema = strawberry.Schema(query=Query)
