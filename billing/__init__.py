"""The billing domain: plans, Stripe, subscription state, usage and entitlements.

Never imports Strawberry or FastAPI; `graph` is the transport on top of it.
"""
