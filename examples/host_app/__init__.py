"""A host app that serves the billing schema merged with its own tier-gated fields.

from examples.host_app import create_host_app
app = create_host_app()          # uvicorn --factory examples.host_app:create_host_app
"""

from examples.host_app.app import create_host_app
from examples.host_app.schema import HostQuery, Query, schema

__all__ = ["HostQuery", "Query", "create_host_app", "schema"]
