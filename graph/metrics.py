"""`GET /metrics`: the service's Prometheus metrics (billing/metrics.py), and their GraphQL side.

One process (`billing serve`, tests, a host app): the default registry, the database gauges
beside it. Several (`billing serve --workers N`): `PROMETHEUS_MULTIPROC_DIR` is set before the
workers start (`prepare_multiprocess_dir`) and a scrape merges every worker's files with
prometheus-client's `MultiProcessCollector`; the default process and platform metrics are then
absent (they describe one process). A dead worker's live-gauge files are marked dead at scrape
time, so its websockets stop counting. The database gauges are read at scrape time by the
process that answers it (billing.metrics.DatabaseGauges).

With `METRICS_TOKEN` set the endpoint wants `Authorization: Bearer <token>` (else 401);
production refuses to start without one unless `METRICS_ENABLED=false` (billing/settings.py).
"""

from __future__ import annotations

import hmac
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
)
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from billing.errors import ErrorCode
from billing.metrics import GRAPHQL_DURATION, GRAPHQL_REQUESTS, DatabaseGauges, SnapshotCollector
from graph.errors import BAD_REQUEST, GRAPHQL_PARSE_FAILED, GRAPHQL_VALIDATION_FAILED

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
KNOWN_CODES = frozenset({*ErrorCode, GRAPHQL_PARSE_FAILED, GRAPHQL_VALIDATION_FAILED, BAD_REQUEST})
OTHER = "OTHER"  # an error code the service does not know (a host app's own)
_LIVE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


# GraphQL operations ----------------------------------------------------------------------------


def root_field(document: DocumentNode, operation: OperationDefinitionNode) -> str:
    """The name (not the alias) of the operation's first root field, through fragments."""
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    selections: SelectionSetNode | None = operation.selection_set
    for _ in range(16):
        if selections is None or not selections.selections:
            break
        first = selections.selections[0]
        if isinstance(first, FieldNode):
            return first.name.value
        if isinstance(first, InlineFragmentNode):
            selections = first.selection_set
        elif isinstance(first, FragmentSpreadNode):
            fragment = fragments.get(first.name.value)
            selections = fragment.selection_set if fragment is not None else None
    return "none"


def outcome_of(errors: Iterable[GraphQLError] | None) -> str:
    """`ok`, or the first error's code (as the client sees it: after `OperationRules.finish`)."""
    for error in errors or ():
        code = (error.extensions or {}).get("code")
        return str(code) if code in KNOWN_CODES else OTHER
    return "ok"


class OperationMetrics:
    """The GraphQL counters of one app, with their labelled children kept (no lookup per request).
    With `METRICS_ENABLED=false` they count nothing (bench/: `--ab-env METRICS_ENABLED=...`)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._counts: dict[tuple[str, str, str], object] = {}
        self._durations: dict[str, object] = {}

    def count(self, operation_type: str, field_name: str, outcome: str) -> None:
        if not self.enabled:
            return
        key = (operation_type, field_name, outcome)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = GRAPHQL_REQUESTS.labels(*key)
        child.inc()  # type: ignore[attr-defined]

    def observe(self, operation_type: str, seconds: float) -> None:
        if not self.enabled:
            return
        child = self._durations.get(operation_type)
        if child is None:
            child = self._durations[operation_type] = GRAPHQL_DURATION.labels(operation_type)
        child.observe(seconds)  # type: ignore[attr-defined]


# The endpoint ------------------------------------------------------------------------------------


def multiprocess_dir() -> Path | None:
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path else None


def prepare_multiprocess_dir(path: Path) -> None:
    """Before the workers start: an empty metrics directory, named in the environment they inherit."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)


def mark_dead_workers(path: Path) -> None:
    """Drop the live gauges of processes that are gone (a worker killed without a shutdown)."""
    pids = {int(match.group(1)) for f in os.listdir(path) if (match := _LIVE_FILE.fullmatch(f))}
    for pid in pids:
        if pid != os.getpid() and not _alive(pid):
            multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Merged:
    """The registry one scrape serves: this process's (or every worker's) and the database's."""

    def __init__(self, *collectors: object) -> None:
        self.collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self.collectors:
            yield from collector.collect()  # type: ignore[attr-defined]


async def metrics_endpoint(request: Request) -> Response:
    state = request.app.state
    token: str | None = state.settings.metrics_token_value
    if token is not None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return PlainTextResponse(
                "metrics need a bearer token", status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
    gauges: DatabaseGauges = state.metrics_gauges
    snapshot = await gauges.read()
    path = multiprocess_dir()
    if path is not None:
        mark_dead_workers(path)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(path))  # type: ignore[no-untyped-call]
        served = _Merged(registry, SnapshotCollector(snapshot))
    else:
        served = _Merged(REGISTRY, SnapshotCollector(snapshot))
    body = generate_latest(served)  # type: ignore[arg-type]
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)


def worker_exited() -> None:
    """A worker's shutdown: its live gauges stop counting at once."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(os.getpid(), str(path))  # type: ignore[no-untyped-call]
