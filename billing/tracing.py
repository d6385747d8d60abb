"""Trace spans for billing code, without OpenTelemetry in `billing/`.

`SPANS` is None unless the app turned tracing on (graph/tracing.py installs an implementation
backed by OpenTelemetry); then `span` opens a span and `traceparent` gives the current span's
W3C traceparent, to keep on a stored webhook event. Off, both are a `None` check.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class Spans(Protocol):
    def span(
        self, name: str, *, parent: str | None = None, attributes: Mapping[str, str] | None = None
    ) -> AbstractContextManager[object]: ...

    def traceparent(self) -> str | None: ...


SPANS: Spans | None = None
_OFF: AbstractContextManager[None] = nullcontext()


def span(
    name: str, *, parent: str | None = None, attributes: Mapping[str, str] | None = None
) -> AbstractContextManager[object]:
    """A span named `name`, the child of the current one (or of the `parent` traceparent)."""
    spans = SPANS
    return _OFF if spans is None else spans.span(name, parent=parent, attributes=attributes)


def traceparent() -> str | None:
    spans = SPANS
    return None if spans is None else spans.traceparent()
