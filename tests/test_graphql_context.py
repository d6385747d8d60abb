"""The GraphQL context's services: bound by the app factory at start-up, one clear error before."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from billing.clock import Clock, utcnow
from billing.plans import load_catalog
from db.engine import Database
from graph.context import Context, GraphQLServices
from tests.graphql_support import serve_api, settings_for


def unbound_services(clock: Clock = utcnow) -> GraphQLServices:
    return GraphQLServices.create(settings_for("http://127.0.0.1:9"), load_catalog(), clock=clock)


@pytest.mark.parametrize("name", ["database", "gateway", "locks"])
def test_a_service_the_app_has_not_bound_is_one_clear_error(name: str) -> None:
    context = Context(None, None, unbound_services())
    with pytest.raises(RuntimeError, match=rf"GraphQLServices\.{name} is not bound: the app has not started"):
        getattr(context, name)


def test_no_reporter_bound_means_nothing_to_kick() -> None:
    assert Context(None, None, unbound_services()).reporter is None


def test_now_is_the_injected_clock_read_once_per_request() -> None:
    first, second = datetime(2030, 1, 2, tzinfo=UTC), datetime(2030, 1, 3, tzinfo=UTC)
    times: Iterator[datetime] = iter([first, second])
    context = Context(None, None, unbound_services(clock=lambda: next(times)))
    assert context.now == first
    assert context.now == first
    assert context.clock() == second


async def test_the_app_binds_its_services_at_start_up(database: Database) -> None:
    async with serve_api(database) as api:
        state = api.app.state
        services: GraphQLServices = state.graphql
        assert services.database is state.database
        assert services.realtime is state.realtime.hub
        assert services.gateway is state.stripe
        assert services.locks is state.events.locks
        assert services.reporter is state.usage_reporter
        assert services.clock is utcnow
