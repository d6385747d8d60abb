"""The console's charts, drawn on the server by pygal as SVG with its JavaScript off.

They are served from the service's own origin as `image/svg+xml` and shown with `<img>`: a
browser runs no script of an image and loads nothing it names, and the page itself stays under
its strict Content-Security-Policy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pygal
from pygal.graph.public import PublicApi
from pygal.style import Style

from billing.revenue import MOVEMENTS, Bucket

SVG_POLICY = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'"
STYLE = Style(
    background="#ffffff",
    plot_background="#ffffff",
    foreground="#1a1f36",
    foreground_strong="#1a1f36",
    foreground_subtle="#697386",
    colors=("#635bff", "#00a37a", "#7dd3fc", "#f59e0b", "#df1b41", "#8b5cf6"),
    font_family="-apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif",
)


def _config(title: str) -> pygal.Config:
    config = pygal.Config()
    config.js = []  # no <script> in the SVG: pygal's tooltips come from another origin
    config.title = title
    config.style = STYLE
    config.width = 900
    config.height = 320
    config.show_minor_x_labels = False
    config.x_label_rotation = 0
    config.legend_at_bottom = True
    config.truncate_legend = -1
    config.truncate_label = -1
    return config


_SCRIPT = re.compile(rb"<script\b[^>]*?(?:/>|>.*?</script>)", re.S)


def _svg(chart: PublicApi[Any, Any, Any]) -> bytes:
    """The chart without any `<script>`: pygal writes its configuration as an inline script even
    with `js` empty. Text in the SVG is escaped, so no `</script>` can hide inside one."""
    rendered = chart.render()
    return _SCRIPT.sub(b"", rendered.encode() if isinstance(rendered, str) else rendered)


def _labels(buckets: Sequence[Bucket]) -> tuple[list[str], list[str]]:
    labels = [bucket.start.strftime("%b %d") for bucket in buckets]
    step = max(1, len(labels) // 9)
    return labels, labels[::step]


def mrr_chart(buckets: Sequence[Bucket], currency: str = "usd") -> bytes:
    """MRR at the end of each bucket, in the currency's main unit."""
    chart = pygal.Line(_config(f"MRR ({currency.upper()}) at the end of each day"))
    chart.show_dots = False
    chart.fill = True
    labels, major = _labels(buckets)
    chart.x_labels = labels
    chart.x_labels_major = major
    chart.value_formatter = lambda value: f"{value:,.2f}"
    chart.add("MRR", [bucket.mrr / 100 for bucket in buckets])
    return _svg(chart)


def movements_chart(buckets: Sequence[Bucket], currency: str = "usd") -> bytes:
    """The MRR movements of each bucket (new, expansion, contraction, churned, reactivation)."""
    chart = pygal.StackedBar(_config(f"MRR movements ({currency.upper()}) per day"))
    labels, major = _labels(buckets)
    chart.x_labels = labels
    chart.x_labels_major = major
    chart.value_formatter = lambda value: f"{value:,.2f}"
    for movement in MOVEMENTS:
        chart.add(movement, [bucket.movements[movement] / 100 for bucket in buckets])
    return _svg(chart)
