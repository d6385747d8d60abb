"""The per-request GraphQL context: cheap to build, lazy about everything else.

Building a context allocates one small object: no dependency injection, no database session, no
token check. The principal is authenticated the first time a field asks for it, and a user's
subscription is loaded at most once per request (concurrent fields share one query), so a
permission class and the resolver it guards cost a single round trip together.

Host apps with their own GraphQL view build the context with `Context(request, response,
services)` so the permission classes of `graph.permissions` work on their fields; `services` is
then the app's `app.state.graphql`, whose running services `graph.app.create_app` binds at
start-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import strawberry

from billing.access import AccessPolicy, SubscriptionState, load_subscription
from billing.account_cache import AccountCache
from billing.clock import Clock, utcnow
from billing.customer_locks import CustomerLocks
from billing.customers import Identity
from billing.errors import BillingError, ErrorCode
from billing.logs import REQUEST_ID, USER_ID, request_id_for
from billing.owners import OwnerIdentity
from billing.plans import Catalog
from billing.realtime import BillingStateHub
from billing.settings import Settings
from billing.stripe_gateway import StripeGateway
from billing.usage.reporting import UsageReporter
from db.engine import Database
from graph.auth import Authenticator, Principal, ServicePrincipal, User

T = TypeVar("T")


@dataclass(slots=True)
class GraphQLServices:
    """What every request shares: built once per app.

    The running services are bound by the app factory at start-up (graph.app.create_app): the
    database, the real-time hub and the account cache it feeds, the Stripe gateway with the
    per-customer locks its webhook worker uses too, and the usage reporter.
    """

    settings: Settings
    catalog: Catalog
    policy: AccessPolicy
    authenticator: Authenticator
    database: Database | None = None
    realtime: BillingStateHub | None = None
    accounts: AccountCache | None = None
    gateway: StripeGateway | None = None
    locks: CustomerLocks | None = None
    reporter: UsageReporter | None = None
    clock: Clock = utcnow

    @classmethod
    def create(
        cls,
        settings: Settings,
        catalog: Catalog,
        *,
        database: Database | None = None,
        clock: Clock = utcnow,
    ) -> GraphQLServices:
        return cls(
            settings=settings,
            catalog=catalog,
            policy=AccessPolicy.from_settings(catalog, settings),
            authenticator=Authenticator(settings),
            database=database,
            clock=clock,
        )


class Context:
    __slots__ = (
        "_now",
        "_principal",
        "_request_id",
        "_subscriptions",
        "connection_params",
        "request",
        "response",
        "services",
    )

    def __init__(self, request: Any, response: Any, services: GraphQLServices) -> None:
        self.request = request
        self.response = response
        self.services = services
        self.connection_params: Mapping[str, Any] | None = None  # graphql-transport-ws payload
        self._now: datetime | None = None
        self._principal: asyncio.Future[Principal | None] | None = None
        self._subscriptions: dict[str, asyncio.Future[SubscriptionState]] | None = None
        self._request_id: str | None = None

    # Shared services -----------------------------------------------------------------------

    @property
    def policy(self) -> AccessPolicy:
        return self.services.policy

    @property
    def catalog(self) -> Catalog:
        return self.services.catalog

    @property
    def database(self) -> Database:
        return _bound(self.services.database, "database")

    @property
    def gateway(self) -> StripeGateway:
        return _bound(self.services.gateway, "gateway")

    @property
    def locks(self) -> CustomerLocks:
        """The per-customer locks, shared with the webhook worker so syncs never interleave."""
        return _bound(self.services.locks, "locks")

    @property
    def reporter(self) -> UsageReporter | None:
        """The usage reporter, kicked after usage is recorded; None when none is bound."""
        return self.services.reporter

    @property
    def clock(self) -> Clock:
        return self.services.clock

    @property
    def is_websocket(self) -> bool:
        return bool(self.request.scope["type"] == "websocket")

    # Per request ---------------------------------------------------------------------------

    @property
    def now(self) -> datetime:
        """One instant per request, so every access decision of a request agrees."""
        if self._now is None:
            self._now = self.services.clock()
        return self._now

    @property
    def request_id(self) -> str:
        """The caller's `X-Request-ID` when it is sane, else a new one (sent back as a header)."""
        if self._request_id is None:
            current = REQUEST_ID.get()  # the app's (graph/app.py), already sent back as a header
            if current is not None:
                self._request_id = current
                return current
            given = self.request.headers.get("x-request-id")
            self._request_id = request_id_for(given)
            headers = getattr(self.response, "headers", None)
            if headers is not None and not self.is_websocket:
                headers["x-request-id"] = self._request_id
        return self._request_id

    def begin_operation(self) -> None:
        """A websocket keeps one context for many operations: forget what each one learned."""
        self._now = None
        self._principal = None
        self._subscriptions = None

    @property
    def authorization(self) -> str | None:
        params = self.connection_params
        if isinstance(params, Mapping):
            for key in ("Authorization", "authorization"):
                value = params.get(key)
                if isinstance(value, str):
                    return value
        value = self.request.headers.get("authorization")
        return value if isinstance(value, str) else None

    async def principal(self) -> Principal | None:
        """The caller, authenticated once per request; None when no credentials were sent."""
        if self._principal is None:
            authenticator = self.services.authenticator
            authorization = self.authorization
            known = authenticator.remembered(authorization)
            if known is not None:
                self._principal = _done(known)
            else:
                self._principal = asyncio.ensure_future(authenticator.authenticate(authorization))
        principal = await self._principal
        if isinstance(principal, User):
            USER_ID.set(principal.id)  # on this request's log lines (billing/logs.py)
        return principal

    async def user(self) -> User:
        """The signed-in user, or UNAUTHENTICATED (nobody) / FORBIDDEN (the service key)."""
        principal = await self.principal()
        if isinstance(principal, User):
            return principal
        if isinstance(principal, ServicePrincipal):
            raise BillingError(
                "the service key has no user: sign in with a user token", code=ErrorCode.FORBIDDEN
            )
        raise BillingError("sign in: this needs a user token", code=ErrorCode.UNAUTHENTICATED)

    async def service(self) -> ServicePrincipal:
        """The service principal, or UNAUTHENTICATED (nobody) / FORBIDDEN (a user)."""
        principal = await self.principal()
        if isinstance(principal, ServicePrincipal):
            return principal
        if principal is None:
            raise BillingError("this needs the service key", code=ErrorCode.UNAUTHENTICATED)
        raise BillingError("only the host app's backend (service key) may do this", code=ErrorCode.FORBIDDEN)

    async def operator(self) -> str:
        """The operator's id (a user id, or `service` for the service key), or FORBIDDEN.

        Anyone else, signed in or not, is refused with FORBIDDEN, in every environment.
        """
        principal = await self.principal()
        if isinstance(principal, ServicePrincipal):
            return principal.name
        if isinstance(principal, User) and principal.operator:
            return principal.id
        raise BillingError("only an operator of the billing service may do this", code=ErrorCode.FORBIDDEN)

    async def subscription(self, user_id: str) -> SubscriptionState:
        """The user's subscription state, read at most once per request."""
        if self._subscriptions is None:
            self._subscriptions = {}
        future = self._subscriptions.get(user_id)
        if future is None:
            cache = self.services.accounts
            state = None if cache is None else cache.remembered(user_id)
            if state is not None:
                future = _done(state)
            elif cache is None:
                future = asyncio.ensure_future(load_subscription(self.database, user_id))
            else:
                future = asyncio.ensure_future(cache.load(self.database, user_id))
            self._subscriptions[user_id] = future
        return await future

    async def viewer(self) -> tuple[User, SubscriptionState]:
        """The signed-in user and the subscription of their active owner (billing/owners.py):
        the token's organisation's, or else their own."""
        user = await self.user()
        return user, await self.subscription(user.owner_key)

    async def billing_owner(self) -> Identity:
        """Whose billing the viewer may manage: their own, or their active organisation's when
        their role in it is one of BILLING_ADMIN_ROLES; FORBIDDEN for any other member."""
        user = await self.user()
        if user.org_id is None:
            return user
        if not user.billing_admin:
            raise BillingError(
                "only a billing admin of the organisation may manage its billing", code=ErrorCode.FORBIDDEN
            )
        return OwnerIdentity(id=user.owner_key)


def _done(value: T) -> asyncio.Future[T]:
    """A future already resolved: awaiting it does not yield to the loop, and it costs no task."""
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _bound(service: T | None, name: str) -> T:
    if service is None:
        raise RuntimeError(
            f"GraphQLServices.{name} is not bound: the app has not started (graph.app.create_app)"
        )
    return service


def context_of(info: strawberry.Info[Any, Any]) -> Context:
    context = info.context
    if not isinstance(context, Context):
        raise TypeError(
            "the billing fields and permissions need graph.context.Context as the GraphQL context "
            f"(got {type(context).__name__})"
        )
    return context
