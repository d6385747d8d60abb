"""Stripe's own example objects (`tests/stripe/fixtures3.json`, MIT), to check the sandbox's shapes."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "stripe" / "fixtures3.json"


@cache
def stripe_fixture(object_type: str) -> dict[str, Any]:
    """Stripe's example of `object_type` (e.g. "customer", "checkout.session")."""
    resources: dict[str, dict[str, Any]] = json.loads(FIXTURES.read_text())["resources"]
    return resources[object_type]


def missing_keys(obj: Any, object_type: str) -> list[str]:
    """Top-level keys of Stripe's example that `obj` lacks (its own shape, deleted objects aside)."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    return sorted(set(stripe_fixture(object_type)) - set(obj))
