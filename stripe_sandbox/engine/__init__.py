"""The sandbox's billing engine (see `changes` for what it models)."""

from stripe_sandbox.engine.changes import *  # noqa: F403
