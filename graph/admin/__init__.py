"""The admin console at `/admin` for operators: revenue, accounts and what is stuck, with the
CLI's actions as buttons (docs/operations.md). Server-rendered, no script, nothing from another
origin; it shares no code with the Stripe sandbox's pages."""

from __future__ import annotations

from fastapi import FastAPI

from billing.settings import Settings
from graph.admin.actions import Actions
from graph.admin.routes import Console, admin_routes


def install_admin(app: FastAPI, settings: Settings) -> None:
    console = Console(settings)
    app.router.routes.extend(admin_routes(console, Actions(console).routes()))
